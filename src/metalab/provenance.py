"""Where a result came from: the machine, the software, and which fixed episodes it was measured on."""

import os
import platform
import subprocess
from pathlib import Path

from metalab import __version__

TEST_EPISODES_FILE = "test_episodes.json"  # beside results.json: the per-episode meta-test values
# Dataset settings that do not change which episodes are drawn (the class that reads the data, which
# `name` names too; checks, downloads, the metric's name).
NOT_EPISODE_SHAPING = ("_target_", "verify_checksums", "download", "metric", "metric_mode")
# Dataset settings added after runs were recorded, at the value that deals the episodes those runs
# met (the only behaviour there was): left out, so a new run at the default pairs with an old one.
DEFAULTS_OLDER_RUNS_MET = {"test_unseen_by": None, "resample": "lanczos"}


def machine() -> dict:
    """CPU model and core count, and the GPU's name where one is visible."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: platform's description
    import torch  # here, so that reading results (scripts/compare.py, reproduce.py) does not load torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu}


def software() -> dict:
    """torch's and metalab's versions, metalab's git commit where it runs from a checkout, and the
    version of every installed package."""
    import torch

    source = Path(__file__).resolve().parent
    commit, dirty = None, None

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=source, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        # Only metalab's own checkout (src/metalab under its top level), not a repository that
        # happens to hold the environment metalab is installed in.
        if Path(git("rev-parse", "--show-toplevel")).resolve() / "src" / "metalab" == source:
            commit = git("rev-parse", "HEAD") or None
            dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass  # an installed package, or no git: the version alone
    return {
        "torch": torch.__version__,
        "metalab": __version__,
        "commit": commit,
        "dirty": dirty,
        "packages": installed_packages(),
    }


def installed_packages() -> dict[str, str]:
    """{package: version} of everything installed beside metalab, by name: what the lock
    (requirements/py<version>.lock, `make lock`) pins, so that a result names the exact set it ran on."""
    from importlib.metadata import distributions

    found = ((d.metadata["Name"], d.version) for d in distributions())
    return dict(sorted((name.lower().replace("_", "-"), version) for name, version in found if name))


def test_episodes_identity(config: dict) -> dict:
    """What fixes a run's meta-test episodes: episode j is drawn from (eval_seed, "test", j) over
    the test split of this dataset, in this shape. Two runs with equal comparable identities
    (comparable_identity) share episode j for every j both evaluated, whatever learner or seed
    trained them. Recorded as the run set it, less what never shapes episodes."""
    return _episode_shaping(
        {
            "dataset": config["dataset"],
            "split": "test",
            "eval_seed": config["eval_seed"],
            "test_ways": config["test_ways"],
            "test_shots": config["test_shots"],
            "test_queries": config["test_queries"],
        }
    )


def _episode_shaping(identity: dict) -> dict:
    """The identity without the NOT_EPISODE_SHAPING settings, and without
    `dataset.episodes=global_labels`, which labels the training images with their global class
    (the transfer baselines) while the test split deals the same few-shot episodes as the
    default `few_shot` (data/sequences.py), so both are left out as the default is."""
    dataset = {k: v for k, v in identity.get("dataset", {}).items() if k not in NOT_EPISODE_SHAPING}
    if dataset.get("episodes") in ("few_shot", "global_labels"):
        del dataset["episodes"]
    return {**identity, "dataset": dataset}


def comparable_identity(identity: dict) -> dict:
    """A recorded test-episode identity (as test_episodes_identity makes it, or as an older run
    recorded it) in the form runs are compared by (results.shared_episodes): only what shapes
    episodes; settings added later left out at the value older runs met; and the two protocols a
    `test_unseen_by` cut names, in either order (`protocol=finn test_unseen_by=vinyals` deals
    what `protocol=vinyals test_unseen_by=finn` deals, data/omniglot.py)."""
    identity = _episode_shaping(identity)
    dataset = {
        k: v
        for k, v in identity["dataset"].items()
        if not (k in DEFAULTS_OLDER_RUNS_MET and v == DEFAULTS_OLDER_RUNS_MET[k])
    }
    if dataset.get("test_unseen_by"):  # the classes both protocols hold out, in one order whichever trained
        dataset["test_classes_held_out_by"] = sorted([dataset.pop("protocol"), dataset.pop("test_unseen_by")])
    return {**identity, "dataset": dataset}
