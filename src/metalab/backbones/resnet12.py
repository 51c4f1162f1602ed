"""ResNet-12: the deeper embedding of TADAM (Oreshkin et al. 2018) and MetaOptNet (Lee et al. 2019).

Four residual stages, each

    y = MaxPool2( LeakyReLU( B(x) + shortcut(x) ) ),
    B = [3×3 conv, BN, LeakyReLU] → [3×3 conv, BN, LeakyReLU] → [3×3 conv, BN],
    shortcut = [1×1 conv, BN]  (the channel count changes in every stage),

with 64-160-320-640 channels: an 84×84 miniImageNet image becomes a 640×5×5 map,
averaged over space to 640 features (or flattened: `average_pool=false`, 16,000).
BatchNorm uses batch statistics only, as in conv4, so tasks can be embedded under vmap
each with its own statistics (`running_stats=True` keeps running averages instead, for the
metric learners, which do not vmap it). `feature_map=True` returns the last stage's [C, H, W] map
(before any pooling) for learners that compare maps (Relation Networks); `out_shape` then
holds its shape. DropBlock, used by MetaOptNet for long miniImageNet runs, is left out.
"""

import math
from collections.abc import Sequence

import torch
from torch import nn


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, running_stats: bool) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels, track_running_stats=running_stats),
    ]


class ResidualStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, slope: float, running_stats: bool = False):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(in_channels, out_channels, 3, running_stats),
            nn.LeakyReLU(slope),
            *conv_bn(out_channels, out_channels, 3, running_stats),
            nn.LeakyReLU(slope),
            *conv_bn(out_channels, out_channels, 3, running_stats),
        )
        self.shortcut = nn.Sequential(*conv_bn(in_channels, out_channels, 1, running_stats))
        self.activation = nn.LeakyReLU(slope)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.activation(self.body(x) + self.shortcut(x)))


class ResNet12(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, ...],
        channels: Sequence[int] = (64, 160, 320, 640),
        average_pool: bool = True,
        feature_map: bool = False,
        leaky_slope: float = 0.1,
        running_stats: bool = False,
    ):
        super().__init__()
        widths = [input_shape[0], *channels]
        self.stages = nn.Sequential(
            *(ResidualStage(c_in, c_out, leaky_slope, running_stats) for c_in, c_out in zip(widths, widths[1:]))
        )
        self.average_pool = average_pool
        self.feature_map = feature_map
        with torch.no_grad():
            self.out_shape = tuple(self.stages.eval()(torch.zeros(2, *input_shape)).shape[1:])  # eval: no stats update
        self.stages.train()
        self.out_features = self.out_shape[0] if average_pool else math.prod(self.out_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(x)
        if self.feature_map:
            return features
        return features.mean((-2, -1)) if self.average_pool else features.flatten(1)
