"""Checkpoints shipped inside the package by name (`pretrained:<name>`, metalab/pretrained/).

The mechanism is tested with a checkpoint of a tiny real run, shipped into a temporary
folder that stands in for the package's (the registry folder is monkeypatched), so no test
checkpoint ever lands in the package itself. The shipped ProtoNet itself is checked against the
test episodes its run recorded.
"""

import json
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from learner_checkpoints import omniglot_folders, trained_checkpoint
from preloaded_cli import metalab_command

import metalab
import metalab.pretrained as pretrained
from metalab.checkpoint import read_checkpoint
from metalab.errors import ConfigError
from metalab.predict import main as predict_main
from metalab.pretrained.ship import ship

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = None

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def registry(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "shipped"
    folder.mkdir()
    monkeypatch.setattr(pretrained, "registry_dir", lambda: folder)
    return folder


@pytest.fixture(scope="module")
def protonet_ckpt(tmp_path_factory, data_dir, cache_dir, omniglot_dir) -> Path:
    return trained_checkpoint("protonet", tmp_path_factory, data_dir, cache_dir)


def ship_tiny(registry: Path, checkpoint: Path) -> Path:
    return ship(
        "tiny-protonet",
        checkpoint,
        results="results/none.json (a test run)",
        licence="Omniglot: MIT",
        metric="test/acc",
        value=0.5,
    )


@pytest.mark.data
def test_a_shipped_checkpoint_loads_by_name_and_predicts_as_its_run(registry, protonet_ckpt, tmp_path):
    file = ship_tiny(registry, protonet_ckpt)
    assert file.parent == registry and file.stat().st_size < protonet_ckpt.stat().st_size  # no optimizer state
    index = json.loads((registry / "index.json").read_text())["checkpoints"]
    assert index["tiny-protonet"] == {
        "file": "tiny-protonet.ckpt",
        "results": "results/none.json (a test run)",
        "metric": "test/acc",
        "value": 0.5,
        "data_licence": "Omniglot: MIT",
    }
    torch.load(file, weights_only=True)  # plain tensors and values only
    named, original = metalab.load_learner("pretrained:tiny-protonet"), metalab.load_learner(protonet_ckpt)
    assert named.checkpoint_path == "pretrained:tiny-protonet"
    images = torch.rand(6, 1, 28, 28)
    support = {"a": list(images[:2]), "b": list(images[2:4])}
    torch.testing.assert_close(
        named.adapt(support).predict_proba(images[4:]),
        original.adapt(support).predict_proba(images[4:]),
        rtol=0,
        atol=0,
    )


@pytest.mark.data
def test_metalab_predict_takes_a_name_and_refuses_an_unknown_one(
    registry, protonet_ckpt, omniglot_dir, tmp_path, capsys
):
    ship_tiny(registry, protonet_ckpt)
    support, query = omniglot_folders(omniglot_dir, tmp_path, classes=3, shots=1, queries=2)
    predict_main(
        ["ckpt_path=pretrained:tiny-protonet", f"support={tmp_path / 'support'}", f"query={tmp_path / 'query'}"]
    )
    out = capsys.readouterr().out
    assert all(path.name in out for path in query)
    with pytest.raises(SystemExit) as exit_info:
        predict_main(
            [
                "ckpt_path=pretrained:protonet-omniglot-v9",
                f"support={tmp_path / 'support'}",
                f"query={tmp_path / 'query'}",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err == (
        "metalab: error: ckpt_path=pretrained:protonet-omniglot-v9: no checkpoint named "
        "'protonet-omniglot-v9' ships with metalab; known: pretrained:tiny-protonet"
    )


def test_an_unknown_name_lists_the_known_ones(registry):
    with pytest.raises(ConfigError, match=r"no checkpoint named 'nope' ships with metalab; known: none in this"):
        metalab.load_learner("pretrained:nope")
    (registry / "index.json").write_text(json.dumps({"checkpoints": {"gone": {"file": "gone.ckpt"}}}))
    with pytest.raises(
        ConfigError,
        match=r"pretrained:gone is listed in index.json but its file .*gone.ckpt is "
        r"missing; reinstall metalab",
    ):
        metalab.load_learner("pretrained:gone")


@pytest.mark.data
def test_shipping_keeps_the_safety_rules(registry, protonet_ckpt, tmp_path):
    # Only a genuine, safely loadable metalab checkpoint is shipped...
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"metalab_version": "0.1.0", "hyper_parameters": {"config": {}}, "bad": object()}, pickled)
    with pytest.raises(ConfigError, match="pickled Python objects"):
        ship("bad", pickled, results="-", licence="-")
    with pytest.raises(ConfigError, match="not a valid checkpoint name"):
        ship("../escape", protonet_ckpt, results="-", licence="-")
    assert not any(registry.iterdir())
    # ...and a shipped file naming a class outside the trusted ones is refused when loaded by name.
    file = ship_tiny(registry, protonet_ckpt)
    saved = torch.load(file, weights_only=True)
    saved["hyper_parameters"]["config"]["algorithm"]["optimizer"]["_target_"] = "os.system"
    torch.save(saved, file)
    with pytest.raises(ConfigError, match="names 'os.system' at algorithm.optimizer._target_"):
        metalab.load_learner("pretrained:tiny-protonet")


def test_the_package_ships_its_index_and_checkpoints_as_package_data():
    """What a non-editable install (`pip install .`) copies: setuptools' package-data for
    metalab.pretrained, and the files found through importlib.resources."""
    if tomllib is not None:
        project = tomllib.loads((REPO / "pyproject.toml").read_text())
        shipped = project["tool"]["setuptools"]["package-data"]["metalab.pretrained"]
        assert "*.ckpt" in shipped and "index.json" in shipped
    folder = files("metalab.pretrained")
    assert folder.joinpath("index.json").is_file() and folder.joinpath("__init__.py").is_file()
    assert Path(str(folder)) == pretrained.registry_dir()
    # Every listed checkpoint is there, says where it came from, and loads safely.
    for name, entry in pretrained.entries().items():
        assert {"file", "results", "metric", "value", "data_licence"} <= set(entry), name
        assert folder.joinpath(entry["file"]).is_file(), name
        assert read_checkpoint(f"pretrained:{name}")["state_dict"], name
    # Nothing is shipped that the index does not list.
    listed = {entry["file"] for entry in pretrained.entries().values()}
    assert {p.name for p in Path(str(folder)).glob("*.ckpt")} == listed


@pytest.mark.data
def test_the_shipped_checkpoint_scores_each_test_episode_as_its_run_recorded(data_dir, cache_dir, tmp_path):
    """Speed work must not change a number: metalab-eval of the shipped ProtoNet, on the first
    test episodes of its run, gives the accuracy its run recorded for each, to 1e-6."""
    recorded = json.loads((REPO / "results" / "protonet_omniglot_5w1s_trainval_long.json").read_text())["per_episode"]
    episodes = 40  # two evaluation batches of 20: the run's first 40 episodes
    proc = metalab_command(
        "metalab-eval",
        "ckpt_path=pretrained:protonet-omniglot",
        f"test_episodes={episodes}",
        f"paths.log_dir={tmp_path}",
        data_dir=data_dir,
        cache_dir=cache_dir,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (evaluated_file,) = tmp_path.rglob("test_episodes.json")
    evaluated = json.loads(evaluated_file.read_text())
    assert evaluated["episodes"] == recorded["episodes"]  # the same fixed episodes: split, seed, shape
    assert evaluated["episode"] == recorded["episode"][:episodes]
    assert evaluated["values"]["acc"] == pytest.approx(recorded["values"]["acc"][:episodes], abs=1e-6)
