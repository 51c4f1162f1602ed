"""Sweeps: failing jobs are recorded and skipped, Optuna searches the validation metric, one summary table."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from metalab.settings import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "scripts"))
import summarize_sweep  # noqa: E402 (scripts/ is not a package: importable once on the path)

# MAML on sinusoid, 20 outer steps per job: seconds each, no data needed.
TINY = [
    "trainer.max_steps=20",
    "trainer.val_check_interval=10",
    "val_episodes=10",
    "test_episodes=10",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


def multirun(log_dir: Path, *overrides: str, cache_dir: Path, **environment: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "METALAB_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1", **environment}
    args = [str(BIN / "metalab-train"), "-m", f"paths.log_dir={log_dir}", *TINY, *overrides]
    return subprocess.run(args, check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def sweep_dir(log_dir: Path) -> Path:
    (found,) = (log_dir / "train" / "multiruns").iterdir()
    return found


# A fault inside training, injected into the sweep's process: the jobs with seed=7 raise in their
# first outer step, an exception metalab does not expect (a bug, a library's failure).
INJECTED_FAULT = """
from metalab.algorithms.base import MetaLearner

training_step = MetaLearner.training_step


def faulty(self, batch, batch_idx):
    if self.run_config["seed"] == 7:
        raise RuntimeError("injected fault")
    return training_step(self, batch, batch_idx)


MetaLearner.training_step = faulty
"""


def test_failing_jobs_are_recorded_and_the_others_run_and_are_ranked(tmp_path, cache_dir):
    # 6 jobs: lr=-1 is refused before work (a ConfigError), seed=7 crashes inside training (an
    # unexpected exception, injected); the two good jobs still run.
    fault = tmp_path / "fault"
    fault.mkdir()
    (fault / "sitecustomize.py").write_text(INJECTED_FAULT)
    proc = multirun(
        tmp_path, "algorithm.optimizer.lr=0.001,0.01,-1", "seed=0,7", cache_dir=cache_dir, PYTHONPATH=str(fault)
    )
    # Every job ran; then the sweep exits non-zero, naming each failed job and its error.txt.
    assert proc.returncode == 1, proc.stderr[-3000:]
    root = sweep_dir(tmp_path)
    jobs = {int(p.name): p for p in root.iterdir() if p.name.isdigit()}
    report = proc.stderr[proc.stderr.index("metalab: error: 4 job(s) of the sweep failed (2 finished)") :]
    for n in (1, 3, 4, 5):
        assert f"  job {n} (" in report and str(jobs[n] / "error.txt") in report
    assert "job 0 (" not in report and "job 2 (" not in report
    job_4 = next(line for line in report.splitlines() if line.startswith("  job 4 ("))
    assert "algorithm.optimizer.lr=-1" in job_4 and "seed=0" in job_4  # its overrides name it
    finished = sorted(n for n, p in jobs.items() if (p / "results.json").is_file())
    assert finished == [0, 2]  # lr 0.001 and 0.01 with seed 0 (the last key varies fastest)
    config_error = (jobs[4] / "error.txt").read_text()
    assert "algorithm.optimizer.lr=-1 must be a positive number" in config_error and "Traceback" not in config_error
    crash = (jobs[1] / "error.txt").read_text()
    assert "RuntimeError" in crash and "injected fault" in crash and "Traceback" in crash  # kept for debugging
    assert "traceback in" in proc.stderr and "Traceback" not in proc.stderr

    assert summarize_sweep.main([str(root)]) == 0
    with open(root / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 6
    done = [r for r in rows if r["status"] == "ok"]
    scores = [float(r["val/mse"]) for r in done]
    assert len(done) == 2 and scores == sorted(scores)  # best (lowest error) first
    expected = sorted(json.loads((jobs[n] / "results.json").read_text())["val/mse"] for n in finished)
    assert scores == pytest.approx(expected)
    assert {r["seed"] for r in rows[2:]} >= {"7"} and all(r["status"] != "ok" for r in rows[2:])
    assert "| rank | job |" in (root / "summary.md").read_text()


def test_summarize_refuses_a_directory_without_runs(tmp_path, capsys):
    assert summarize_sweep.main([str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


# ---------------------------------------------------------------- Optuna
optuna_sweeper = pytest.importorskip(
    "hydra_plugins.hydra_optuna_sweeper", reason="the optuna extra is not installed: pip install -e '.[optuna]'"
)


@pytest.mark.parametrize(
    "name,extra", [("maml_optuna", []), ("protonet_optuna", ["algorithm=protonet", "dataset=omniglot"])]
)
def test_every_searched_setting_exists_in_the_config(name, extra):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"hparams_search={name}", *extra], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert "OptunaSweeper" in sweeper._target_ and sweeper.max_failure_rate == 1.0
    # A typo in a searched key would add a setting nothing reads; every key must already exist.
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, key
    assert sweeper.direction == ("maximize" if cfg.dataset.metric_mode == "max" else "minimize")


@pytest.mark.slow  # kept out of the default run for its time (10-minute budget); `make test-full` runs it
def test_optuna_search_optimizes_the_validation_metric(tmp_path, cache_dir):
    proc = multirun(tmp_path, "hparams_search=maml_optuna", "hydra.sweeper.n_trials=3", cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = sweep_dir(tmp_path)
    trials = [json.loads(p.read_text()) for p in sorted(root.glob("*/results.json"))]
    assert len(trials) == 3
    # Each trial returned its best validation error; the study's best is the lowest of them.
    best = yaml.safe_load((root / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(t["val/mse"] for t in trials))
    params = best["best_params"]
    assert 0.001 <= params["algorithm.inner_lr"] <= 1.0 and 1 <= params["algorithm.inner_steps"] <= 5
    searched = [
        {o.split("=")[0]: o.split("=")[1] for o in yaml.safe_load(p.read_text())}
        for p in root.glob("*/.hydra/overrides.yaml")
    ]
    settings = {(s["algorithm.inner_lr"], s["algorithm.inner_steps"], s["algorithm.optimizer.lr"]) for s in searched}
    assert len(settings) == 3  # three different settings were tried
