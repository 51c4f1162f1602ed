"""Turn a Hydra config into a plain dict and reject bad values before any work starts."""

import importlib.util
import inspect
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from metalab import schema
from metalab.backbones import backbone_class, backbone_options
from metalab.checkpoint import RUN_GROUPS, read_checkpoint
from metalab.errors import ConfigError, StorageError, check_choice, check_meta_batch_split, check_positive
from metalab.files import write_atomic
from metalab.memory import check_episode_counts
from metalab.paths import CONFIG_DIR
from metalab.run_log import print_config_tree

# The run's episode settings, named once: the checks, the data module (runner.build_datamodule)
# and metalab-eval's overridable settings (eval.OVERRIDABLE) are built from these.
TRAIN_EPISODE_KEYS = ("ways", "shots", "queries", "meta_batch_size")
TEST_EPISODE_KEYS = ("test_ways", "test_shots", "test_queries")
EVALUATION_KEYS = ("val_episodes", "test_episodes", "eval_batch_size")  # how many fixed episodes, how batched
SEED_KEYS = ("seed", "eval_seed")
EPISODE_SETTINGS = (*TRAIN_EPISODE_KEYS, *TEST_EPISODE_KEYS, *EVALUATION_KEYS, *SEED_KEYS)
POSITIVE_EPISODE_KEYS = (*TRAIN_EPISODE_KEYS, *TEST_EPISODE_KEYS, *EVALUATION_KEYS)


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


# Algorithm settings that every learner's outer step reads (algorithms/base.py), whether or not
# the learner's own conf/algorithm/<name>.yaml lists them.
SHARED_ALGORITHM_KEYS = ("name", "_target_", "optimizer", "scheduler", "grad_clip", "compile")
# Dataset settings every dataset takes: the episode kind, which a learner's yaml sets (data/datamodule.py).
SHARED_DATASET_KEYS = ("name", "episodes")


def group_defaults(group: str, name: str) -> dict | None:
    """The `group` settings conf/<group>/<name>.yaml gives (following its defaults list); None
    when there is no such file (a config directory of the user's own)."""
    path = Path(CONFIG_DIR) / group / f"{name}.yaml"
    if not path.is_file():
        return None
    text = path.read_text()
    content = yaml.safe_load(text) or {}
    settings: dict = {}
    for entry in content.pop("defaults", None) or []:
        if isinstance(entry, str) and entry != "_self_":
            settings.update(group_defaults(group, entry) or {})
    # A `@package _global_` file (every dataset; baseline, mann) sets `<group>:` beside other keys.
    own = content.get(group, {}) if "@package _global_" in text else content
    return {**settings, **own}


def with_group_defaults(group: str, section: Mapping) -> dict:
    """`section` (a run's `algorithm` or `dataset` settings) with every setting its
    conf/<group>/<name>.yaml gives filled in where it is absent: the yaml is the one place a
    default is written. A Hydra-composed run has them all already; this serves configs written
    by hand (tests, scripts, older checkpoints). Values that need the run's config to mean
    anything (`${...}` interpolations, `???`) are not filled in. Unchanged where there is no
    such file (a config directory of the user's own)."""
    name = section.get("name")
    defaults = group_defaults(group, name) if isinstance(name, str) else None
    usable = {
        key: value
        for key, value in (defaults or {}).items()
        if not (isinstance(value, str) and ("${" in value or value == "???"))
    }
    return {**usable, **section}


def check_group_keys(group: str, section: dict, shared: tuple[str, ...]) -> None:
    """Every key under `group` is one its yaml file or the shared code defines: any other one
    (`+algorithm.first_ordr=true`, `+dataset.image_sise=32`) would be read by no code, so it is
    refused, listing the keys that act. The yaml is the list: it cannot drift from a hand-kept one."""
    name = section.get("name")
    defaults = group_defaults(group, name) if isinstance(name, str) else None
    if defaults is None:
        return
    accepted = list(dict.fromkeys([*defaults, *shared]))
    unknown = sorted(set(section) - set(accepted))
    if unknown:
        removals = " ".join(f"~{group}.{key}" for key in unknown)
        raise ConfigError(
            f"{group}={name} has no setting {', '.join(unknown)}, so it would be ignored; its "
            f"settings are {', '.join(accepted)}; remove with {removals}"
        )


