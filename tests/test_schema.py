"""Every setting is checked before any work against what the code that takes it declares.

Each case here reached Lightning, torch or NumPy before (a traceback after the data had loaded,
or exit 0 with the setting ignored); each is now one line naming the setting, exit status 2,
and no checkpoint or results written.
"""

import os
import typing
from pathlib import Path

import pytest
from preloaded_cli import run_command

from metalab.errors import ConfigError
from metalab.schema import check_against_signature, described, fits

BIN = Path(os.sys.executable).parent
QUIET = ["trainer.enable_progress_bar=false", "logger=none", "trainer.max_steps=3", "val_episodes=2", "test_episodes=2"]

CASES = {
    "seed-not-whole": (["seed=1.5"], "seed=1.5 must be a whole number from 0 to 4294967295"),
    "seed-negative": (["seed=-1"], "seed=-1 must be a whole number"),
    "seed-too-large": ([f"seed={2**32}"], f"seed={2**32} must be a whole number"),
    "eval-seed": (["eval_seed=-3"], "eval_seed=-3 must be a whole number"),
    "val-interval-zero": (["trainer.val_check_interval=0"], "trainer.val_check_interval=0 must be above 0"),
    "val-interval-fraction": (["trainer.val_check_interval=2.5"], "at most 1.0; give a whole number"),
    "trainer-unknown": (["+trainer.bogus=1"], "trainer.bogus is not a setting of trainer"),
    "trainer-misspelt": (["+trainer.max_step=3"], "did you mean trainer.max_steps?"),
    "trainer-set-by-metalab": (["+trainer.logger=false"], "trainer.logger is set by metalab"),
    "precision": (["trainer.precision=banana"], "trainer.precision=banana is not 64, 32, 16, transformer-engine"),
    "trainer-negative": (["trainer.log_every_n_steps=-5"], "trainer.log_every_n_steps=-5 cannot be negative"),
    "trainer-type": (
        ["trainer.deterministic=sometimes"],
        "trainer.deterministic=sometimes is not true, false, warn or null",
    ),
    "checkpoint-every": (
        ["callbacks.model_checkpoint.every_n_train_steps=-2"],
        "callbacks.model_checkpoint.every_n_train_steps=-2 must be 0 or more",
    ),
    "checkpoint-unknown": (["+callbacks.model_checkpoint.sav_last=true"], "did you mean"),
    "lr-float32": (["algorithm.optimizer.lr=1e300"], "does not fit in float32"),
    "inner-lr-float32": (["algorithm.inner_lr=-1e39"], "algorithm.inner_lr=-1e+39 does not fit in float32"),
    "hidden-channels": (
        ["backbone=conv4", "backbone.hidden_channels=0"],
        "backbone.hidden_channels=0 is made of sizes, each at least 1",
    ),
    "hidden-sizes": (["backbone.hidden_sizes=[40,0]"], "backbone.hidden_sizes=[40, 0] is made of sizes"),
    "backbone-type": (["backbone=conv4", "backbone.global_average=maybe"], "backbone.global_average=maybe"),
    "algorithm-type": (["algorithm.inner_steps=true"], "algorithm.inner_steps=true is not an integer"),
    "algorithm-word": (["algorithm.inner_lr=fast"], "algorithm.inner_lr=fast is not a number"),
    "optimizer-type": (["+algorithm.optimizer.amsgrad=often"], "algorithm.optimizer.amsgrad=often is not"),
    "scheduler-step-size": (
        ["algorithm=protonet", "dataset=omniglot", "algorithm.scheduler.step_size=0"],
        "algorithm.scheduler.step_size=0 counts steps, so at least 1",
    ),
    # What Lightning checks in its own code, beyond its signature's types: refused as it builds the trainer.
    "max-time": (["+trainer.max_time=bogus"], "Lightning refuses the trainer.* settings: `Timer(duration='bogus')`"),
    "val-interval-word": (["trainer.val_check_interval=abc"], "Invalid time format for `val_check_interval`: 'abc'"),
    "profiler": (["+trainer.profiler=bogus"], "string value for the `profiler` parameter of `Trainer`"),
    "episodes-beyond-memory": (["val_episodes=100000000000000000000"], "val_episodes=100000000000000000000 fixed"),
    "lightning-clipping": (["+trainer.gradient_clip_val=1"], "clip the meta-gradient with algorithm.grad_clip=<norm>"),
    "lightning-accumulation": (["+trainer.accumulate_grad_batches=2"], "take more tasks per outer step"),
    "negative-clip": (["algorithm.grad_clip=-1"], "algorithm.grad_clip=-1 must be a positive number, or null for none"),
    "negative-rate-lr": (
        ["algorithm=mamlpp", "algorithm.step_lr_lr=-0.001"],
        "algorithm.step_lr_lr=-0.001 must be a positive number",
    ),
    "top-level-added": (["+anything=1"], "+anything=1 adds the setting anything, which no code reads"),
    "paths-added": (["+paths.foo=2"], "+paths.foo=2 adds the setting paths.foo"),
}


