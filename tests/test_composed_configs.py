"""Every paper setting composes to the config it always had, key for key.

tests/data/composed_configs.json holds the fully composed and resolved config of every
conf/experiment/ file (`experiment=<name>`) and of every pair conf/paper_defaults/ serves
(`algorithm=<a> dataset=<d>`). A result in results/ names its experiment; this keeps that name
reproducing the config that made it, whatever way the files under conf/ are organised.

Two compositions of the same overrides differ only in paths that belong to a run, not to its
setting: `paths.run_dir` is the run's own directory (Hydra's output directory, named by the start
time; unset outside a run), and `paths.data_dir`/`paths.cache_dir` come from METALAB_DATA_DIR and
METALAB_CACHE_DIR. The snapshot pins them (run_dir to a placeholder, the two variables unset)
rather than dropping them, so the keys built from them (checkpoint and logger directories) are
compared too.

After a deliberate change to a paper setting, regenerate the snapshot and commit it with the reason:
    python tests/test_composed_configs.py --write
"""

import json
import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
SNAPSHOT = Path(__file__).resolve().parent / "data" / "composed_configs.json"
RUN_DIR = "RUN_DIR"
ENVIRONMENT = ("METALAB_DATA_DIR", "METALAB_CACHE_DIR")


def settings() -> dict[str, list[str]]:
    """Each snapshot entry's name and the overrides that compose it."""
    experiments = {f"experiment={p.stem}": [f"experiment={p.stem}"] for p in sorted(CONF.glob("experiment/*.yaml"))}
    pairs = {}
    for path in sorted(CONF.glob("paper_defaults/*.yaml")):
        algorithm, dataset = next(
            (a, path.stem[len(a) + 1 :])
            for a in sorted((p.stem for p in CONF.glob("algorithm/*.yaml")), key=len, reverse=True)
            if path.stem.startswith(f"{a}_")
        )
        pairs[f"algorithm={algorithm} dataset={dataset}"] = [f"algorithm={algorithm}", f"dataset={dataset}"]
    return experiments | pairs


def flat(tree: dict, prefix: str = "") -> dict:
    """{"a.b.c": value}: one entry per leaf, so a difference names its key."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def composed_all() -> dict[str, dict]:
    saved = {name: os.environ.pop(name) for name in ENVIRONMENT if name in os.environ}
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return {
                name: flat(
                    OmegaConf.to_container(
                        compose("train", overrides=[f"paths.run_dir={RUN_DIR}", *overrides]), resolve=True
                    )
                )
                for name, overrides in settings().items()
            }
    finally:
        os.environ.update(saved)


@pytest.fixture(scope="module")
def snapshot() -> dict:
    return json.loads(SNAPSHOT.read_text())


@pytest.fixture(scope="module")
def now() -> dict:
    return composed_all()


def test_the_snapshot_covers_every_experiment_and_paper_pair(snapshot, now):
    assert sorted(now) == sorted(snapshot)


def test_every_experiment_and_paper_pair_composes_as_in_the_snapshot(snapshot, now):
    differences = {}
    for name in sorted(set(now) & set(snapshot)):
        before, after = snapshot[name], now[name]
        # Compared as JSON, so that 1, 1.0 and true differ.
        changed = {
            key: (before.get(key, "<absent>"), after.get(key, "<absent>"))
            for key in sorted(before.keys() | after.keys())
            if json.dumps(before.get(key, "<absent>")) != json.dumps(after.get(key, "<absent>"))
        }
        if changed:
            differences[name] = changed
    assert not differences, json.dumps(differences, indent=1)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_composed_configs.py --write")
    SNAPSHOT.parent.mkdir(exist_ok=True)
    SNAPSHOT.write_text(json.dumps(composed_all(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
