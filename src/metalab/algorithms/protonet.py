"""Prototypical Networks (Snell, Swersky, Zemel 2017).

Embed every image with f_φ; a class prototype is the mean embedding of its support
examples, c_k = mean_{(x,y)∈S, y=k} f_φ(x); a query is classified by a softmax over
negative squared Euclidean distances, p(y=k | x) ∝ exp(−‖f_φ(x) − c_k‖²). Nothing is
sized to the number of ways, so training may use more ways than testing (the paper
trains 60-way for 5-way tests on Omniglot).

BatchNorm: `algorithm.batch_norm` (algorithms/metric.py); the default `running` trains in
training mode with support and query images in one batch and meta-tests in eval mode, as
the authors' code does.
"""

import torch
from torch import Tensor

from metalab.algorithms.metric import MetricLearner, one_hot_labels
from metalab.data.episodes import Episode


class ProtoNet(MetricLearner):
    def __init__(self, **settings):
        """MetricLearner's settings (conf/algorithm/protonet.yaml): nothing of its own."""
        super().__init__(**settings)
        self.backbone = self.build_embedding()

    @staticmethod
    def prototypes(support: Tensor, one_hot: Tensor) -> Tensor:
        """[tasks, ways, dim]: the mean embedding of each class's support examples."""
        one_hot = one_hot.to(support.dtype)  # [tasks, support, ways]
        return one_hot.transpose(1, 2) @ support / one_hot.sum(1).unsqueeze(-1)

    @staticmethod
    def distances(query: Tensor, prototypes: Tensor) -> Tensor:
        """[tasks, queries, ways] logits: negative squared distances to the prototypes."""
        return -(query.unsqueeze(2) - prototypes.unsqueeze(1)).pow(2).sum(-1)

    def adapt_one_hot(self, support_x: Tensor, support_one_hot: Tensor) -> Tensor:
        """[tasks, ways, dim] prototypes."""
        return self.prototypes(self.embed(self.backbone, support_x), support_one_hot)

    def predict(self, prototypes: Tensor, query_x: Tensor) -> Tensor:
        return self.distances(self.embed(self.backbone, query_x), prototypes)

    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        support, query = self.embed_episode(self.backbone, batch.support_x, batch.query_x)
        logits = self.distances(query, self.prototypes(support, one_hot_labels(batch.support_y)))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        return loss, {"acc": self.episode_metric(logits, batch.query_y)}
