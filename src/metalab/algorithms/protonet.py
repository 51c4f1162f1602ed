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

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Tensor:
        """[tasks, ways, dim] prototypes: the mean embedding of each class's support examples."""
        support = vmap(self.backbone)(support_x)  # one task per vmap slice: its own normalization statistics
        ways = int(support_y.max()) + 1
        one_hot = torch.nn.functional.one_hot(support_y, ways).to(support.dtype)  # [tasks, support, ways]
        return one_hot.transpose(1, 2) @ support / one_hot.sum(1).unsqueeze(-1)

    def predict(self, prototypes: Tensor, query_x: Tensor) -> Tensor:
        """[tasks, queries, ways] logits: negative squared distances to the prototypes."""
        query = vmap(self.backbone)(query_x)
        return -(query.unsqueeze(2) - prototypes.unsqueeze(1)).pow(2).sum(-1)

    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.predict(self.adapt(batch.support_x, batch.support_y), batch.query_x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        return loss, {"acc": self.episode_metric(logits, batch.query_y)}
