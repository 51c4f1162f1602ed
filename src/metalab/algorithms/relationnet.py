"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr, Hospedales 2018).

An embedding f_φ keeps a spatial feature map; a class's feature is the sum of its support
maps, F_k = Σ_{(x,y)∈S, y=k} f_φ(x). A learned relation module g_ϕ scores every
(query, class) pair from their maps concatenated along the channels:

    r_{q,k} = sigmoid( g_ϕ( [f_φ(x_q), F_k] ) ) ∈ [0, 1],

and both are trained to regress the relation to 1 for the matching class, 0 otherwise:

    L = mean_{q,k} (r_{q,k} − 1[y_q = k])²

(the paper writes the sum; the mean over query-class pairs and tasks differs by a
constant factor). The relation module is two [3×3 conv, BatchNorm, ReLU, 2×2 max-pool]
blocks and two fully connected layers (ReLU, then sigmoid). `predict` returns the scores
r: their argmax is the predicted class.

The embedding is the shared backbone (`backbone=`), asked for its feature map; the
paper's conv4 embedding pools after its first two blocks only, set per backbone in
`algorithm.backbone_options` (conf/algorithm/relationnet.yaml). Nothing is sized to the
number of ways or shots, so test episodes may use others than training.

BatchNorm (embedding and relation module): `algorithm.batch_norm` (algorithms/metric.py).
The default `running` meta-tests with running statistics, so a query's score does not
depend on the other queries; the authors' test scripts instead normalize each pass with its
own statistics (they never call `model.eval()`), which is `transductive`. Support and query
images are embedded in separate passes, as in the authors' training script
(omniglot/omniglot_train_one_shot.py, lines 172-173).
"""

import torch
from torch import Tensor, nn

from metalab.algorithms.metric import MetricLearner
from metalab.data.episodes import Episode
from metalab.errors import ConfigError


def relation_block(in_channels: int, out_channels: int, pool: bool, running_stats: bool) -> nn.Sequential:
    """[3×3 conv, BatchNorm (running statistics or not, as the embedding's), ReLU, 2×2 max-pool]."""
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=running_stats),
        nn.ReLU(),
    ]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class RelationModule(nn.Module):
    """g_ϕ: a [2C, H, W] pair map -> one relation score in [0, 1]."""

    def __init__(self, in_shape: tuple[int, int, int], channels: int, hidden: int, running_stats: bool):
        super().__init__()
        blocks, probe = [], torch.zeros(2, *in_shape)
        for in_channels in (in_shape[0], channels):
            # A map already 1×1 is not pooled, so small embeddings (ResNet-12 on 28×28) work.
            blocks.append(
                relation_block(in_channels, channels, pool=min(probe.shape[-2:]) >= 2, running_stats=running_stats)
            )
            with torch.no_grad():
                probe = blocks[-1].eval()(probe)  # eval: the shape probe leaves the statistics alone
                blocks[-1].train()
        self.convs = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(probe[0].numel(), hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid()
        )

    def forward(self, pairs: Tensor) -> Tensor:
        return self.head(self.convs(pairs)).squeeze(-1)


class RelationNet(MetricLearner):
    def __init__(self, *, relation_channels: int, relation_hidden: int, backbone_options: dict | None, **settings):
        """The relation module's `relation_channels` (its convolutions) and `relation_hidden`
        (its hidden layer); `backbone_options`: {backbone name: settings} that this learner's
        embedding takes on top of the backbone's config (the paper's conv4 pools twice only).
        `settings`: MetricLearner's."""
        super().__init__(**settings)
        backbone_cfg = self.backbone_cfg
        extra = (backbone_options or {}).get(backbone_cfg["name"]) or {}
        self.backbone = self.build_embedding({**backbone_cfg, **extra})
        shape = tuple(getattr(self.backbone, "out_shape", ()))
        if len(shape) != 3 or not hasattr(self.backbone, "feature_map"):
            raise ConfigError(
                f"algorithm=relationnet compares [C, H, W] feature maps, but backbone="
                f"{backbone_cfg['name']} gives none; use backbone=conv4 or backbone=resnet12"
            )
        self.backbone.feature_map = True  # return the map unflattened (and, for resnet12, unpooled)
        self.relation = RelationModule(
            (2 * shape[0], shape[1], shape[2]),
            channels=int(relation_channels),
            hidden=int(relation_hidden),
            running_stats=self.running_stats,
        )

    def adapt_one_hot(self, support_x: Tensor, support_one_hot: Tensor) -> Tensor:
        """[tasks, ways, C, H, W] class features: each class's support maps summed over its shots."""
        support = self.embed(self.backbone, support_x)
        return torch.einsum("tsk,tschw->tkchw", support_one_hot.to(support.dtype), support)

    def predict(self, classes: Tensor, query_x: Tensor) -> Tensor:
        """[tasks, queries, ways] relation scores in [0, 1]."""
        query = self.embed(self.backbone, query_x)  # [tasks, queries, C, H, W]
        tasks, queries, ways = query.shape[0], query.shape[1], classes.shape[1]
        pairs = torch.cat(
            [
                query.unsqueeze(2).expand(-1, -1, ways, -1, -1, -1),
                classes.unsqueeze(1).expand(-1, queries, -1, -1, -1, -1),
            ],
            dim=3,
        )
        # transductive: one task's query-class pairs form one batch for the relation module's BatchNorm.
        scores = self.embed(self.relation, pairs.flatten(1, 2))
        return scores.view(tasks, queries, ways)

    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        scores = self.predict(self.adapt(batch.support_x, batch.support_y), batch.query_x)
        targets = nn.functional.one_hot(batch.query_y, scores.shape[-1]).to(scores.dtype)
        loss = nn.functional.mse_loss(scores, targets)
        return loss, {"acc": self.episode_metric(scores, batch.query_y)}