@pytest.mark.parametrize("overrides, message", CASES.values(), ids=CASES.keys())
def test_a_bad_setting_is_one_line_before_any_work(tmp_path, cache_dir, data_dir, overrides, message):
    env = {**os.environ, "METALAB_DATA_DIR": str(data_dir), "METALAB_CACHE_DIR": str(cache_dir)}
    args = [str(BIN / "metalab-train"), f"paths.log_dir={tmp_path}", *QUIET, *overrides]
    proc = run_command(args, env=env, cwd=Path.cwd(), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metalab: error: "), proc.stderr[-2000:]
    assert message in lines[0], lines[0]
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("results.json"))


def test_each_setting_the_code_declares_is_checked_without_a_check_written_for_it():
    class Learner:  # a new class with a new argument: checked by its annotations alone
        def __init__(self, *, widths: list[int], mode: typing.Literal["fast", "exact"], rate: float | None = None):
            pass

    check_against_signature("algorithm", {"widths": [1, 2], "mode": "fast", "rate": None}, Learner)
    with pytest.raises(ConfigError, match="algorithm.mode=slow is not fast or exact"):
        check_against_signature("algorithm", {"mode": "slow"}, Learner)
    with pytest.raises(ConfigError, match=r"algorithm.widths=3 is not a list"):
        check_against_signature("algorithm", {"widths": 3}, Learner)
    with pytest.raises(ConfigError, match="did you mean algorithm.rate"):
        check_against_signature("algorithm", {"rates": 0.1}, Learner)


def test_types_read_from_annotations():
    assert fits(True, bool) and not fits(1, bool) and not fits(True, int) and fits(3, float)
    assert fits(None, int | None) and not fits("a", int | None)
    assert fits("16-mixed", typing.Literal["16-mixed", "32-true"]) and not fits(16, typing.Literal["16"])
    assert described(typing.Literal["a", "b"] | None) == "a, b or null"


# ---------------------------------------------------------------- memory, before the first step
def test_a_meta_batch_that_cannot_fit_is_refused_before_any_step(tmp_path, cache_dir, data_dir):
    env = {**os.environ, "METALAB_DATA_DIR": str(data_dir), "METALAB_CACHE_DIR": str(cache_dir)}
    args = [str(BIN / "metalab-train"), f"paths.log_dir={tmp_path}", *QUIET, "meta_batch_size=100000000"]
    proc = run_command(args, env=env, cwd=Path.cwd(), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert "meta_batch_size=100000000 needs at least" in line and "set meta_batch_size=" in line, line
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("processes", [1, 4])
def test_the_meta_batch_advised_is_one_that_fits(tmp_path, processes):
    from test_learners import sinusoid_setup

    from metalab.memory import check_meta_batch_fits, saved_bytes_of_one_task

    model, datamodule = sinusoid_setup(tmp_path)  # 20,000 steps: the compiled path, measured eagerly
    assert model.compiled
    per_task = saved_bytes_of_one_task(model, datamodule.example_batch("train", tasks=1))
    assert per_task > 0
    available = per_task * 10 + per_task // 2  # room for ten tasks and a half
    with pytest.raises(ConfigError, match=r"set meta_batch_size=(\d+) or less") as refused:
        check_meta_batch_fits(model, datamodule, 48, processes, "cpu", available=available)
    advised = int(refused.value.args[0].rsplit("meta_batch_size=", 1)[1].split()[0])
    assert advised == 10 // processes * processes  # a multiple of the DDP processes, which split the batch
    check_meta_batch_fits(model, datamodule, advised, processes, "cpu", available=available)  # accepted


@pytest.fixture(scope="module")
def sinusoid_checkpoint(tmp_path_factory, data_dir, cache_dir) -> Path:
    from preloaded_cli import trained_briefly

    quiet = ("trainer.val_check_interval=4", "val_episodes=2", "test_episodes=2", "logger=none")
    return trained_briefly(tmp_path_factory.mktemp("trained"), 4, *quiet, data_dir=data_dir, cache_dir=cache_dir)


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval_seed=-1", "eval_seed=-1 must be a whole number"),
        ("trainer.precision=banana", "trainer.precision=banana is not 64, 32, 16"),
        ("+trainer.max_time=bogus", "Lightning refuses the trainer.* settings"),
        ("test_episodes=100000000000000000000", "test_episodes=100000000000000000000 fixed episodes need"),
    ],
    ids=["eval-seed", "precision", "max-time", "huge-count"],
)
def test_metalab_eval_checks_its_settings_the_same_way(
    tmp_path, sinusoid_checkpoint, data_dir, cache_dir, override, message
):
    from preloaded_cli import metalab_command

    proc = metalab_command(
        "metalab-eval",
        f"ckpt_path={sinusoid_checkpoint}",
        f"paths.log_dir={tmp_path}",
        override,
        data_dir=data_dir,
        cache_dir=cache_dir,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("metalab: error: ") and message in line, line
    assert not list(tmp_path.rglob("results.json"))
