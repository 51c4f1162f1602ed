"""Runs that survive faults: atomic checkpoints, kill -9 and resume, clear errors for bad checkpoints."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from metalab.callbacks import RandomState
from metalab.checkpoint import AtomicCheckpointIO
from metalab.errors import ConfigError, StorageError
from metalab.settings import CONFIG_DIR
from metalab.validation import check_train_config, resolve

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------- atomic checkpoint files
def test_a_failed_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "weights": torch.arange(10.0)}, path)

    def crash(fd):  # the machine dies after part of the new file was written
        raise OSError("simulated crash mid-save")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(StorageError, match=f"cannot write {path}: simulated"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(10**6)}, path)
    monkeypatch.undo()
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["weights"], torch.arange(10.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


SAVER = """
import sys, torch
from metalab.checkpoint import AtomicCheckpointIO
io, step = AtomicCheckpointIO(), 0
while True:
    step += 1
    io.save_checkpoint({"step": step, "weights": torch.full((2_000_000,), float(step))}, sys.argv[1])
"""


@pytest.mark.slow  # a process that imports Lightning, for a property the test above shows in-process
def test_sigkill_during_saves_never_leaves_a_broken_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(path)])
    try:
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # several 8 MB saves in flight
    finally:
        saver.send_signal(signal.SIGKILL)
        saver.wait()
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] >= 1 and torch.all(loaded["weights"] == loaded["step"])


# ---------------------------------------------------------------- random state in checkpoints
def test_random_state_is_saved_and_restored():
    callback = RandomState()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = callback.state_dict()
    first = (torch.rand(3), np.random.rand(3), random.random())
    callback.load_state_dict(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


# ---------------------------------------------------------------- kill -9, then resume
# MAML on sinusoid, a checkpoint every 10 outer steps; the run is killed soon after its first
# one, far from the end (300 steps), and resumed from last.ckpt.
RUN = [
    "trainer.max_steps=300",
    "trainer.val_check_interval=100",
    "val_episodes=10",
    "test_episodes=30",
    "callbacks.model_checkpoint.every_n_train_steps=10",
    "trainer.deterministic=true",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "meta_batch_size=8",
]


def command(log_dir: Path, *extra: str) -> list[str]:
    return [str(BIN / "metalab-train"), f"paths.log_dir={log_dir}", *RUN, *extra]


def results(log_dir: Path) -> dict:
    (path,) = log_dir.rglob("results.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir) -> dict:
    """The uninterrupted run the interrupted ones must reproduce."""
    log_dir = tmp_path_factory.mktemp("straight")
    proc = subprocess.run(
        command(log_dir), check=False, env=run_env(cache_dir), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results(log_dir)


def run_env(cache_dir: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "METALAB_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1", **extra}


def start_and_wait_for_a_checkpoint(log_dir: Path, env: dict) -> subprocess.Popen:
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "stderr.txt", "w") as stderr:  # a file, not a pipe: a full pipe would stall the run
        victim = subprocess.Popen(command(log_dir), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 120
    while not list(log_dir.rglob("last.ckpt")) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return victim


def assert_same_run(resumed: dict, straight: dict) -> None:
    assert resumed["global_step"] == straight["global_step"] == 300
    # The episode stream, optimizer, best-checkpoint record and random state resumed where they
    # stopped: the very same meta-test figures, to the last bit.
    for key in ("test/mse", "test/mse_ci95", "test/mse_before"):
        assert resumed[key] == straight[key], key
    a = torch.load(resumed["last_checkpoint"], weights_only=True)["state_dict"]
    b = torch.load(straight["last_checkpoint"], weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["test/mse"] < straight["test/mse_before"]  # and it learned something


def test_a_run_killed_with_sigkill_resumes_to_the_same_final_metrics(tmp_path, cache_dir, straight):
    env = run_env(cache_dir)
    killed_dir = tmp_path / "killed"
    victim = start_and_wait_for_a_checkpoint(killed_dir, env)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not list(killed_dir.rglob("results.json")), "the run ended before it could be killed"
    (last,) = killed_dir.rglob("last.ckpt")
    stopped_at = torch.load(last, weights_only=True)["global_step"]
    assert 10 <= stopped_at < 300 and stopped_at % 10 == 0

    resumed_dir = tmp_path / "resumed"
    proc = subprocess.run(
        command(resumed_dir, f"ckpt_path={last}"),
        check=False,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(results(resumed_dir), straight)


# SLURM as a requeued job sees it: the same job id, and SLURM_RESTART_COUNT=1 the second time.
SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "1",
    "SLURM_JOB_NAME": "metalab-test",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


def test_sigterm_saves_the_state_exits_nonzero_and_a_requeued_slurm_job_resumes_by_itself(
    tmp_path, cache_dir, straight
):
    env = run_env(cache_dir, **SLURM)
    victim = start_and_wait_for_a_checkpoint(tmp_path, env)
    victim.send_signal(signal.SIGTERM)  # what SLURM sends a job it pre-empts, before SIGKILL
    victim.wait(timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert victim.returncode == 143, stderr[-3000:]  # 128 + SIGTERM: the scheduler sees the run did not finish
    run_dir = tmp_path / "train" / "runs" / "slurm-4242"
    last = run_dir / "checkpoints" / "last.ckpt"
    stopped_at = torch.load(last, weights_only=True)["global_step"]
    assert 10 <= stopped_at < 300  # the state at the step it stopped, not only the last periodic save
    assert stderr.strip().splitlines()[-1] == (
        f"metalab: error: stopped by SIGTERM at step {stopped_at}; its state is saved in {last}; "
        "a requeued SLURM job resumes from it by itself"
    )
    assert not (run_dir / "results.json").exists()

    # Requeued: the very same command line, no ckpt_path; it finds its run directory and resumes.
    proc = subprocess.run(
        command(tmp_path),
        check=False,
        env={**env, "SLURM_RESTART_COUNT": "1"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"metalab: requeued SLURM job: resuming from {last}" in proc.stderr
    assert [d.name for d in (tmp_path / "train" / "runs").iterdir()] == ["slurm-4242"]
    assert not (run_dir / "error.txt").exists()  # the first attempt's, gone once the run finished
    assert_same_run(results(tmp_path), straight)


# ---------------------------------------------------------------- a real write failure
def under_a_file_size_limit():  # in the child: writes past 20 kB fail with EFBIG instead of killing it
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_a_checkpoint_the_os_refuses_to_write_is_one_line_and_leaves_no_temporary_file(tmp_path, cache_dir):
    # The operating system really refuses the write (no injection): the first checkpoint is
    # larger than the limit, as a checkpoint is larger than what is left on a full disk.
    proc = subprocess.run(
        command(tmp_path, "trainer.max_steps=20", "trainer.val_check_interval=10"),
        check=False,
        env=run_env(cache_dir),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=under_a_file_size_limit,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("metalab: error: cannot write ") and ".ckpt: File too large (" in last_line
    assert "Traceback" not in proc.stderr
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    (error_file,) = tmp_path.rglob("error.txt")
    assert error_file.read_text().strip() == last_line


# ---------------------------------------------------------------- bad checkpoints: refused before any work
def train_config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return resolve(compose("train", overrides=["paths.run_dir=unused", *overrides]))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b"PK\x03\x04 half a file"), "not a readable PyTorch checkpoint"),
        (lambda p: torch.save({"state_dict": {}}, p), "not a metalab checkpoint"),
    ],
)
def test_train_refuses_a_bad_ckpt_path_before_any_work(make, message, tmp_path):
    path = tmp_path / "last.ckpt"
    make(path)
    with pytest.raises(ConfigError, match=f"ckpt_path={path}.*{message}"):
        check_train_config(train_config(f"ckpt_path={path}"))
