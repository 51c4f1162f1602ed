"""Feature extractors shared by every learner, chosen with `backbone=<name>`."""

import inspect
from collections.abc import Mapping

from torch import nn

from metalab.backbones.conv4 import Conv4
from metalab.backbones.mlp import MLP
from metalab.backbones.resnet12 import ResNet12
from metalab.errors import ConfigError

BACKBONES = {"conv4": Conv4, "mlp": MLP, "resnet12": ResNet12}


# Backbones with BatchNorm layers, which can keep running statistics (`running_stats`).
NORMALIZED = ("conv4", "resnet12")


def build_backbone(cfg: Mapping, input_shape: tuple[int, ...], running_stats: bool = False) -> nn.Module:
    """Build the backbone named by `cfg["name"]` for inputs of `input_shape` (no batch dim).

    Every backbone exposes `out_features`: the size of the flat feature vector it returns.
    `running_stats=True`: its BatchNorm layers keep running statistics, used in eval mode
    (for learners that never vmap the backbone; a backbone without BatchNorm ignores it).
    """
    options = dict(cfg)
    name = options.pop("name")
    if name not in BACKBONES:
        raise ConfigError(f"backbone={name!r} is unknown; choose one of {sorted(BACKBONES)}")
    # A paper setting's conv4 options (e.g. stride) under another backbone: say so, not a TypeError.
    accepted = inspect.signature(BACKBONES[name]).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        removals = " ".join(f"~backbone.{key}" for key in unknown)
        raise ConfigError(f"backbone={name} has no option {', '.join(unknown)} (a paper setting's for another "
                          f"backbone?); remove with {removals}, or choose the backbone they belong to")
    if running_stats and name in NORMALIZED:
        options["running_stats"] = True
    return BACKBONES[name](input_shape=tuple(input_shape), **options)
