"""The four-block convolutional embedding of Vinyals et al. (2016), used by MAML and ProtoNet."""

import math

import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int, pool: bool = True, running_stats: bool = False) -> nn.Sequential:
    # By default BatchNorm without running statistics: every forward pass normalizes with
    # the statistics of the images it is given. Under vmap each task is its own batch, so
    # the statistics are per task (transductive, as in MAML's reference code), the
    # module holds no buffers to mutate inside the inner loop, and an episode's result
    # does not depend on which other episodes share its meta-batch. `running_stats=True`
    # keeps running averages, used in eval mode; only for learners that do not vmap the
    # backbone (the metric learners, algorithms/metric.py).
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=running_stats),
        nn.ReLU(),
    ]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class Conv4(nn.Module):
    """`blocks` × [3×3 conv, BatchNorm, ReLU, 2×2 max-pool], flattened.

    28×28 Omniglot gives 64 features, 84×84 miniImageNet 64×5×5 = 1600.

    For learners that compare feature maps (Relation Networks): `pooled_blocks=k` keeps
    the max-pool in the first k blocks only (the Relation Network embedding: k=2, so
    Omniglot keeps a 64×7×7 map), and `feature_map=True` returns the [C, H, W] map
    unflattened, its shape in `out_shape`. The defaults are the network above.
    `running_stats=True`: BatchNorm keeps running statistics (see conv_block).
    """

    def __init__(self, input_shape: tuple[int, ...], hidden_channels: int = 64, blocks: int = 4,
                 pooled_blocks: int | None = None, feature_map: bool = False, running_stats: bool = False):
        super().__init__()
        pooled_blocks = blocks if pooled_blocks is None else pooled_blocks
        channels = [input_shape[0]] + [hidden_channels] * blocks
        self.layers = nn.Sequential(*(conv_block(c_in, c_out, pool=i < pooled_blocks, running_stats=running_stats)
                                      for i, (c_in, c_out) in enumerate(zip(channels, channels[1:]))))
        self.feature_map = feature_map
        with torch.no_grad():
            self.out_shape = tuple(self.layers.eval()(torch.zeros(2, *input_shape)).shape[1:])  # eval: no stats update
        self.layers.train()
        self.out_features = math.prod(self.out_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.layers(x)
        return features if self.feature_map else features.flatten(1)
