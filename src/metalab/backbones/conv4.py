"""The four-block convolutional embedding of Vinyals et al. (2016), used by MAML and ProtoNet."""

import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # BatchNorm without running statistics: every forward pass normalizes with the
    # statistics of the images it is given. Under vmap each task is its own batch, so
    # the statistics are per task (transductive, as in MAML's reference code), the
    # module holds no buffers to mutate inside the inner loop, and an episode's result
    # does not depend on which other episodes share its meta-batch.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Conv4(nn.Module):
    """`blocks` × [3×3 conv, BatchNorm, ReLU, 2×2 max-pool], flattened.

    28×28 Omniglot gives 64 features, 84×84 miniImageNet 64×5×5 = 1600.
    """

    def __init__(self, input_shape: tuple[int, ...], hidden_channels: int = 64, blocks: int = 4):
        super().__init__()
        channels = [input_shape[0]] + [hidden_channels] * blocks
        self.layers = nn.Sequential(*(conv_block(c_in, c_out) for c_in, c_out in zip(channels, channels[1:])))
        with torch.no_grad():
            self.out_features = self.layers(torch.zeros(2, *input_shape)).flatten(1).shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).flatten(1)
