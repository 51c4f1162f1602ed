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

The authors' training (omniglot/omniglot_train_one_shot.py) has two settings here:
`algorithm.grad_clip_per_network=true` clips the embedding's and the relation module's
gradient norms apart at `grad_clip` (their lines 197-198: 0.5 each), and
`algorithm.init=sung` draws the weights as their `weights_init` does (lines 103-116):
convolutions N(0, 2/(k·k·out_channels)) with zero bias, BatchNorm scale 1 and shift 0,
linear layers N(0, 0.01²) with every bias 1. `init=default` keeps PyTorch's.

BatchNorm (embedding and relation module): `algorithm.batch_norm` (algorithms/metric.py).
The default `running` meta-tests with running statistics, so a query's score does not
depend on the other queries; the authors' test scripts instead normalize each pass with its
own statistics (they never call `model.eval()`), which is `transductive`. Support and query
images are embedded in separate passes, as in the authors' training script
(omniglot/omniglot_train_one_shot.py, lines 172-173).
"""

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

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


INITS = ("default", "sung")


def sung_init(module: nn.Module) -> None:
    """The authors' `weights_init` for one layer (the module docstring), applied with `.apply`."""
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.01)
        nn.init.ones_(module.bias)


# The paper's embedding pools twice only; its rate is halved every 100,000 episodes.
PAPER_EMBEDDING = MappingProxyType({"conv4": MappingProxyType({"pooled_blocks": 2})})
PAPER_SCHEDULE = MappingProxyType({"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 100000, "gamma": 0.5})


class RelationNet(MetricLearner):
    def __init__(
        self,
        *,
        relation_channels: int = 64,
        relation_hidden: int = 8,
        backbone_options: Mapping | None = PAPER_EMBEDDING,
        grad_clip_per_network: bool = False,
        init: Literal["default", "sung"] = "default",
        scheduler: Mapping | None = PAPER_SCHEDULE,
        **settings,
    ):
        """The relation module's `relation_channels` (its convolutions) and `relation_hidden`
        (its hidden layer); `backbone_options`: {backbone name: settings} that this learner's
        embedding takes on top of the backbone's config (the paper's conv4 pools twice only);
        `grad_clip_per_network` and `init`: the authors' clipping and initialisation (the
        module docstring). `settings`: MetricLearner's. The defaults are conf/algorithm/relationnet.yaml's."""
        super().__init__(scheduler=scheduler, **settings)
        if self.given_backbone:
            raise ConfigError(
                "RelationNet compares feature maps and builds its embedding from a backbone config; "
                "give backbone={'name': 'conv4'} (or resnet12), not a module"
            )
        if init not in INITS:
            raise ConfigError(f"algorithm.init={init!r} is unknown; use default (PyTorch's) or sung (the authors')")
        if grad_clip_per_network and self.grad_clip is None:
            raise ConfigError(
                "algorithm.grad_clip_per_network=true needs the norm to clip each network at: "
                "set algorithm.grad_clip, e.g. algorithm.grad_clip=0.5 as the authors"
            )
        self.grad_clip_per_network = bool(grad_clip_per_network)
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
        if init == "sung":
            self.backbone.apply(sung_init)
            self.relation.apply(sung_init)

    def clip_meta_gradients(self, optimizer) -> None:
        if not self.grad_clip_per_network:
            return super().clip_meta_gradients(optimizer)
        # What Lightning's clip_gradients does to all parameters at once, to each network apart.
        for network in (self.backbone, self.relation):
            nn.utils.clip_grad_norm_(network.parameters(), self.grad_clip)

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
