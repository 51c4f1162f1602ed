"""Turn a Hydra config into a plain dict and reject bad values before any work starts."""

import sys
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from metalab.checkpoint import read_checkpoint
from metalab.errors import ConfigError

EPISODE_KEYS = ("ways", "shots", "queries", "meta_batch_size")
EVAL_KEYS = ("test_ways", "test_shots", "test_queries", "test_episodes", "val_episodes", "eval_batch_size")


def resolve(cfg: DictConfig) -> dict:
    """The fully resolved config as plain Python containers; missing values are a ConfigError."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        key = error.full_key
        raise ConfigError(f"{key} has no value; set it on the command line, e.g. {key}=<value>") from None
    except InterpolationResolutionError as error:
        raise ConfigError(f"could not resolve the config: {error}") from None


def require_positive_int(cfg: dict, key: str) -> None:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer; set e.g. {key}=5")


def require_positive_number(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name}={value!r} must be a positive number; set e.g. {name}=0.001")


def check_hardware(trainer_cfg: dict) -> None:
    """A GPU request on a machine without one fails here, not deep inside Lightning."""
    accelerator = trainer_cfg.get("accelerator", "cpu")
    devices = trainer_cfg.get("devices", 1)
    if accelerator in ("gpu", "cuda"):
        available = torch.cuda.device_count()
        if available == 0:
            raise ConfigError("hardware=gpu but no CUDA GPU is visible here; use hardware=cpu")
        if isinstance(devices, int) and devices > available:
            raise ConfigError(
                f"trainer.devices={devices} but only {available} GPU(s) are visible; set trainer.devices<={available}"
            )


def check_algorithm(cfg: dict, algorithms: dict) -> None:
    algorithm = cfg["algorithm"]
    name = algorithm.get("name")
    if name not in algorithms:
        raise ConfigError(f"algorithm={name!r} is unknown; choose one of {sorted(algorithms)}")
    require_positive_number(algorithm["optimizer"].get("lr"), "algorithm.optimizer.lr")
    if "inner_lr" in algorithm:
        require_positive_number(algorithm["inner_lr"], "algorithm.inner_lr")
    for key in ("inner_steps", "eval_inner_steps"):
        if key in algorithm:
            require_positive_int(algorithm, key)


def check_train_config(cfg: dict, algorithms: dict) -> None:
    for key in EPISODE_KEYS + EVAL_KEYS:
        require_positive_int(cfg, key)
    require_positive_int(cfg["trainer"], "max_steps")
    check_algorithm(cfg, algorithms)
    check_hardware(cfg["trainer"])
    if cfg.get("ckpt_path") is not None:
        check_resumable(cfg, read_checkpoint(cfg["ckpt_path"])["hyper_parameters"]["config"])


def check_resumable(cfg: dict, trained: dict) -> None:
    """Resuming needs the same network: the settings that shape the weights must match the checkpoint's."""
    shaping = {"algorithm": lambda c: c["algorithm"]["name"], "backbone": lambda c: c.get("backbone"),
               "dataset": lambda c: c["dataset"]["name"], "ways": lambda c: c["ways"]}
    for key, value_of in shaping.items():
        if value_of(cfg) != value_of(trained):
            raise ConfigError(
                f"ckpt_path={cfg['ckpt_path']} was trained with {key}={value_of(trained)}, not {value_of(cfg)}; "
                f"resume with the checkpoint's {key}, or start a new run without ckpt_path")


def check_learner_fits_data(cfg: dict, learner_cls, task_type: str) -> None:
    ways, test_ways = cfg["ways"], cfg["test_ways"]
    name = cfg["algorithm"]["name"]
    if task_type not in learner_cls.task_types:
        raise ConfigError(
            f"algorithm={name} needs a {' or '.join(learner_cls.task_types)} dataset, "
            f"but dataset={cfg['dataset']['name']} is {task_type}; choose another dataset"
        )
    if learner_cls.fixed_ways and task_type == "classification" and test_ways != ways:
        raise ConfigError(
            f"algorithm={name} has one output per training way, so test_ways={test_ways} must equal ways={ways}; "
            f"set test_ways={ways} (or use a metric learner such as protonet)"
        )


def save_config(cfg: dict, run_dir: Path) -> None:
    """Print the resolved config and keep a copy in the run directory."""
    text = yaml.safe_dump(cfg, sort_keys=False)
    print(text, flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(text)


def report_error(error: Exception, run_dir: Path | None) -> None:
    message = f"metalab: error: {error}"
    print(message, file=sys.stderr, flush=True)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(message + "\n")
