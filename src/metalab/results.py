"""Reading finished runs: their results, overrides, logged curves and per-episode values, and
the paired comparison of two runs on the same fixed test episodes.

Shared by scripts/compare.py, scripts/summarize_sweep.py and scripts/reproduce.py.
"""

import csv
import json
import math
from pathlib import Path

import yaml

from metalab.errors import MetalabError
from metalab.provenance import TEST_EPISODES_FILE, comparable_identity


class NotPaired(MetalabError):
    """Two runs were not meta-tested on the same episodes, so they cannot be compared episode by episode."""


# ---------------------------------------------------------------- run directories
def overrides_of(run_dir: Path) -> list[str]:
    """The command-line overrides Hydra recorded for the run (`key=value`, in the given order)."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(path.read_text()) or []) if path.is_file() else []


def as_dict(overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides if "=" in o)


def varying_overrides(override_dicts: list[dict[str, str]]) -> list[str]:
    """The override keys whose value differs between runs (what tells their rows apart), sorted."""
    return sorted(
        {k for overrides in override_dicts for k in overrides if len({other.get(k) for other in override_dicts}) > 1}
    )


def label(overrides: dict[str, str], varying: list[str]) -> str:
    """A run's short name among others: the overrides that vary, `key=value` with the key's last part."""
    return " ".join(f"{key.rsplit('.', 1)[-1]}={overrides[key]}" for key in varying if key in overrides)


def per_episode(run_dir: Path) -> dict | None:
    """The run's test_episodes.json ({"episodes": identity, "episode": [...], "values": {...}}), if any."""
    path = Path(run_dir) / TEST_EPISODES_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------- logged scalars (TensorBoard or CSV)
def scalar_series(run_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    """Every logged value of `tag` against the step, from the run's TensorBoard events or, where
    the run logged to CSV (Lightning's CSVLogger metrics.csv), from those."""
    run_dir = Path(run_dir)
    points: dict[int, float] = {}
    events = sorted(run_dir.glob("**/events.out.tfevents.*"))
    if events:
        # Here: TensorBoard's reader is slow to import, and only runs that logged events need it
        # (scripts/compare.py, reproduce.py read results without it).
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        for path in events:
            accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every point
            accumulator.Reload()
            if tag in accumulator.Tags().get("scalars", []):
                points.update((event.step, event.value) for event in accumulator.Scalars(tag))
    for path in sorted(run_dir.glob("**/metrics.csv")):
        with path.open(newline="") as rows:
            for row in csv.DictReader(rows):
                if row.get(tag) not in (None, "") and row.get("step") not in (None, ""):
                    points[int(float(row["step"]))] = float(row[tag])
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def logged_seconds(run_dir: Path) -> float | None:
    """The time the run's TensorBoard event files span, each from its first logged value to its
    last, summed: the training time of a run resumed in its own directory, whose every part
    (each process) wrote files of its own there; None when it logged no values."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    spans = []
    for path in sorted(Path(run_dir).glob("**/events.out.tfevents.*")):
        times = [event.wall_time for event in EventFileLoader(str(path)).Load() if event.HasField("summary")]
        if times:
            spans.append(max(times) - min(times))
    return sum(spans) if spans else None


# ---------------------------------------------------------------- paired comparison
def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (two-sided 95%).

    Found by bisection on the closed-form t distribution for integer df (Abramowitz & Stegun
    26.7.3-4: P(|T| <= t) as a finite sum in θ = atan(t/√df)), so no scipy is needed.
    """
    if df < 1:
        raise ValueError(f"df={df}: a paired CI needs at least 2 episodes")

    def central(t: float) -> float:  # P(|T| <= t)
        theta = math.atan(t / math.sqrt(df))
        c2 = math.cos(theta) ** 2
        if df % 2 == 0:
            term, total = 1.0, 1.0
            for k in range(2, df, 2):  # 1·3···(k-1) / 2·4···k · cos^k θ
                term *= (k - 1) / k * c2
                total += term
            return math.sin(theta) * total
        if df == 1:
            return 2 * theta / math.pi
        term, total = 1.0, 1.0
        for k in range(3, df, 2):  # 2·4···(k-1) / 3·5···k · cos^(k-1) θ
            term *= (k - 1) / k * c2
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)

    low, high = 0.0, 1.0
    while central(high) < 0.95:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if central(middle) < 0.95 else (low, middle)
        if high - low < 1e-12:
            break
    return (low + high) / 2


def shared_episodes(a: dict | None, b: dict | None, names: tuple[str, str] = ("first run", "second run")) -> list[int]:
    """The test episodes two runs both evaluated; NotPaired, saying why, when they share none."""
    for record, name in zip((a, b), names):
        if record is None:
            raise NotPaired(
                f"{name} has no per-episode values ({TEST_EPISODES_FILE}); it predates them: "
                f"re-run metalab-eval on its checkpoint to record them"
            )
    first, second = comparable_identity(a["episodes"]), comparable_identity(b["episodes"])
    if first != second:
        differ = sorted(k for k in set(first) | set(second) if first.get(k) != second.get(k))
        detail = ", ".join(f"{k}: {first.get(k)!r} vs {second.get(k)!r}" for k in differ)
        raise NotPaired(f"{names[0]} and {names[1]} were not tested on the same episodes ({detail})")
    common = sorted(set(a["episode"]) & set(b["episode"]))
    if len(common) < 2:
        raise NotPaired(f"{names[0]} and {names[1]} share {len(common)} test episode(s); a paired CI needs 2 or more")
    return common


def paired_difference(
    a: dict, b: dict, metric: str, names: tuple[str, str] = ("first run", "second run"), metric_b: str | None = None
) -> dict:
    """Mean per-episode difference a − b of `metric` over the episodes both runs were tested on,
    with its paired 95% CI: t(0.975, n−1) · s_d / √n, where s_d is the standard deviation of
    the n per-episode differences. `metric_b`: b's name for the measure, where it differs (MAML's
    one-step MSE `one_step/mse` against Meta-SGD's `mse`)."""
    common = shared_episodes(a, b, names)
    metric_b = metric if metric_b is None else metric_b
    for record, name, key in zip((a, b), names, (metric, metric_b)):
        if key not in record["values"]:
            raise NotPaired(f"{name} has no per-episode {key!r}; it has {', '.join(sorted(record['values']))}")
    value_a = dict(zip(a["episode"], a["values"][metric]))
    value_b = dict(zip(b["episode"], b["values"][metric_b]))
    differences = [value_a[j] - value_b[j] for j in common]
    n = len(differences)
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    return {
        "metric": metric,
        "mean": mean,
        "ci95": t_quantile_975(n - 1) * sd / math.sqrt(n),
        "episodes": n,
        "mean_a": sum(value_a[j] for j in common) / n,
        "mean_b": sum(value_b[j] for j in common) / n,
    }
