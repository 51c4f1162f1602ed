"""lightning-hydra-template's conventions on metalab: the debug/ and logger/ groups, tags, the refusal
of trainer=<hardware>, and what a run reports (logging to its own file, progress, no noise)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from lightning import Callback
from preloaded_cli import run_command

from metalab.algorithms import ALGORITHMS
from metalab.callbacks import ProgressLines, StepProgressBar, progress_callbacks
from metalab.runner import build_datamodule, build_trainer
from metalab.settings import CONFIG_DIR
from metalab.validation import resolve

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Sinusoid MAML with the fewest episodes that still run every part of a run.
TINY = ["val_episodes=4", "test_episodes=4", "eval_batch_size=2", "meta_batch_size=2"]


def train(tmp_path: Path, *overrides: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    args = [str(BIN / "metalab-train"), f"paths.log_dir={tmp_path / 'logs'}", *TINY, *overrides]
    env = {**os.environ, "METALAB_CACHE_DIR": str(tmp_path / "cache")}
    if stdout == subprocess.PIPE:
        return run_command(args, env=env, cwd=REPO, timeout=600)
    return subprocess.run(args, stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=600, env=env)


def run_dir_of(tmp_path: Path) -> Path:
    (results,) = (tmp_path / "logs").rglob("results.json")
    return results.parent


def train_config(run_dir: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return resolve(compose("train", overrides=[f"paths.run_dir={run_dir}", *overrides]))


# ---------------------------------------------------------------- debug=
DEBUG = {
    "default": ["trainer.max_steps=6", "trainer.val_check_interval=3"],
    "fdr": [],
    "overfit": ["trainer.max_steps=6", "trainer.val_check_interval=3"],
    "limit": ["eval_batch_size=1"],
    "profiler": ["trainer.max_steps=6", "trainer.val_check_interval=3"],
}


# fdr and overfit in the default run; the rest (~7 s each, the same run with other trainer flags) slow.
@pytest.mark.parametrize(
    "choice",
    [
        choice if choice in ("fdr", "overfit") else pytest.param(choice, marks=pytest.mark.slow)
        for choice in sorted(DEBUG)
    ],
)
def test_each_debug_setup_runs_end_to_end(choice, tmp_path):
    proc = train(tmp_path, f"debug={choice}", *DEBUG[choice])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = run_dir_of(tmp_path)
    assert run_dir.parts[-3:-1] == ("debug", "runs")  # task_name=debug: apart from real runs
    results = json.loads((run_dir / "results.json").read_text())
    trainer = yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]
    assert trainer["detect_anomaly"] and trainer["devices"] == 1 and trainer["accelerator"] == "cpu"
    log = (run_dir / "train.log").read_text()
    if choice == "fdr":  # one outer step, one batch each of validation and test
        assert results["global_step"] == 1 and results["test_episodes_evaluated"] == 2
    elif choice == "limit":  # limit_test_batches=2 of one episode each, out of test_episodes=4
        assert results["global_step"] == 20 and results["test_episodes_evaluated"] == 2
        assert "meta-testing on 2 fixed episodes" in log
    elif choice == "overfit":
        assert results["global_step"] == 6 and "test/mse" not in results  # no meta-test of an overfit model
    else:
        assert results["global_step"] == 6 and "test/mse" in results
    if choice == "profiler":  # SimpleProfiler's table, in the run's own log
        assert "Profiler Report" in log and "run_training_epoch" in log


def test_overfit_replays_the_same_few_meta_batches(tmp_path):
    config = train_config(tmp_path, "debug=overfit", "trainer.max_steps=7", "trainer.val_check_interval=7", *TINY)
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    model = ALGORITHMS["maml"].from_config(config, list(datamodule.input_shape), datamodule.task_type)

    class Record(Callback):
        seen: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append(float(batch.support_x.sum()))

    trainer = build_trainer(config, tmp_path)
    trainer.callbacks.append(Record())
    trainer.fit(model, datamodule=datamodule)
    seen = Record.seen
    assert len(seen) == 7 and len(set(seen[:3])) == 3  # three different meta-batches...
    assert seen[3:6] == seen[:3] and seen[6] == seen[0]  # ...and then the same three again


# ---------------------------------------------------------------- logger=, tags=, the run's own log
def test_a_redirected_run_logs_its_progress_to_the_file_and_its_log(tmp_path):
    output = tmp_path / "run.out"
    with open(output, "w") as file:  # `metalab-train ... > run.out`
        proc = train(
            tmp_path,
            "logger=many",
            "tags=[smoke,h15]",
            "trainer.max_steps=40",
            "trainer.val_check_interval=20",
            stdout=file,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = run_dir_of(tmp_path)
    printed, log = output.read_text(), (run_dir / "train.log").read_text()
    for text in (printed, log):
        assert "step 2/40 (5%) | train/loss " in text and "step 40/40 (100%)" in text
        assert "tasks/s | ETA " in text and "validation at step 20: val/mse " in text
        assert "test/mse = " in text and "results: " in text
    assert "[metalab][INFO] - step 20/40 (50%)" in log  # timed, named lines in the file
    # The config as a tree, plain text in a file.
    assert "├── algorithm" in printed and "\x1b[" not in printed
    # No drawn progress bar, no Lightning advertisement, no deprecation warning.
    everything = printed + proc.stderr + log
    for noise in ("Epoch 0/-2", "Tip:", "LeafSpec", "deprecated", "\r"):
        assert noise not in everything, noise
    # logger=many: TensorBoard and CSV, the tags in both and in results.json.
    results = json.loads((run_dir / "results.json").read_text())
    assert results["tags"] == ["smoke", "h15"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    header, *rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    assert "val/mse" in header.split(",") and "test/mse" in header.split(",") and rows
    assert yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())["tags"] == "smoke,h15"


MISSING_EXTRAS = [name for name in ("wandb", "mlflow") if __import__("importlib").util.find_spec(name) is None]
HABITS = {
    "trainer=gpu": "to choose the hardware use hardware=<cpu|gpu|ddp|ddp_cpu|slurm>, e.g. hardware=gpu",
    "trainer=ddp": "e.g. hardware=ddp",
    "tags=oops": "tags='oops' must be a list of words; set e.g. tags=[baseline,omniglot]",
}


@pytest.mark.parametrize("name", MISSING_EXTRAS)
def test_a_logger_whose_package_is_missing_is_refused_naming_the_extra(name, tmp_path):
    proc = train(tmp_path, f"logger={name}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"metalab: error: logger={name} needs the {name} package, which is not installed; install it with "
        f"pip install -e '.[{name}]', or choose logger=tensorboard or csv"
    ]
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("override,message", HABITS.items())
def test_template_habits_that_do_not_apply_are_refused_in_one_line(override, message, tmp_path):
    proc = train(tmp_path, override)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_trainval_runs_no_validation_even_where_the_trainer_limits_it(tmp_path):
    # debug=limit sets trainer.limit_val_batches=2; trainval=true has nothing to validate on.
    config = train_config(tmp_path, "debug=limit", "trainval=true")
    assert config["trainer"]["limit_val_batches"] == 2
    trainer = build_trainer({**config, "callbacks": {}, "logger": {}}, tmp_path, with_callbacks=False)
    assert trainer.limit_val_batches == 0


# ---------------------------------------------------------------- the progress bar on a terminal
def test_on_a_terminal_one_bar_counts_the_steps_of_max_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    bar, lines = progress_callbacks(enable_progress_bar=True)
    assert isinstance(bar, StepProgressBar) and isinstance(lines, ProgressLines) and not lines.console
    assert [type(c) for c in progress_callbacks(enable_progress_bar=False)] == [ProgressLines]

    config = train_config(tmp_path, "trainer.max_steps=5", "trainer.val_check_interval=5", *TINY)
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    model = ALGORITHMS["maml"].from_config(config, list(datamodule.input_shape), datamodule.task_type)
    trainer = build_trainer({**config, "callbacks": {}, "logger": {}}, tmp_path, with_callbacks=False)
    (bar,) = [c for c in trainer.callbacks if isinstance(c, StepProgressBar)]

    class Watch(Callback):  # the bar's state after the last step, before Lightning hides it
        def on_train_end(self, trainer, pl_module):
            task = bar.progress.tasks[bar.train_progress_bar_id]
            self.shown = (task.description.strip(), task.completed, task.total)

    watch = Watch()
    trainer.callbacks.append(watch)
    trainer.fit(model, datamodule=datamodule)
    assert watch.shown == ("Meta-training", 5, 5)


def test_an_evaluation_records_its_own_tags(tmp_path):
    from metalab.eval import evaluation_config

    trained = train_config(tmp_path, "tags=[trained]")
    command = {"ckpt_path": "x.ckpt", "paths": {}, "trainer": {}, "logger": None, "tags": ["cross", "eval"]}
    assert evaluation_config(command, trained, [1], [])["tags"] == ["cross", "eval"]


# ---------------------------------------------------------------- logging cost
def test_training_scalars_are_logged_only_on_the_steps_the_logger_writes(tmp_path, monkeypatch):
    """Each self.log call costs about a millisecond; a step whose scalars Lightning would not write
    makes none. The CSV logger still gets every step it got before: each log_every_n_steps-th."""
    config = train_config(
        tmp_path,
        "trainer.max_steps=12",
        "trainer.val_check_interval=12",
        "trainer.log_every_n_steps=5",
        "logger=csv",
        *TINY,
    )
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    model = ALGORITHMS["maml"].from_config(config, list(datamodule.input_shape), datamodule.task_type)
    logged_at: set[int] = set()
    original = type(model).log

    def counting_log(self, name, *args, **kwargs):
        if name.startswith("train/"):
            logged_at.add(self.global_step)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(type(model), "log", counting_log)
    trainer = build_trainer(config, tmp_path)
    trainer.fit(model, datamodule=datamodule)
    # Steps counted from 1: the first (progress lines), every 5th, and the last.
    assert logged_at == {1, 5, 10, 12}
    header, *rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    loss_steps = [
        int(row.split(",")[columns.index("step")]) for row in rows if row.split(",")[columns.index("train/loss")]
    ]
    assert loss_steps == [4, 9]  # Lightning's 0-based step of the 5th and 10th outer steps
