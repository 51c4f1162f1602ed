"""A fully connected network: the MAML paper's 40-40 ReLU net for sinusoid regression."""

import math

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten the input, then Linear+ReLU for each hidden size. `out_features` is the last size."""

    def __init__(self, input_shape: tuple[int, ...], hidden_sizes: list[int] = (40, 40)):
        super().__init__()
        sizes = [math.prod(input_shape), *hidden_sizes]
        layers = []
        for size_in, size_out in zip(sizes, sizes[1:]):
            layers += [nn.Linear(size_in, size_out), nn.ReLU()]
        self.layers = nn.Sequential(nn.Flatten(), *layers)
        self.out_features = sizes[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