def check_algorithm_keys(algorithm: dict, learner_cls) -> None:
    """Every algorithm setting acts or is refused: a key no code reads, and a setting the learner
    fixes by definition (fomaml's first_order), which may not be changed."""
    check_group_keys("algorithm", algorithm, SHARED_ALGORITHM_KEYS)
    for key, (value, why) in learner_cls.fixed_settings.items():
        if key in algorithm and algorithm[key] != value:
            raise ConfigError(f"algorithm.{key}={algorithm[key]} cannot act: {why}")


def check_algorithm(cfg: dict, algorithms: dict) -> None:
    from metalab.algorithms import learner_class  # here only: the learners import this module

    algorithm = cfg["algorithm"]
    if algorithm.get("_target_") is None:  # a config from before _target_: the learner by name
        check_choice("algorithm", algorithm.get("name"), sorted(algorithms))
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


def check_train_config(cfg: dict, algorithms: dict) -> None:
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
    check_algorithm(cfg, algorithms)
    backbone_options(cfg["backbone"])  # an unknown backbone key, before the data is read
    check_group_keys("dataset", cfg["dataset"], SHARED_DATASET_KEYS)
    check_hardware(cfg["trainer"])
    if cfg.get("ckpt_path") is not None:
        check_resumable(cfg, read_checkpoint(cfg["ckpt_path"], groups=RUN_GROUPS)["hyper_parameters"]["config"])


# Backbone settings that choose only how fast the network runs (docs/speed.md).
SPEED_ONLY_BACKBONE = ("memory_format", "batch_norm_double_backward", "input_convolution")
# Backbone settings that do not shape the weights, so a resumed run may differ in them: the class
# `name` names already (`_target_`, absent from checkpoints written before the groups named their
# class) and the speed-only ones (absent from checkpoints written before they existed).
NOT_WEIGHT_SHAPING = ("_target_", *SPEED_ONLY_BACKBONE)


def check_resumable(cfg: dict, trained: dict) -> None:
    """Resuming needs the same network: the settings that shape the weights must match the checkpoint's."""

    def backbone(c: dict):
        section = c.get("backbone")
        if not isinstance(section, dict):
            return section
        # A setting at its constructor default is left out: a checkpoint written before the
        # setting existed lacks it and built the network the default builds.
        try:
            defaults = {
                key: parameter.default
                for key, parameter in inspect.signature(
                    backbone_class(section.get("_target_"), section.get("name"))
                ).parameters.items()
            }
        except ConfigError:
            defaults = {}
        return {
            key: value
            for key, value in section.items()
            if key not in NOT_WEIGHT_SHAPING and not (key in defaults and defaults[key] == value)
        }

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


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would call, if there is one."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++"]
    return next((path for path in map(shutil.which, names) if path), None)


# algorithm.compile=auto compiles where compiling was measured to pay (docs/speed.md, "Compiled
# by default", with the figures): an MLP on a CPU, in a run long enough to repay the compile.
AUTO_COMPILE_MIN_STEPS = 20_000


def auto_compile(cfg: dict, learner_cls) -> tuple[bool, str]:
    """What algorithm.compile=auto means for this run: (compile?, the reason, to print)."""
    algorithm, trainer = cfg["algorithm"], cfg.get("trainer") or {}
    steps, backbone = trainer.get("max_steps"), (cfg.get("backbone") or {}).get("name")
    target = (cfg.get("backbone") or {}).get("_target_")
    pays = backbone is not None and getattr(backbone_class(target, backbone), "compile_pays_on_cpu", False)
    devices = trainer.get("devices", 1)
    distributed = "ddp" in str(trainer.get("strategy") or "") or (isinstance(devices, int) and devices > 1)
    eager_because = [
        (not learner_cls.compilable, f"algorithm={algorithm.get('name')} has no compiled path"),
        (not pays, f"backbone={backbone}: compiling is measured to pay for an MLP only"),
        (trainer.get("accelerator", "cpu") != "cpu", "on a GPU compiling is not measured yet"),
        (distributed, "several processes (DDP): not measured"),
        (bool(algorithm.get("checkpoint_inner_steps")), "algorithm.checkpoint_inner_steps=true cannot be compiled"),
        (bool(trainer.get("fast_dev_run")), "a fast_dev_run is too short to repay the compile"),
        (
            not isinstance(steps, int) or steps < AUTO_COMPILE_MIN_STEPS,
            f"trainer.max_steps={steps} is under {AUTO_COMPILE_MIN_STEPS:,}, too short to repay the compile",
        ),
        (cpp_compiler() is None, "no C++ compiler was found (g++, clang++ or $CXX)"),
    ]
    reasons = [reason for applies, reason in eager_because if applies]
    if reasons:
        return False, f"algorithm.compile=auto: eager, as {reasons[0]}; algorithm.compile=true compiles anyway"
    return True, (
        f"algorithm.compile=auto: compiling the meta-gradient (an MLP on a CPU, {steps:,} steps; the "
        "first step compiles, about 30 s); algorithm.compile=false runs eagerly"
    )


