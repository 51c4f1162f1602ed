"""A new learner, backbone or dataset is a class in metalab's package (and a yaml file naming it): no list to edit.

docs/backbones.md and docs/data.md say so, with the files to write; the name used to be checked
against the built-in lists before `_target_` was read, and BatchNorm running statistics and
compile=auto were chosen by the built-in names.
"""

import json
import os
import re
import shutil
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from preloaded_cli import BIN, run_command
from torch import nn

import metalab
from metalab.algorithms.compile_passes import auto_compile
from metalab.backbones import build_backbone
from metalab.data import build_sources
from metalab.data.sinusoid import Sinusoid
from metalab.settings import CONFIG_DIR

DOCS = Path(__file__).resolve().parents[1] / "docs"
# "`<path>`:" then a fenced block, maybe indented (in a list item): the file's path and text
DOCUMENTED_FILE = re.compile(
    r"`((?:src/metalab|conf)/[\w/]+\.(?:py|yaml))`[^`]*?:\n\n( *)```\w+\n(.*?)^\2```", re.S | re.M
)


def documented_files(page: str) -> dict[str, str]:
    """{path: text} of every file `page` (under docs/) shows: each fenced block introduced by its
    path in backticks and a colon."""
    text = (DOCS / page).read_text()
    files = {}
    for match in DOCUMENTED_FILE.finditer(text):
        path, indent, body = match.groups()
        files[path] = textwrap.dedent(body) if indent else body
    return files


def test_a_backbone_and_a_dataset_written_as_the_docs_say_train_one_step(tmp_path):
    """The two files docs/backbones.md says to write for a backbone, and the two docs/data.md
    says to write for a dataset, written into a copy of metalab and its conf/ (not the source
    tree), then `metalab-train` with them for one outer step, its test included."""
    files = {**documented_files("backbones.md"), **documented_files("data.md")}
    assert set(files) == {
        "src/metalab/backbones/tiny.py",
        "conf/backbone/tiny.yaml",
        "src/metalab/data/waves.py",
        "conf/dataset/waves.yaml",
    }
    package = Path(metalab.__file__).resolve().parent
    shutil.copytree(package, tmp_path / "src" / "metalab", ignore=shutil.ignore_patterns("conf", "__pycache__"))
    shutil.copytree(CONFIG_DIR, tmp_path / "conf")
    for path, text in files.items():
        (tmp_path / path).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "METALAB_CONFIG_DIR": str(tmp_path / "conf")}
    run_dir = tmp_path / "run"
    overrides = ["dataset=waves", "trainer.max_steps=1", "val_episodes=2", "test_episodes=2", "meta_batch_size=2"]
    # another PYTHONPATH and conf/: run_command runs the installed script, which imports the copy
    done = run_command([str(BIN / "metalab-train"), *overrides, f"hydra.run.dir={run_dir}"], env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["global_step"] == 1
    stored = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "_target_: metalab.backbones.tiny.Tiny" in stored and "_target_: metalab.data.waves.Waves" in stored


@pytest.mark.data
def test_a_learner_written_as_the_docs_say_trains_one_step(tmp_path, data_dir, cache_dir):
    """The two files docs/learners.md shows for a new learner, written into a copy of metalab and
    its conf/, then `metalab-train algorithm=<it>` on Omniglot for one outer step, its test included:
    no registry to edit."""
    files = documented_files("learners.md")
    assert set(files) == {"src/metalab/algorithms/cosinemeans.py", "conf/algorithm/cosinemeans.yaml"}
    package = Path(metalab.__file__).resolve().parent
    shutil.copytree(package, tmp_path / "src" / "metalab", ignore=shutil.ignore_patterns("conf", "__pycache__"))
    shutil.copytree(CONFIG_DIR, tmp_path / "conf")
    for path, text in files.items():
        (tmp_path / path).write_text(text)
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path / "src"),
        "METALAB_CONFIG_DIR": str(tmp_path / "conf"),
        "METALAB_DATA_DIR": str(data_dir),
        "METALAB_CACHE_DIR": str(cache_dir),
    }
    run_dir = tmp_path / "run"
    overrides = [
        "algorithm=cosinemeans",
        "dataset=omniglot",
        "ways=5",
        "shots=1",
        "queries=2",
        "meta_batch_size=1",
        "trainer.max_steps=1",
        "val_episodes=2",
        "test_episodes=2",
    ]
    done = run_command([str(BIN / "metalab-train"), *overrides, f"hydra.run.dir={run_dir}"], env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["global_step"] == 1 and 0 <= results["test/acc"] <= 1
    assert "_target_: metalab.algorithms.cosinemeans.CosineMeans" in (run_dir / ".hydra" / "config.yaml").read_text()


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
