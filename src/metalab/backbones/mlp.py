"""A fully connected network: the MAML paper's 40-40 ReLU net for sinusoid regression."""

import math

import torch
from torch import nn


class Dense(nn.Module):
    """y = x W + b with W stored [in, out] (nn.Linear stores [out, in]).

    The weight gradient xᵀδ then comes out in the weight's own memory layout. With
    nn.Linear's layout every inner-loop update θ − α·g reads a transposed gradient, which
    for per-task copies of a 784×64 weight made the update several times slower on a CPU
    (docs/speed.md, "What was measured to help").
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default initialization
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class MLP(nn.Module):
    """Flatten the input, then Dense+ReLU for each hidden size. `out_features` is the last size."""

    # algorithm.compile=auto compiles a long run on this network on a CPU: measured to pay there
    # (docs/speed.md, "Compiled by default"); a backbone without this attribute runs eagerly.
    compile_pays_on_cpu = True

    def __init__(self, input_shape: tuple[int, ...], hidden_sizes: list[int] = (40, 40)):
        super().__init__()
        sizes = [math.prod(input_shape), *hidden_sizes]
        layers = []
        for size_in, size_out in zip(sizes, sizes[1:]):
            layers += [Dense(size_in, size_out), nn.ReLU()]
        self.layers = nn.Sequential(nn.Flatten(), *layers)
        self.out_features = sizes[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
