"""Feature extractors shared by every learner, chosen with `backbone=<name>`."""

import inspect
from collections.abc import Mapping

from torch import nn

from metalab.backbones.conv4 import Conv4
from metalab.backbones.mlp import MLP
from metalab.backbones.resnet12 import ResNet12
from metalab.errors import ConfigError, metalab_class
from metalab.schema import check_against_signature, check_positive_sizes
from metalab.settings import with_group_defaults

BACKBONES = {"conv4": Conv4, "mlp": MLP, "resnet12": ResNet12}


def takes_running_stats(cls) -> bool:
    """A backbone with BatchNorm layers takes `running_stats` (keep running statistics for eval mode);
    one without has nothing to keep. Read from its constructor, so a new backbone needs no list."""
    return "running_stats" in inspect.signature(cls).parameters


# Constructor arguments metalab fills in itself, never from the config.
SET_BY_CODE = ("input_shape", "running_stats")


def backbone_options(cfg: Mapping) -> tuple[str, dict]:
    """The backbone's name and its options from `cfg`, every key checked against what its
    constructor takes: an unknown one (or one metalab sets, such as input_shape) is a
    ConfigError listing the accepted keys, before any data is read, not a TypeError."""
    _, name, options = checked_backbone(cfg)
    return name, options


def checked_backbone(cfg: Mapping) -> tuple[type[nn.Module], str, dict]:
    """(class, name, options) of the backbone `cfg` configures, its options checked (backbone_options)."""
    options = with_group_defaults("backbone", cfg)  # one written by hand by name: its yaml's class and settings
    name = options.pop("name", None)
    if options.get("_target_") is None:  # no conf/backbone/<name>.yaml gave it one
        raise ConfigError(
            f"backbone.name={name!r} has no conf/backbone/{name}.yaml to name its class; choose one with "
            f"backbone=<name> ({', '.join(BACKBONES)}), or give backbone._target_"
        )
    cls = backbone_class(options.pop("_target_"))  # the class its `_target_` names: a new one needs no list
    # The accepted keys are the constructor's own arguments: a list that cannot drift from the code.
    accepted = [key for key in inspect.signature(cls).parameters if key not in SET_BY_CODE]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        removals = " ".join(f"~backbone.{key}" for key in unknown)
        raise ConfigError(
            f"backbone={name} has no option {', '.join(unknown)} (a paper setting's for another "
            f"backbone?); its options are {', '.join(accepted)}; remove with {removals}, or choose "
            f"the backbone they belong to"
        )
    check_against_signature("backbone", options, cls, set_by_code=SET_BY_CODE)
    check_positive_sizes("backbone", options, cls)
    return cls, name, options


def backbone_class(target) -> type[nn.Module]:
    """The class `backbone._target_` names (metalab's own backbones only)."""
    return metalab_class(
        "backbone._target_",
        target,
        "metalab.backbones",
        nn.Module,
        f"choose one with backbone=<name> ({', '.join(BACKBONES)})",
    )


def build_backbone(cfg: Mapping, input_shape: tuple[int, ...], running_stats: bool = False) -> nn.Module:
    """Build the backbone named by `cfg["name"]` for inputs of `input_shape` (no batch dim).

    Every backbone exposes `out_features`: the size of the flat feature vector it returns.
    `running_stats=True`: its BatchNorm layers keep running statistics, used in eval mode
    (for learners that never vmap the backbone; a backbone without BatchNorm ignores it).
    """
    cls, name, options = checked_backbone(cfg)
    if running_stats and takes_running_stats(cls):
        options["running_stats"] = True
    return cls(input_shape=tuple(input_shape), **options)
