"""The four-block convolutional embedding of Vinyals et al. (2016), used by MAML and ProtoNet."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from metalab.errors import check_choice


class SamePaddedConv2d(nn.Conv2d):
    """A convolution with TensorFlow's 'SAME' padding: ceil(size / stride) outputs per side,
    an odd pad pixel going after (bottom/right). For stride 1 and a 3×3 kernel that is
    padding=1; for stride 2 PyTorch's symmetric padding would shift the sampling grid by a pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, stride, kernel in zip(reversed(x.shape[-2:]), reversed(self.stride), reversed(self.kernel_size)):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]  # F.pad order: (left, right, top, bottom)
        return super().forward(F.pad(x, pads))


# The images' layout inside a convolutional backbone (backbone.memory_format); the numbers are the same.
# contiguous (NCHW) is the default: on the 2-core CPU of docs/speed.md channels_last (NHWC) did not
# make conv4 faster, as its BatchNorm, ReLU and pooling cost as much as its convolutions and
# the layout changes of the gradients cost more than the convolutions saved.
MEMORY_FORMATS = ("contiguous", "channels_last")


def in_memory_format(x: torch.Tensor, memory_format: str) -> torch.Tensor:
    """[batch, C, H, W] images in the layout `memory_format` names."""
    # Under vmap (ANIL's body, learners that vmap the backbone) a tensor's layout can be
    # neither queried nor changed: those passes keep the layout they are given.
    if memory_format == "contiguous" or x.dim() != 4 or torch._C._functorch.is_batchedtensor(x):
        return x
    return x.contiguous(memory_format=torch.channels_last)


def conv_block(in_channels: int, out_channels: int, pool: bool = True, stride: int = 1,
               ceil_pool: bool = False, running_stats: bool = False) -> nn.Sequential:
    # By default BatchNorm without running statistics: every forward pass normalizes with
    # the statistics of the images it is given. Under vmap each task is its own batch, so
    # the statistics are per task (transductive, as in MAML's reference code), the
    # module holds no buffers to mutate inside the inner loop, and an episode's result
    # does not depend on which other episodes share its meta-batch. `running_stats=True`
    # keeps running averages, used in eval mode; only for learners that do not vmap the
    # backbone (the metric learners, algorithms/metric.py).
    conv = (nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1) if stride == 1
            else SamePaddedConv2d(in_channels, out_channels, kernel_size=3, stride=stride))
    layers = [
        conv,
        nn.BatchNorm2d(out_channels, track_running_stats=running_stats),
        nn.ReLU(),
    ]
    return nn.Sequential(*layers, nn.MaxPool2d(2, ceil_mode=ceil_pool)) if pool else nn.Sequential(*layers)


class Conv4(nn.Module):
    """`blocks` × [3×3 conv, BatchNorm, ReLU, 2×2 max-pool], flattened.

    28×28 Omniglot gives 64 features, 84×84 miniImageNet 64×5×5 = 1600.

    For learners that compare feature maps (Relation Networks): `pooled_blocks=k` keeps
    the max-pool in the first k blocks only (the Relation Network embedding: k=2, so
    Omniglot keeps a 64×7×7 map), and `feature_map=True` returns the [C, H, W] map
    unflattened, its shape in `out_shape`. The defaults are the network above.

    Finn et al.'s Omniglot network (cbfinn/maml, utils.py:26-37 `conv_block`, maml.py:211-223
    `forward_conv`) is `pooled_blocks=0, stride=2, global_average=True`: 3×3 convolutions of
    stride 2 with 'SAME' padding instead of max-pooling (28 -> 14 -> 7 -> 4 -> 2), and the
    final map averaged over its positions (64 features) rather than flattened.
    `ceil_pool=True` pools like TensorFlow's 'same' max-pooling, keeping a last odd row and
    column (84 -> 42 -> 21 -> 11 -> 6), as supervised-reptile's miniImageNet network does.
    `running_stats=True`: BatchNorm keeps running statistics (see conv_block).
    `memory_format`: the images' layout inside the network, for speed only (MEMORY_FORMATS).
    """

    def __init__(self, input_shape: tuple[int, ...], hidden_channels: int = 64, blocks: int = 4,
                 pooled_blocks: int | None = None, feature_map: bool = False, stride: int = 1,
                 global_average: bool = False, ceil_pool: bool = False,
                 running_stats: bool = False, memory_format: str = "contiguous"):
        super().__init__()
        check_choice("backbone.memory_format", memory_format, MEMORY_FORMATS)
        self.memory_format = memory_format
        pooled_blocks = blocks if pooled_blocks is None else pooled_blocks
        channels = [input_shape[0]] + [hidden_channels] * blocks
        self.layers = nn.Sequential(*(conv_block(c_in, c_out, pool=i < pooled_blocks, stride=stride, ceil_pool=ceil_pool,
                                                 running_stats=running_stats)
                                      for i, (c_in, c_out) in enumerate(zip(channels, channels[1:]))))
        self.feature_map = feature_map
        self.global_average = global_average
        with torch.no_grad():
            # eval: the shape probe must not update running statistics
            self.out_shape = tuple(self.pooled(self.layers.eval()(torch.zeros(2, *input_shape))).shape[1:])
        self.layers.train()
        self.out_features = math.prod(self.out_shape)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        return features.mean((-2, -1)) if self.global_average else features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            # before every block: a 1-channel image (Omniglot) has no channels-last layout of its
            # own, so the first block's output is converted at the second block
            x = block(in_memory_format(x, self.memory_format))
        features = self.pooled(x)
        return features if self.feature_map else features.flatten(1)
