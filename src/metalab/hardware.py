"""The hardware a run asks for (trainer.devices, num_nodes, accelerator, strategy), checked
against what this machine and launcher can give, before any work starts."""

import os

import torch

from metalab.errors import ConfigError, check_meta_batch_split, check_positive


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which a container or taskset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def require_positive_int(cfg: dict, key: str) -> None:
    check_positive(key, cfg.get(key), 5)


def device_count(trainer_cfg: dict) -> int:
    """Processes per node the trainer asks for (devices may be a count, a list of ids or "auto")."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if devices in ("auto", -1):
        return max(torch.cuda.device_count(), 1) if trainer_cfg.get("accelerator") in ("gpu", "cuda") else 1
    return devices


def world_size(trainer_cfg: dict) -> int:
    """Training processes in all: devices per node times nodes."""
    return device_count(trainer_cfg) * trainer_cfg.get("num_nodes", 1)


def launched_by_cluster() -> bool:
    """True inside processes that SLURM or torchrun started (they set the ranks; Lightning launches nothing)."""
    return "SLURM_NTASKS" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def check_hardware(trainer_cfg: dict) -> None:
    """Impossible hardware requests fail here, naming the value and the fix, not deep inside Lightning."""
    accelerator = trainer_cfg.get("accelerator", "cpu")
    devices = trainer_cfg.get("devices", 1)
    strategy = trainer_cfg.get("strategy", "auto")
    nodes = trainer_cfg.get("num_nodes", 1)
    if not (
        devices in ("auto", -1)
        or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1)
        or (isinstance(devices, (list, tuple)) and devices)
    ):
        raise ConfigError(
            f"trainer.devices={devices!r} must be a positive count, a list of GPU ids or auto; "
            f"set e.g. trainer.devices=2"
        )
    if "num_nodes" in trainer_cfg:
        require_positive_int(trainer_cfg, "num_nodes")
    count = device_count(trainer_cfg)
    if accelerator in ("gpu", "cuda"):
        available = torch.cuda.device_count()
        if available == 0:
            raise ConfigError(
                f"trainer.accelerator={accelerator} (hardware=gpu, ddp or slurm) but no CUDA GPU is "
                f"visible here; use hardware=cpu, or hardware=ddp_cpu for several CPU processes"
            )
        if count > available:
            raise ConfigError(
                f"trainer.devices={devices} but only {available} GPU(s) are visible; set trainer.devices<={available}"
            )
        if "bf16" in str(trainer_cfg.get("precision")) and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                f"trainer.precision={trainer_cfg['precision']} but this GPU has no bfloat16; "
                f"set trainer.precision=16-mixed or 32-true"
            )
    elif accelerator == "cpu":
        cores = os.cpu_count() or 1
        if count > cores:
            raise ConfigError(
                f"trainer.devices={devices} asks for {count} CPU processes but this machine has "
                f"{cores} core(s); set trainer.devices<={cores}"
            )
    if count * nodes > 1 and strategy != "ddp":
        raise ConfigError(
            f"trainer.devices={devices} with trainer.num_nodes={nodes} needs trainer.strategy=ddp, "
            f"not {strategy!r}; use hardware=ddp (GPUs) or hardware=ddp_cpu (CPU processes)"
        )
    if nodes > 1 and not launched_by_cluster():
        raise ConfigError(
            f"trainer.num_nodes={nodes} needs a cluster to start the processes on every node; "
            f"launch with hardware=slurm (metalab-train -m hardware=slurm ...) or torchrun, "
            f"or set trainer.num_nodes=1"
        )


def check_distributed(cfg: dict, multirun: bool, launcher: str) -> None:
    """DDP splits each meta-batch evenly, and cannot be re-launched from inside a Hydra multirun."""
    world = world_size(cfg["trainer"])
    if world == 1:
        return
    check_meta_batch_split(cfg["meta_batch_size"], world)
    # The fixed episodes go to the processes a batch at a time: each process needs one.
    for key in ("val_episodes", "test_episodes"):
        episodes, per_batch = cfg.get(key) or 0, cfg["eval_batch_size"]
        if 0 < episodes and -(-episodes // per_batch) < world:
            raise ConfigError(
                f"{key}={episodes} in batches of eval_batch_size={per_batch} gives fewer batches than the {world} "
                f"DDP processes, so one would have none; set eval_batch_size to at most {episodes // world}"
            )
    # Lightning's DDP starts the other processes by re-running the command line, which a
    # Hydra multirun job cannot do. A cluster launcher starts every process itself.
    if multirun and not launched_by_cluster() and "submitit" not in launcher:
        raise ConfigError(
            f"trainer.devices={cfg['trainer'].get('devices')} (DDP) cannot run inside a local multirun (-m): "
            f"Lightning re-launches the command line for the other processes. Run each setting as its own "
            f"metalab-train command without -m, or launch the sweep on SLURM with hardware=slurm, which starts "
            f"every job's processes itself"
        )
