"""Prototypical Networks (Snell, Swersky, Zemel 2017).

Embed every image with f_φ; a class prototype is the mean embedding of its support
examples, c_k = mean_{(x,y)∈S, y=k} f_φ(x); a query is classified by a softmax over
negative squared Euclidean distances, p(y=k | x) ∝ exp(−‖f_φ(x) − c_k‖²). Nothing is
sized to the number of ways, so training may use more ways than testing (the paper
trains 60-way for 5-way tests on Omniglot).
"""

import torch
from torch import Tensor
from torch.func import vmap

from metalab.algorithms.base import MetaLearner
from metalab.backbones import build_backbone
from metalab.data.episodes import Episode


class ProtoNet(MetaLearner):
    task_types = ("classification",)

    def __init__(self, config: dict, input_shape: list[int], task_type: str):
        super().__init__(config, input_shape, task_type)
        self.backbone = build_backbone(config["backbone"], input_shape)

    def query_logits(self, batch: Episode) -> Tensor:
        """[tasks, queries, ways] logits: negative squared distances to the prototypes."""
        n_support = batch.support_x.shape[1]
        # Embed support and query together, one task per vmap slice, so normalization
        # statistics are those of the task's own images.
        features = vmap(self.backbone)(torch.cat([batch.support_x, batch.query_x], dim=1))
        support, query = features[:, :n_support], features[:, n_support:]
        ways = int(batch.support_y.max()) + 1
        one_hot = torch.nn.functional.one_hot(batch.support_y, ways).to(support.dtype)  # [tasks, support, ways]
        prototypes = one_hot.transpose(1, 2) @ support / one_hot.sum(1).unsqueeze(-1)  # [tasks, ways, dim]
        return -(query.unsqueeze(2) - prototypes.unsqueeze(1)).pow(2).sum(-1)

    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.query_logits(batch)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        return loss, {"acc": self.episode_metric(logits, batch.query_y)}

    def evaluate(self, batch: Episode) -> dict[str, Tensor]:
        return {"acc": self.episode_metric(self.query_logits(batch), batch.query_y)}
