"""scripts/compare.py: runs paper settings, then writes the table beside the papers' figures and a PNG."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_compare_runs_experiments_and_writes_table_and_learning_curves(tmp_path):
    out, plot = tmp_path / "comparison.md", tmp_path / "curves.png"
    command = [
        sys.executable,
        str(REPO / "scripts" / "compare.py"),
        "run",
        "metasgd_sinusoid_5shot",
        "--set",
        "trainer.max_steps=40",
        "trainer.val_check_interval=20",
        "trainer.log_every_n_steps=5",
        "val_episodes=10",
        "test_episodes=20",
        f"paths.cache_dir={tmp_path}",
        "--log-dir",
        str(tmp_path / "logs"),
        "--out",
        str(out),
        "--plot",
        str(plot),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
    assert finished.returncode == 0, finished.stderr[-2000:]
    results = json.loads(next((tmp_path / "logs").glob("**/results.json")).read_text())
    row = next(line for line in out.read_text().splitlines() if line.startswith("| metasgd"))
    # Ours (from results.json) beside the paper's figure recorded in the experiment config.
    assert f"{results['test/mse']:.2f} ± {results['test/mse_ci95']:.2f}" in row and "| 0.90 |" in row
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000

    # Reading the finished run gives the same table.
    again = tmp_path / "again.md"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "compare.py"),
            "read",
            str(tmp_path / "logs"),
            "--out",
            str(again),
            "--plot",
            str(tmp_path / "again.png"),
        ],
        check=True,
        capture_output=True,
    )
    assert again.read_text() == out.read_text()


# ---------------------------------------------------------------- finished runs made up on disk (no training)
sys.path.insert(0, str(REPO / "scripts"))
import compare  # noqa: E402

from metalab.results import paired_difference, t_quantile_975  # noqa: E402


def fake_run(
    run_dir: Path,
    overrides: list[str],
    seed: int = 0,
    test_acc: float = 0.9,
    per_episode: list | None = None,
    eval_seed: int = 0,
    val: tuple = ((100, 0.5, 0.05), (200, 0.7, 0.04), (300, 0.8, 0.03)),
) -> Path:
    """A metalab-train run directory as the commands leave it, with its validation curve in metrics.csv."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run_dir / "config.yaml").write_text(
        "paper:\n  metric: test/acc\n  value: 98.7\n  ci95: 0.4\n  source: x\ndataset:\n  metric: acc\n"
    )
    setting = {"algorithm": "maml", "dataset": "omniglot", "test_ways": 5, "test_shots": 1, "seed": seed}
    (run_dir / "results.json").write_text(
        json.dumps(
            {"test/acc": test_acc, "test/acc_ci95": 0.01, "config": setting, "global_step": 300, "wall_time_sec": 120.0}
        )
    )
    lines = ["step,train/loss,val/acc,val/acc_ci95"] + [f"{s},{1 / s},{v},{c}" for s, v, c in val]
    (run_dir / "csv").mkdir()
    (run_dir / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    if per_episode is not None:
        identity = {
            "dataset": {"name": "omniglot"},
            "split": "test",
            "eval_seed": eval_seed,
            "test_ways": 5,
            "test_shots": 1,
            "test_queries": 15,
        }
        (run_dir / "test_episodes.json").write_text(
            json.dumps({"episodes": identity, "episode": list(range(len(per_episode))), "values": {"acc": per_episode}})
        )
    return run_dir


def compare_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def test_rows_are_labelled_by_the_varying_override_and_seeds_are_grouped(tmp_path):
    sweep = tmp_path / "sweep"
    for job, (lr, seed, acc) in enumerate([("0.01", 0, 0.90), ("0.01", 1, 0.94), ("0.1", 0, 0.80), ("0.1", 1, 0.70)]):
        fake_run(
            sweep / str(job), ["algorithm=maml", f"algorithm.inner_lr={lr}", f"seed={seed}"], seed=seed, test_acc=acc
        )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    finished = compare_cli("read", str(sweep), cwd=elsewhere)
    assert finished.returncode == 0, finished.stderr
    rows = [line for line in (sweep / "comparison.md").read_text().splitlines() if "inner_lr=" in line]
    # One row per setting, named by the override that tells them apart, over both seeds:
    # the mean and the standard deviation over the seeds (92 ± 2.83, 75 ± 7.07).
    assert len(rows) == 2
    assert rows[0].startswith("| inner_lr=0.01 |") and "| 92.00 ± 2.83 | 0,1 |" in rows[0]
    assert rows[1].startswith("| inner_lr=0.1 |") and "| 75.00 ± 7.07 | 0,1 |" in rows[1]
    # Written into the sweep's directory, not the current one.
    assert (sweep / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(elsewhere.iterdir())


def test_paired_difference_and_its_ci_match_a_hand_computation(tmp_path):
    a = [0.8, 0.9, 1.0, 0.7, 0.6]
    b = [0.7, 0.9, 0.8, 0.7, 0.4]
    # By hand: differences 0.1, 0, 0.2, 0, 0.2; mean 0.1; sample sd sqrt(0.04/4 + ...) = sqrt(0.01) = 0.1;
    # t(0.975, 4) = 2.776445; CI half-width 2.776445 * 0.1 / sqrt(5) = 0.124166.
    assert t_quantile_975(4) == pytest.approx(2.776445, abs=1e-6)
    assert t_quantile_975(999) == pytest.approx(1.962341, abs=1e-6)
    assert t_quantile_975(1) == pytest.approx(12.7062, abs=1e-4)
    run_a = fake_run(tmp_path / "a", ["algorithm=maml"], per_episode=a)
    run_b = fake_run(tmp_path / "b", ["algorithm=protonet"], per_episode=b)
    d = paired_difference(compare.per_episode(run_a), compare.per_episode(run_b), "acc")
    assert d["mean"] == pytest.approx(0.1) and d["ci95"] == pytest.approx(0.124166, abs=1e-6) and d["episodes"] == 5
    finished = compare_cli("paired", str(run_a), str(run_b), cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert "+10.000 ± 12.417 percentage points" in finished.stdout and "over 5 shared test episodes" in finished.stdout


@pytest.mark.parametrize(
    "change,message",
    [
        ({"eval_seed": 1}, r"not tested on the same episodes \(eval_seed: 0 vs 1\)"),
        ({"per_episode": None}, r"has no per-episode values \(test_episodes.json\)"),
    ],
)
def test_runs_on_different_episodes_are_refused_in_one_line(tmp_path, change, message):
    run_a = fake_run(tmp_path / "a", ["algorithm=maml"], per_episode=[0.8, 0.9, 1.0])
    run_b = fake_run(tmp_path / "b", ["algorithm=protonet"], **{"per_episode": [0.7, 0.9, 0.8], **change})
    finished = compare_cli("paired", str(run_a), str(run_b), cwd=tmp_path)
    assert finished.returncode == 2 and finished.stdout == ""
    assert len(finished.stderr.strip().splitlines()) == 1 and "Traceback" not in finished.stderr
    assert re.search(message, finished.stderr), finished.stderr


def test_learning_curve_has_every_validation_point_and_its_ci_band(tmp_path, monkeypatch):
    val = tuple((step, 0.5 + step / 4000, 0.02) for step in range(100, 1100, 100))  # ten validations
    run_dir = fake_run(tmp_path / "run", ["algorithm=maml"], val=val)
    drawn = {}
    import matplotlib.axes

    original_fill = matplotlib.axes.Axes.fill_between
    original_plot = matplotlib.axes.Axes.plot

    def fill_between(self, x, low, high, **kwargs):
        drawn["band"] = (list(x), list(low), list(high))
        return original_fill(self, x, low, high, **kwargs)

    def plot(self, x, y, *args, **kwargs):
        drawn.setdefault("lines", []).append((list(x), list(y)))
        return original_plot(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", fill_between)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    compare.plot(compare.group_by_seed([compare.describe(run_dir)]), tmp_path / "curves.png")
    steps, values = drawn["lines"][1]  # the validation curve (the first is the training loss)
    assert steps == [s for s, _, _ in val] and values == pytest.approx([v * 100 for _, v, _ in val])
    band_steps, low, high = drawn["band"]
    assert band_steps == steps and high[0] - low[0] == pytest.approx(2 * 2.0)


def test_a_transfer_baseline_pairs_with_episodic_learners_but_a_sequence_run_does_not():
    """dataset.episodes=global_labels changes the training images only: the baselines' test
    episodes are the few-shot ones every learner meets, so they pair (also as recorded by runs
    made before the identity left it out); sequences are other episodes."""
    from metalab.provenance import test_episodes_identity
    from metalab.results import NotPaired, shared_episodes

    def run(**dataset) -> dict:
        config = {
            "dataset": {"name": "omniglot", "image_size": 28, **dataset},
            "eval_seed": 0,
            "test_ways": 5,
            "test_shots": 1,
            "test_queries": 15,
        }
        return {"episodes": test_episodes_identity(config), "episode": [0, 1, 2]}

    protonet, baseline = run(), run(episodes="global_labels")
    assert shared_episodes(baseline, protonet) == [0, 1, 2]
    recorded_before = {**baseline, "episodes": {**baseline["episodes"], "dataset": {**run()["episodes"]["dataset"]}}}
    recorded_before["episodes"]["dataset"]["episodes"] = "global_labels"
    assert shared_episodes(recorded_before, protonet) == [0, 1, 2]
    with pytest.raises(NotPaired, match="not tested on the same episodes"):
        shared_episodes(run(episodes="sequence"), protonet)


def test_runs_pair_across_dataset_settings_added_later_and_across_the_two_ways_of_naming_one_cut():
    """A run recorded before `resample` and `test_unseen_by` existed met the episodes a new run
    meets at their defaults; `protocol=finn test_unseen_by=vinyals` and `protocol=vinyals
    test_unseen_by=finn` deal the same classes in one order. Other resampling or no cut: other
    episodes."""
    from metalab.provenance import test_episodes_identity
    from metalab.results import NotPaired, shared_episodes

    def run(**dataset) -> dict:
        config = {
            "dataset": {"name": "omniglot", "protocol": "vinyals", "image_size": 28, "invert": True, **dataset},
            "eval_seed": 0,
            "test_ways": 5,
            "test_shots": 1,
            "test_queries": 15,
        }
        return {"episodes": test_episodes_identity(config), "episode": [0, 1, 2]}

    recorded_before = run()
    assert shared_episodes(run(test_unseen_by=None, resample="lanczos"), recorded_before) == [0, 1, 2]
    finn_cut = run(protocol="finn", test_unseen_by="vinyals", resample="lanczos")
    # Recorded as the run set it (the README's protocol column reads it); compared in one form.
    assert finn_cut["episodes"]["dataset"]["protocol"] == "finn"
    assert finn_cut["episodes"]["dataset"]["test_unseen_by"] == "vinyals"
    assert shared_episodes(finn_cut, run(protocol="vinyals", test_unseen_by="finn")) == [0, 1, 2]
    for other in (
        run(protocol="finn"),
        run(protocol="vinyals", test_unseen_by="sung"),
        run(protocol="vinyals", test_unseen_by="finn", resample="binary_nearest"),
    ):
        with pytest.raises(NotPaired, match="not tested on the same episodes"):
            shared_episodes(finn_cut, other)
