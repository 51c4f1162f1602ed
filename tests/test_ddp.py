"""Multi-process training: DDP on 2 CPU processes (gloo) gives what one process gives.

The 2-process runs are started as torchrun would start them (RANK/WORLD_SIZE/MASTER_* in each
process's environment), so Lightning's DDP joins them instead of re-launching pytest. The
command-line path, where Lightning re-launches `metalab-train`, is tested with MAML.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning import Trainer
from lightning.pytorch.strategies import DDPStrategy
from test_cli import results, run

from metalab.algorithms import ALGORITHMS
from metalab.errors import ConfigError
from metalab.hardware import check_distributed, check_hardware
from metalab.runner import build_datamodule, guarded
from metalab.settings import CONFIG_DIR
from metalab.validation import resolve

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
# Tiny settings: several outer steps of each learner in a few seconds. Plain SGD, because
# Adam divides by the gradient's running magnitude and so blows float rounding in near-zero
# gradients (e.g. of always-blank pixels) up to visible weight differences.
SGD = ["algorithm.optimizer._target_=torch.optim.SGD", "algorithm.optimizer.lr=0.05"]
SETTINGS = {
    "maml": [
        "algorithm=maml",
        *SGD,
        "dataset=sinusoid",
        "meta_batch_size=4",
        "shots=5",
        "queries=5",
        "val_episodes=10",
        "eval_batch_size=3",
        "algorithm.eval_inner_steps=2",
    ],
    "protonet": [
        "algorithm=protonet",
        *SGD,
        "dataset=omniglot",
        "ways=5",
        "shots=1",
        "queries=2",
        "meta_batch_size=4",
        "val_episodes=10",
        "eval_batch_size=3",
        "backbone=mlp",
        "backbone.hidden_sizes=[32]",
    ],
}


def setup(name: str, cache_dir: str, data_dir: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "paths.run_dir=unused",
                f"paths.cache_dir={cache_dir}",
                f"paths.data_dir={data_dir}",
                *SETTINGS[name],
            ],
        )
    config = resolve(cfg)
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    torch.manual_seed(0)  # the same initial weights in every process
    model = ALGORITHMS[config["algorithm"]["name"]].from_config(
        config, list(datamodule.input_shape), datamodule.task_type
    )
    return model, datamodule


def fit_and_validate(name: str, cache_dir: str, data_dir: str, processes: int) -> dict:
    """Train STEPS outer steps, then validate on the fixed episodes; weights and validation figures."""
    model, datamodule = setup(name, cache_dir, data_dir)
    strategy = DDPStrategy(process_group_backend="gloo") if processes > 1 else "auto"
    trainer = Trainer(
        accelerator="cpu",
        devices=processes,
        strategy=strategy,
        max_steps=STEPS,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        inference_mode=False,
        deterministic=True,
    )
    trainer.fit(model, datamodule=datamodule)
    trainer.limit_val_batches = 1.0
    validated = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "val": validated,
        "episodes": model.eval_episodes["val"],
        "per_episode": model.eval_per_episode["val"],
        "tasks": model.train_tasks,
        "rank": trainer.global_rank,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(name: str, cache_dir: Path, data_dir: Path, out: Path) -> dict:
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "NODE_RANK": "0",
            "LOCAL_RANK": str(rank),
            "RANK": str(rank),
            "OMP_NUM_THREADS": "1",
        }
        args = [sys.executable, __file__, name, str(cache_dir), str(data_dir), str(out)]
        procs.append(
            subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    return torch.load(out, weights_only=False)


def assert_same_trained_weights(trained: dict, reference: dict, initial: dict) -> None:
    for key, value in reference.items():
        torch.testing.assert_close(trained[key], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(reference[k], initial[k]) for k in reference), "training did not change the weights"


@pytest.mark.data
def test_protonet_on_two_ddp_processes_matches_one_process(tmp_path, cache_dir, data_dir):
    two = run_two_processes("protonet", cache_dir, data_dir, tmp_path / "ddp.pt")
    one = fit_and_validate("protonet", str(cache_dir), str(data_dir), processes=1)
    # Each process trained on half of every meta-batch ...
    assert two["tasks"] * 2 == one["tasks"] == STEPS * 4
    # ... and the averaged meta-gradient is the whole meta-batch's: the same parameters.
    initial = setup("protonet", str(cache_dir), str(data_dir))[0].state_dict()
    assert_same_trained_weights(two["weights"], one["weights"], initial)
    # The fixed validation episodes were split over the processes and gathered: every one
    # of them counted exactly once, so the mean and its CI are the single process's.
    assert two["episodes"] == one["episodes"] == 10
    for key, value in one["val"].items():
        assert two["val"][key] == pytest.approx(value, rel=1e-5), key
    # Each episode's own value comes back in episode order (rank 0 had batches 0-2 and 6-8, rank 1
    # 3-5 and 9), so runs can be compared episode by episode whatever their process count.
    assert two["per_episode"]["episode"] == one["per_episode"]["episode"] == list(range(10))
    assert two["per_episode"]["values"]["acc"] == pytest.approx(one["per_episode"]["values"]["acc"], abs=1e-6)
    assert len(set(one["per_episode"]["values"]["acc"])) > 1  # distinct episodes: a reordering would show


# ---------------------------------------------------------------- configuration checks (no processes)
def config_with(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return resolve(compose("train", overrides=["paths.run_dir=unused", *overrides]))


def test_meta_batch_must_split_evenly_over_processes():
    config = config_with("hardware=ddp_cpu", "trainer.devices=2", "meta_batch_size=25")
    with pytest.raises(ConfigError, match=r"meta_batch_size=25 .* multiple of 2"):
        check_distributed(config, multirun=False, launcher="")
    check_distributed(config_with("hardware=ddp_cpu", "meta_batch_size=24"), multirun=False, launcher="")


def test_too_few_evaluation_batches_for_the_processes_are_refused():
    config = config_with(
        "hardware=ddp_cpu", "trainer.devices=2", "meta_batch_size=24", "val_episodes=10", "eval_batch_size=20"
    )
    with pytest.raises(ConfigError, match="val_episodes=10 in batches of eval_batch_size=20 .* at most 5"):
        check_distributed(config, multirun=False, launcher="")
    check_distributed(
        config_with(
            "hardware=ddp_cpu", "trainer.devices=2", "meta_batch_size=24", "val_episodes=10", "eval_batch_size=5"
        ),
        multirun=False,
        launcher="",
    )


def test_local_multirun_with_ddp_is_refused_with_what_to_do_instead(monkeypatch):
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    config = config_with("hardware=ddp_cpu", "meta_batch_size=24")
    basic = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    with pytest.raises(ConfigError, match=r"multirun \(-m\).*without -m.*hardware=slurm"):
        check_distributed(config, multirun=True, launcher=basic)
    # SLURM starts every process of every job itself: nothing is re-launched.
    check_distributed(config, multirun=True, launcher="hydra_plugins.hydra_submitit_launcher.SlurmLauncher")
    # One process per job is a plain sweep.
    check_distributed(config_with("hardware=cpu"), multirun=True, launcher=basic)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["hardware=ddp_cpu", "trainer.devices=4096"], "trainer.devices=4096 asks for 4096 CPU processes"),
        (["hardware=ddp_cpu", "trainer.devices=0"], "trainer.devices=0 must be a positive count"),
        (["hardware=ddp_cpu", "trainer.strategy=auto"], "needs trainer.strategy=ddp"),
        (["hardware=ddp_cpu", "trainer.num_nodes=2"], "trainer.num_nodes=2 needs a cluster"),
    ]
    + (
        []
        if torch.cuda.is_available()
        else [
            (["hardware=gpu"], "trainer.accelerator=gpu .* no CUDA GPU is visible here; use hardware=cpu"),
            (["hardware=ddp"], "no CUDA GPU is visible here; use hardware=cpu, or hardware=ddp_cpu"),
        ]
    ),
)
def test_impossible_hardware_is_refused_naming_the_value(overrides, message, monkeypatch):
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    with pytest.raises(ConfigError, match=message):
        check_hardware(config_with(*overrides)["trainer"])


def test_slurm_launcher_ties_tasks_and_gpus_per_node_to_the_trainer():
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed: pip install -e '.[slurm]'"
    )
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train", overrides=["hardware=slurm", "trainer.devices=4", "trainer.num_nodes=2"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_
    assert launcher.tasks_per_node == launcher.gpus_per_node == cfg.trainer.devices == 4
    assert launcher.nodes == cfg.trainer.num_nodes == 2
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu"


# ---------------------------------------------------------------- the command line: Lightning re-launches it
@pytest.mark.slow  # kept out of the default run for its time (10-minute budget); `make test-full` runs it
def test_maml_metalab_train_on_two_cpu_processes_matches_one_process(tmp_path, cache_dir, data_dir):
    env = {**os.environ, "METALAB_DATA_DIR": str(data_dir), "METALAB_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    run(
        "metalab-train",
        "hardware=ddp_cpu",
        "logger=none",
        f"trainer.max_steps={STEPS}",
        "trainer.val_check_interval=2",
        "test_episodes=25",
        *SETTINGS["maml"],
        env=env,
        log_dir=tmp_path / "train",
    )
    trained_run = results(tmp_path / "train")  # one result, written by rank 0
    assert trained_run["world_size"] == 2 and trained_run["global_step"] == STEPS
    # 25 test episodes in batches of 3 over 2 processes (5 and 4 batches): each counted once.
    assert trained_run["test_episodes_evaluated"] == 25
    assert trained_run["test/mse"] > 0 and trained_run["test/mse_ci95"] > 0
    # The same weights as one process on whole meta-batches (seed 0 for both).
    trained = torch.load(trained_run["last_checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    one = fit_and_validate("maml", str(cache_dir), str(data_dir), processes=1)
    assert_same_trained_weights(trained, one["weights"], setup("maml", str(cache_dir), str(data_dir))[0].state_dict())

    # metalab-eval on 2 processes: one results.json, every episode once, the training run's meta-test score.
    evaluated = {}
    for hardware in ("ddp_cpu", "cpu"):
        run(
            "metalab-eval",
            f"ckpt_path={trained_run['tested_checkpoint']}",
            f"hardware={hardware}",
            "logger=none",
            env=env,
            log_dir=tmp_path / f"eval_{hardware}",
        )
        evaluated[hardware] = results(tmp_path / f"eval_{hardware}")
    assert evaluated["ddp_cpu"]["world_size"] == 2 and evaluated["ddp_cpu"]["test_episodes_evaluated"] == 25
    for evaluation in evaluated.values():
        assert evaluation["test/mse"] == pytest.approx(trained_run["test/mse"], rel=1e-5)
        assert evaluation["test/mse_ci95"] == pytest.approx(trained_run["test/mse_ci95"], rel=1e-5)
    # Rank 0 wrote each episode's values, gathered from both processes in episode order.
    episodes = {
        name: json.loads(next((tmp_path / name).rglob("test_episodes.json")).read_text())
        for name in ("train", "eval_ddp_cpu", "eval_cpu")
    }
    assert all(e["episode"] == list(range(25)) for e in episodes.values())
    for name in ("train", "eval_ddp_cpu"):
        assert episodes[name]["values"]["mse"] == pytest.approx(episodes["eval_cpu"]["values"]["mse"], rel=1e-5)


def test_a_command_ends_the_process_group_before_the_interpreter_exits(tmp_path):
    # CI once saw a successful 2-process run abort at exit (-6) with gloo's threads still alive.
    if torch.distributed.is_initialized():
        pytest.skip("a process group from another test is still open")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert guarded(lambda cfg: 0.5, None) == 0.5
    assert not torch.distributed.is_initialized()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)

    def crashing_command(cfg):
        raise RuntimeError("a bug")

    with mock.patch("metalab.runner.HydraConfig") as hydra, pytest.raises(RuntimeError, match="a bug"):
        hydra.get.return_value.mode = "a single run"  # not a sweep: the traceback goes through
        guarded(crashing_command, None)
    assert not torch.distributed.is_initialized()


if __name__ == "__main__":  # one of the two DDP processes of test_two_ddp_processes_match_one_process
    name, cache, data, out = sys.argv[1:]
    result = fit_and_validate(name, cache, data, processes=2)
    if result["rank"] == 0:
        torch.save(result, out)
    torch.distributed.destroy_process_group()  # gloo's threads must stop before the interpreter exits
