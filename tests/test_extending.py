"""A new backbone or dataset is a class in metalab's package (and a yaml file naming it): no list to edit.

docs/data.md and docs/learners.md say so; the name used to be checked against the built-in
lists before `_target_` was read, and BatchNorm running statistics and compile=auto were
chosen by the built-in names.
"""

import sys
import types

import pytest
import torch
from torch import nn

from metalab.algorithms.compile_passes import auto_compile
from metalab.backbones import build_backbone
from metalab.data import build_sources
from metalab.data.sinusoid import Sinusoid


def module_with(monkeypatch, module_name: str, cls: type) -> str:
    """`cls` as if it were written in metalab's own `module_name`; returns its `_target_`."""
    module = types.ModuleType(module_name)
    cls.__module__ = module_name
    setattr(module, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, module_name, module)
    return f"{module_name}.{cls.__name__}"


class Tiny(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], width: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.LazyLinear(width))
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyNormalized(Tiny):
    def __init__(self, input_shape: tuple[int, ...], width: int = 8, running_stats: bool = False):
        super().__init__(input_shape, width)
        self.running_stats = running_stats


@pytest.mark.parametrize("cls, keeps_statistics", [(Tiny, None), (TinyNormalized, True)])
def test_a_new_backbone_needs_only_its_class(monkeypatch, cls, keeps_statistics):
    target = module_with(monkeypatch, "metalab.backbones.tiny", cls)
    config = {"name": "tiny", "_target_": target, "width": 4}
    net = build_backbone(config, (1, 6, 6), running_stats=True)
    assert type(net) is cls and net(torch.zeros(2, 1, 6, 6)).shape == (2, 4)
    # Running statistics go to a backbone whose constructor takes them, whatever its name.
    assert getattr(net, "running_stats", None) is keeps_statistics
    # compile=auto asks the class, not the name, whether compiling pays.
    run = {"algorithm": {"name": "maml"}, "backbone": config, "trainer": {"max_steps": 10**6}}
    compiles, reason = auto_compile(run, type("Learner", (), {"compilable": True}))
    assert not compiles and "backbone=tiny" in reason


def test_a_new_dataset_needs_only_its_class(monkeypatch, tmp_path):
    class Waves(Sinusoid):
        pass

    target = module_with(monkeypatch, "metalab.data.waves", Waves)
    config = {"name": "waves", "_target_": target, "amplitude": [1.0, 2.0], "phase": [0.0, 1.0], "x_range": [-1.0, 1.0]}
    sources = build_sources(config, tmp_path, tmp_path / "cache")
    assert set(sources) == {"train", "val", "test"}
