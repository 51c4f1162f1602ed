"""Resuming with a changed setting: it acts, or it is refused by name; a value recorded is a value used."""

from pathlib import Path

import pytest
import torch
import yaml
from preloaded_cli import resumed, trained_briefly

STEP_LR = "algorithm.scheduler={_target_:torch.optim.lr_scheduler.StepLR,step_size:4,gamma:0.5}"
SHORT = [
    "trainer.val_check_interval=8",
    "val_episodes=2",
    "test_episodes=2",
    "meta_batch_size=2",
    "logger=none",
    "callbacks.model_checkpoint.every_n_train_steps=8",
    STEP_LR,
]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, data_dir, cache_dir) -> Path:
    return trained_briefly(tmp_path_factory.mktemp("first"), 8, *SHORT, data_dir=data_dir, cache_dir=cache_dir)


def test_a_changed_learning_rate_and_schedule_act_on_resume(tmp_path, first_run, data_dir, cache_dir):
    before = torch.load(first_run, weights_only=True)
    # 8 steps of StepLR(4, 0.5) from 0.001: the rate is a quarter of it.
    assert before["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.001 * 0.25)
    run = tmp_path / "resumed"
    done = resumed(
        run,
        first_run,
        9,
        *SHORT,
        "algorithm.optimizer.lr=0.004",
        "+algorithm.optimizer.betas=[0.5,0.9]",
        "algorithm.scheduler.step_size=5",
        data_dir=data_dir,
        cache_dir=cache_dir,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    after = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    group = after["optimizer_states"][0]["param_groups"][0]
    schedule = after["lr_schedulers"][0]
    # The schedule went on from where it was, scaled to the new base rate; step 9 is no multiple of 5.
    assert group["initial_lr"] == schedule["base_lrs"][0] == 0.004
    assert group["lr"] == pytest.approx(0.004 * 0.25)
    assert tuple(group["betas"]) == (0.5, 0.9) and schedule["step_size"] == 5
    recorded = yaml.safe_load((run / "config.yaml").read_text())["algorithm"]
    assert recorded["optimizer"]["lr"] == 0.004 and recorded["scheduler"]["step_size"] == 5


def test_a_changed_seed_is_refused_by_name_on_resume(tmp_path, first_run, data_dir, cache_dir):
    refused = resumed(tmp_path / "resumed", first_run, 9, *SHORT, "seed=1", data_dir=data_dir, cache_dir=cache_dir)
    assert refused.returncode == 2, refused.stderr[-2000:]
    (line,) = refused.stderr.strip().splitlines()
    assert "was trained with seed=0, not 1" in line
    assert not (tmp_path / "resumed" / "checkpoints").exists()
