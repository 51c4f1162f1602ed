"""The documented settings: where conf/ is, and the defaults its yaml files give.

The bottom layer: it imports only `errors` and `yaml`, so the learners, the data and the
validation above can all read the paper settings without importing one another.
"""

import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from metalab.errors import ConfigError


def _config_dir() -> str:
    """conf/: METALAB_CONFIG_DIR (e.g. a copy with groups of your own), else the copy installed with
    the package (metalab/conf, pyproject.toml maps it there), else the source checkout's, beside src/."""
    if os.environ.get("METALAB_CONFIG_DIR"):
        return os.environ["METALAB_CONFIG_DIR"]
    installed = Path(__file__).resolve().parent / "conf"
    return str(installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "conf")


CONFIG_DIR = _config_dir()

# The run's episode settings, named once: the checks, the data module (runner.build_datamodule)
# and metalab-eval's overridable settings (eval.OVERRIDABLE) are built from these.
TRAIN_EPISODE_KEYS = ("ways", "shots", "queries", "meta_batch_size")
TEST_EPISODE_KEYS = ("test_ways", "test_shots", "test_queries")
EVALUATION_KEYS = ("val_episodes", "test_episodes", "eval_batch_size")  # how many fixed episodes, how batched
SEED_KEYS = ("seed", "eval_seed")
EPISODE_SETTINGS = (*TRAIN_EPISODE_KEYS, *TEST_EPISODE_KEYS, *EVALUATION_KEYS, *SEED_KEYS)
POSITIVE_EPISODE_KEYS = (*TRAIN_EPISODE_KEYS, *TEST_EPISODE_KEYS, *EVALUATION_KEYS)

# Algorithm settings that every learner's outer step reads (algorithms/base.py), whether or not
# the learner's own conf/algorithm/<name>.yaml lists them.
SHARED_ALGORITHM_KEYS = ("name", "_target_", "optimizer", "scheduler", "grad_clip", "compile")
# Dataset settings every dataset takes: the episode kind, which a learner's yaml sets (data/datamodule.py).
SHARED_DATASET_KEYS = ("name", "episodes")


def group_defaults(group: str, name: str) -> dict | None:
    """The `group` settings conf/<group>/<name>.yaml gives (following its defaults list); None
    when there is no such file (a config directory of the user's own)."""
    path = Path(CONFIG_DIR) / group / f"{name}.yaml"
    if not path.is_file():
        return None
    text = path.read_text()
    content = yaml.safe_load(text) or {}
    settings: dict = {}
    for entry in content.pop("defaults", None) or []:
        if isinstance(entry, str) and entry != "_self_":
            settings.update(group_defaults(group, entry) or {})
    # A `@package _global_` file (every dataset; baseline, mann) sets `<group>:` beside other keys.
    own = content.get(group, {}) if "@package _global_" in text else content
    return {**settings, **own}


def with_group_defaults(group: str, section: Mapping) -> dict:
    """`section` (a run's `algorithm`, `backbone` or `dataset` settings) with every setting its
    conf/<group>/<name>.yaml gives filled in where it is absent. A Hydra-composed run has them
    all already; this serves configs written by hand (tests, scripts). Values that need the
    run's config to mean anything (`${...}` interpolations, `???`) are not filled in. Unchanged
    where there is no such file (a config directory of the user's own)."""
    name = section.get("name")
    defaults = group_defaults(group, name) if isinstance(name, str) else None
    usable = {
        key: value
        for key, value in (defaults or {}).items()
        if not (isinstance(value, str) and ("${" in value or value == "???"))
    }
    return {**usable, **section}


def check_group_keys(group: str, section: dict, shared: tuple[str, ...]) -> None:
    """Every key under `group` is one its yaml file or the shared code defines: any other one
    (`+algorithm.first_ordr=true`, `+dataset.image_sise=32`) would be read by no code, so it is
    refused, listing the keys that act. The yaml is the list: it cannot drift from a hand-kept one."""
    name = section.get("name")
    defaults = group_defaults(group, name) if isinstance(name, str) else None
    if defaults is None:
        return
    accepted = list(dict.fromkeys([*defaults, *shared]))
    unknown = sorted(set(section) - set(accepted))
    if unknown:
        removals = " ".join(f"~{group}.{key}" for key in unknown)
        raise ConfigError(
            f"{group}={name} has no setting {', '.join(unknown)}, so it would be ignored; its "
            f"settings are {', '.join(accepted)}; remove with {removals}"
        )
