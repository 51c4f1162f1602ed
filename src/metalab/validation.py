"""Turn a Hydra config into a plain dict and reject bad values before any work starts.

Beside the runner: it reads the learners (their classes and settings), the backbones, the
checkpoint a resume names and the settings' yaml files, and is read by metalab-train and
metalab-eval only.
"""

import importlib.util

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from metalab import schema
from metalab.algorithms import learner_class
from metalab.algorithms.base import METRICS
from metalab.backbones import backbone_options
from metalab.checkpoint import RUN_GROUPS, read_checkpoint
from metalab.errors import ConfigError, check_choice, check_positive
from metalab.hardware import check_hardware, require_positive_int
from metalab.memory import check_episode_counts
from metalab.settings import (
    POSITIVE_EPISODE_KEYS,
    SHARED_ALGORITHM_KEYS,
    SHARED_DATASET_KEYS,
    check_group_keys,
    with_group_defaults,
)


def resolve(cfg: DictConfig) -> dict:
    """The fully resolved config as plain Python containers; missing values are a ConfigError."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        key = error.full_key
        raise ConfigError(f"{key} has no value; set it on the command line, e.g. {key}=<value>") from None
    except InterpolationResolutionError as error:
        raise ConfigError(f"could not resolve the config: {error}") from None


def check_algorithm_keys(algorithm: dict, learner_cls) -> None:
    """Every algorithm setting acts or is refused: a key no code reads, and a setting the learner
    fixes by definition (fomaml's first_order), which may not be changed."""
    check_group_keys("algorithm", algorithm, SHARED_ALGORITHM_KEYS)
    for key, (value, why) in learner_cls.fixed_settings.items():
        if key in algorithm and algorithm[key] != value:
            raise ConfigError(f"algorithm.{key}={algorithm[key]} cannot act: {why}")


def check_algorithm(cfg: dict) -> None:
    algorithm = cfg["algorithm"]
    learner_cls = learner_class(algorithm)
    check_algorithm_keys(algorithm, learner_cls)
    schema.check_against_signature(
        "algorithm",
        {k: v for k, v in algorithm.items() if k not in SHARED_ALGORITHM_KEYS},
        learner_cls,
        filled_by_code=True,
    )
    schema.check_optimizer_and_scheduler(algorithm)  # keys and types against the classes they name
    check_positive("algorithm.optimizer.lr", algorithm["optimizer"].get("lr"), 0.001, integer=False)
    if "inner_lr" in algorithm:
        check_positive("algorithm.inner_lr", algorithm["inner_lr"], 0.001, integer=False)
    # Optional rates and limits: null turns them off; a value must be above 0 (a negative clipping
    # norm would flip the meta-gradient's sign, a negative rate climb the loss).
    for key, example in (("grad_clip", 10), ("step_lr_lr", 0.00001)):
        if algorithm.get(key) is not None:
            check_positive(f"algorithm.{key}", algorithm[key], example, integer=False, otherwise="null for none")
    for key in ("inner_steps", "eval_inner_steps"):
        if key in algorithm:
            require_positive_int(algorithm, key)


HARDWARE = ("cpu", "gpu", "ddp", "ddp_cpu", "slurm")  # conf/hardware/


def check_trainer_section(cfg: dict) -> None:
    """`trainer` holds Lightning Trainer settings. lightning-hydra-template's users choose the
    hardware with a `trainer=` group (trainer=gpu, trainer=ddp); metalab's is `hardware=`, which also
    sets what goes with the hardware (num_workers, tf32), so `trainer=<word>` is refused naming it."""
    trainer = cfg.get("trainer")
    if not isinstance(trainer, dict):
        example = f"hardware={trainer}" if trainer in HARDWARE else "hardware=gpu"
        raise ConfigError(
            f"trainer={trainer!r} is not a setting: trainer.* are Lightning Trainer options "
            f"(e.g. trainer.max_steps=1000); to choose the hardware use "
            f"hardware=<{'|'.join(HARDWARE)}>, e.g. {example}"
        )


# Loggers whose package is an optional extra: class name -> (module, extra).
OPTIONAL_LOGGERS = {"WandbLogger": ("wandb", "wandb"), "MLFlowLogger": ("mlflow", "mlflow")}


def check_loggers(cfg: dict) -> None:
    """logger=wandb or mlflow needs its package (an optional extra); tags must be a list of words."""
    for name, logger in (cfg.get("logger") or {}).items():
        target = str((logger or {}).get("_target_", "")).rsplit(".", 1)[-1]
        if target in OPTIONAL_LOGGERS:
            module, extra = OPTIONAL_LOGGERS[target]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"logger={name} needs the {module} package, which is not installed; "
                    f"install it with pip install -e '.[{extra}]', or choose logger=tensorboard or csv"
                )
    tags = cfg.get("tags")
    if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags)):
        raise ConfigError(f"tags={tags!r} must be a list of words; set e.g. tags=[baseline,omniglot]")