def check_compile(cfg: dict, learner_cls) -> None:
    """algorithm.compile=true needs a learner torch.compile can capture, and a compiler to run."""
    algorithm = cfg["algorithm"]
    if not algorithm.get("compile") or algorithm["compile"] == "auto":  # auto chooses only what works
        return
    from metalab.algorithms.compile_passes import COMPILE_MODES

    if algorithm["compile"] not in COMPILE_MODES:
        raise ConfigError(
            f"algorithm.compile={algorithm['compile']} is not a choice; use auto, false, true or "
            f"reduce-overhead (true, and also replay the step as a CUDA graph on a GPU)"
        )
    on_cpu = cfg.get("trainer", {}).get("accelerator", "cpu") == "cpu"
    if algorithm["compile"] == "reduce-overhead" and on_cpu:
        raise ConfigError(
            "algorithm.compile=reduce-overhead replays CUDA graphs, which need a GPU; use "
            "algorithm.compile=true on a CPU, or hardware=gpu"
        )
    if not learner_cls.compilable:
        from metalab.algorithms import ALGORITHMS  # here only: it imports every learner to list them

        compilable = ", ".join(name for name, cls in ALGORITHMS.items() if cls.compilable)
        raise ConfigError(
            f"algorithm.compile=true is not available for algorithm={algorithm['name']} (it is for "
            f"{compilable}); leave it out"
        )
    if algorithm.get("checkpoint_inner_steps"):
        raise ConfigError(
            "algorithm.compile=true and algorithm.checkpoint_inner_steps=true do not combine "
            "(torch.compile cannot capture the recomputation); set one of them to false"
        )
    if on_cpu and cpp_compiler() is None:
        raise ConfigError(
            "algorithm.compile=true on a CPU needs a C++ compiler for torch.compile (g++, or the "
            "one named by $CXX) and none was found; install one or leave algorithm.compile out"
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
    from metalab.algorithms.base import METRICS  # here: it imports torch and Lightning

    metric, mode = METRICS[task_type]
    for key, value in (("metric", metric), ("metric_mode", mode)):
        if key in dataset and dataset[key] != value:
            raise ConfigError(
                f"dataset.{key}={dataset[key]} disagrees with the metric learners report on "
                f"{task_type} tasks ({metric}, best at its {mode}imum); set dataset.{key}={value} "
                f"(the dataset's default)"
            )


def save_config(cfg: dict, run_dir: Path) -> None:
    """Keep the resolved config in the run directory (config.yaml) and show it as a tree."""
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    print_config_tree(cfg)


def report_error(error, run_dir: Path | None, details: str = "", echo: bool = True) -> Path | None:
    """Print the one-line message (unless not `echo`); keep it (and `details`, e.g. a traceback) in
    run_dir/error.txt.

    Returns the error.txt written, or None where it could not be (a full disk, a read-only
    directory: the message on stderr is then all there is, and says so).
    """
    message = f"metalab: error: {error}"
    if run_dir is not None:
        try:
            write_atomic(run_dir / "error.txt", message + "\n" + (f"\n{details}" if details else ""))
            if echo:
                print(message, file=sys.stderr, flush=True)
            return run_dir / "error.txt"
        except StorageError as failure:
            message += f" (and error.txt could not be kept: {failure})"
    print(message, file=sys.stderr, flush=True)
    return None