def check_train_config(cfg: dict) -> None:
    check_trainer_section(cfg)
    check_loggers(cfg)
    schema.check_numbers(cfg)
    schema.check_seeds(cfg)
    for key in POSITIVE_EPISODE_KEYS:
        require_positive_int(cfg, key)
    require_positive_int(cfg["trainer"], "max_steps")
    check_episode_counts(cfg, ("val_episodes", "test_episodes"))
    check_choice("test_checkpoint", cfg.get("test_checkpoint", "best"), ("best", "last"))
    schema.check_trainer(cfg["trainer"])
    schema.check_checkpoint_callback(cfg.get("callbacks"))
    check_algorithm(cfg)
    backbone_options(cfg["backbone"])  # an unknown backbone key, before the data is read
    check_group_keys("dataset", cfg["dataset"], SHARED_DATASET_KEYS)
    check_hardware(cfg["trainer"])
    if cfg.get("ckpt_path") is not None:
        check_resumable(cfg, read_checkpoint(cfg["ckpt_path"], groups=RUN_GROUPS)["hyper_parameters"]["config"])


# Backbone settings that choose only how fast the network runs (docs/speed.md): they do not shape
# the weights, so a resumed run may differ in them (and a checkpoint written before they existed lacks them).
SPEED_ONLY_BACKBONE = ("memory_format", "batch_norm_double_backward", "input_convolution")


def check_resumable(cfg: dict, trained: dict) -> None:
    """Resuming needs the same network: the settings that shape the weights must match the checkpoint's."""

    def backbone(c: dict):
        section = c.get("backbone")
        if not isinstance(section, dict):
            return section
        # Filled from its yaml: a checkpoint written before a setting existed lacks it and built
        # the network the yaml's value builds.
        filled = with_group_defaults("backbone", section)
        return {key: value for key, value in filled.items() if key not in SPEED_ONLY_BACKBONE}

    shaping = {
        "algorithm": lambda c: c["algorithm"]["name"],
        "backbone": backbone,
        "dataset": lambda c: c["dataset"]["name"],
        "ways": lambda c: c["ways"],
        # The random streams go on from the checkpoint's (callbacks.RandomState): another seed would
        # be recorded without acting.
        "seed": lambda c: c.get("seed"),
    }
    for key, value_of in shaping.items():
        if value_of(cfg) != value_of(trained):
            raise ConfigError(
                f"ckpt_path={cfg['ckpt_path']} was trained with {key}={value_of(trained)}, not {value_of(cfg)}; "
                f"resume with the checkpoint's {key}, or start a new run without ckpt_path"
            )


def check_learner_fits_data(cfg: dict, learner_cls, task_type: str) -> None:
    ways, test_ways = cfg["ways"], cfg["test_ways"]
    name = cfg["algorithm"]["name"]
    if task_type == "classification":
        for key in ("ways", "test_ways"):
            if cfg[key] < 2:
                raise ConfigError(
                    f"{key}={cfg[key]} is too few for classification: with one class every answer "
                    f"is right (accuracy 1.0 by construction); set {key}=2 or more"
                )
    if task_type not in learner_cls.task_types:
        raise ConfigError(
            f"algorithm={name} needs a {' or '.join(learner_cls.task_types)} dataset, "
            f"but dataset={cfg['dataset']['name']} is {task_type}; choose another dataset"
        )
    check_metric(cfg["dataset"], task_type)
    if learner_cls.fixed_ways and task_type == "classification" and test_ways != ways:
        raise ConfigError(
            f"algorithm={name} has one output per training way, so test_ways={test_ways} must equal ways={ways}; "
            f"set test_ways={ways} (or use a metric learner such as protonet)"
        )


def check_metric(dataset: dict, task_type: str) -> None:
    """dataset.metric / metric_mode name what the best checkpoint and a sweep's direction follow
    (conf/callbacks/default.yaml, conf/hparams_search/); the learners report one metric per task
    type (algorithms/base.py METRICS), so another value would monitor a metric never logged, or
    keep the worst checkpoint."""
    metric, mode = METRICS[task_type]
    for key, value in (("metric", metric), ("metric_mode", mode)):
        if key in dataset and dataset[key] != value:
            raise ConfigError(
                f"dataset.{key}={dataset[key]} disagrees with the metric learners report on "
                f"{task_type} tasks ({metric}, best at its {mode}imum); set dataset.{key}={value} "
                f"(the dataset's default)"
            )
