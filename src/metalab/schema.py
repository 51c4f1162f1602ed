"""What each setting may be, read from the code that takes it.

A setting that reaches a class (Lightning's `Trainer`, the checkpoint callback, a backbone, a
learner, an optimizer) is checked against that class's own signature before any work: the key
must be one of its arguments, and the value of the type its annotation declares (a choice
among a `Literal`'s values, a number, a word). A new argument is then checked without anyone
writing a check. What a signature cannot say is written once here: which numbers must be
positive, and that every float must fit in float32, the precision the weights are trained in.
"""

import difflib
import inspect
import math
import types
import typing
from collections.abc import Mapping, Sequence

from hydra.utils import get_class
from lightning import Trainer

from metalab.callbacks import ResumableCheckpoint
from metalab.errors import ConfigError

FLOAT32_MAX = 3.4028234663852886e38
SEED_RANGE = (0, 2**32 - 1)  # what NumPy's seeding accepts (lightning.seed_everything passes it on)

# Lightning Trainer settings that count or space something, so must be above zero (the others
# that take numbers may be 0: no sanity steps, no limit, every step logged).
POSITIVE_TRAINER_SETTINGS = ("val_check_interval", "check_val_every_n_epoch", "num_nodes")
# Numbers where -1 means "no limit" to Lightning.
UNLIMITED_BY_MINUS_ONE = ("max_epochs", "max_steps", "min_steps", "min_epochs")
# Trainer arguments for automatic optimization, which metalab's learners do not use (each takes
# its outer step itself): the setting that does the same for them.
AUTOMATIC_OPTIMIZATION_ONLY = {
    "gradient_clip_val": "clip the meta-gradient with algorithm.grad_clip=<norm>",
    "gradient_clip_algorithm": "algorithm.grad_clip clips the meta-gradient's norm",
    "accumulate_grad_batches": "take more tasks per outer step with meta_batch_size",
}
# Trainer arguments metalab builds itself from other groups (logger=, callbacks=), never from trainer.*.
SET_BY_METALAB = ("logger", "callbacks", "plugins", "default_root_dir")


def declared_arguments(cls) -> tuple[dict, bool]:
    """({argument: annotation}, takes any other keyword?) of `cls`'s constructor, following the
    classes it passes **kwargs on to (ResumableCheckpoint to ModelCheckpoint, MAML++ to MAML)."""
    arguments: dict = {}
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation this Python cannot evaluate: the raw ones
            hints = {}
        parameters = inspect.signature(init).parameters
        for name, p in parameters.items():
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                arguments.setdefault(name, hints.get(name, p.annotation))
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return arguments, False
    return arguments, True


def fits(value, annotation) -> bool:
    """True if `value`, as a config holds it (None, bool, int, float, str, list, dict), is of `annotation`."""
    if annotation in (inspect.Parameter.empty, typing.Any, object):
        return True
    if annotation is type(None) or annotation is None:
        return value is None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, option) for option in typing.get_args(annotation))
    if origin is typing.Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(annotation))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    container = origin or annotation
    if inspect.isclass(container) and issubclass(container, Mapping):
        return isinstance(value, Mapping)
    if inspect.isclass(container) and issubclass(container, Sequence) and container is not str:
        return isinstance(value, (list, tuple))
    if inspect.isclass(annotation):
        return isinstance(value, annotation)
    return True  # a construct this reader does not know (a TypeVar, a Callable): not refused


def alternatives(annotation) -> list[str]:
    """The kinds of value `annotation` admits, in the words a user sets values with."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        words = [w for a in typing.get_args(annotation) if a is not type(None) for w in alternatives(a)]
        return list(dict.fromkeys(words)) + (["null"] if type(None) in typing.get_args(annotation) else [])
    if origin is typing.Literal:
        return [format_value(choice) for choice in typing.get_args(annotation)]
    names = {bool: ["true", "false"], int: ["an integer"], float: ["a number"], str: ["a word"]}
    if annotation in names:
        return names[annotation]
    container = origin or annotation
    if inspect.isclass(container) and issubclass(container, Mapping):
        return ["a mapping"]
    if inspect.isclass(container) and issubclass(container, Sequence):
        return ["a list"]
    return [getattr(annotation, "__name__", str(annotation))]


def described(annotation) -> str:
    """'true, false, warn or null'; 'an integer'; '64, 32, 16-mixed, ... or null'."""
    words = alternatives(annotation)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def unknown_key(setting: str, key: str, accepted: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f"did you mean {setting}.{close[0]}? " if close else ""
    return ConfigError(
        f"{setting}.{key} is not a setting of {setting} ({hint}its settings are {', '.join(accepted)}); "
        f"remove it with ~{setting}.{key}"
    )


def check_against_signature(
    setting: str, section: Mapping, cls, set_by_code: Sequence[str] = (), filled_by_code: bool = False
) -> None:
    """Every key of `section` is an argument of `cls`, and its value of the argument's declared type.
    `filled_by_code`: a null is a placeholder metalab fills in from the data (a learner's
    num_classes), so it is not refused here."""
    arguments, takes_any = declared_arguments(cls)
    accepted = [name for name in arguments if name not in set_by_code]
    for key, value in section.items():
        if key in ("_target_", "_partial_", "name"):
            continue
        if key not in accepted:
            if takes_any:
                continue
            raise unknown_key(setting, key, accepted)
        annotation = arguments[key]
        if value is None and filled_by_code:
            continue
        if not fits(value, annotation):
            raise ConfigError(
                f"{setting}.{key}={format_value(value)} is not {described(annotation)}, which is what "
                f"{cls.__name__} takes there; set one such value"
            )


def format_value(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def check_trainer(trainer: Mapping) -> None:
    """trainer.* against Lightning's Trainer: known arguments, declared types, and the numbers in range."""
    section = {key: value for key, value in trainer.items() if key not in SET_BY_METALAB}
    for key in SET_BY_METALAB:
        if key in trainer:
            raise ConfigError(
                f"trainer.{key} is set by metalab from its own groups (logger=, callbacks=, paths.); "
                f"remove it with ~trainer.{key}"
            )
    check_against_signature("trainer", section, Trainer, set_by_code=SET_BY_METALAB)
    for key, instead in AUTOMATIC_OPTIMIZATION_ONLY.items():
        value = section.get(key)
        if value is not None and not (key == "accumulate_grad_batches" and value == 1):  # 1: Lightning's default
            raise ConfigError(
                f"trainer.{key}={format_value(section[key])} applies to Lightning's automatic optimization, "
                f"which metalab's learners do not use; {instead} (and remove ~trainer.{key})"
            )
    for key, value in section.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key in UNLIMITED_BY_MINUS_ONE and value == -1:
            continue
        if key in POSITIVE_TRAINER_SETTINGS and value <= 0:
            raise ConfigError(f"trainer.{key}={value} must be above 0; set e.g. trainer.{key}=1")
        if value < 0:
            raise ConfigError(f"trainer.{key}={value} cannot be negative; set 0 or more")
    interval = section.get("val_check_interval")
    if isinstance(interval, float) and interval > 1:
        raise ConfigError(
            f"trainer.val_check_interval={interval} is a fraction of an epoch when it is a float, so at "
            f"most 1.0; give a whole number of outer steps, e.g. trainer.val_check_interval={int(interval)}"
        )


def check_checkpoint_callback(callbacks: Mapping | None) -> None:
    """callbacks.model_checkpoint.* against the checkpoint callback's signature, and its counts in range."""
    section = (callbacks or {}).get("model_checkpoint")
    if not isinstance(section, Mapping) or "_target_" not in section:
        return
    check_against_signature("callbacks.model_checkpoint", section, ResumableCheckpoint)
    for key, lowest in (("every_n_train_steps", 0), ("every_n_epochs", 0), ("save_top_k", -1)):
        value = section.get(key)
        if isinstance(value, int) and value < lowest:
            raise ConfigError(
                f"callbacks.model_checkpoint.{key}={value} must be {lowest} or more; "
                f"set e.g. callbacks.model_checkpoint.{key}=1"
            )


def check_seeds(cfg: Mapping) -> None:
    low, high = SEED_RANGE
    for key in ("seed", "eval_seed"):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(
                f"{key}={format_value(value)} must be a whole number from {low} to {high}; set e.g. {key}=0"
            )


def numbers(cfg, where: str = ""):
    """(setting, value) of every float in a config, at any depth: `algorithm.optimizer.lr`, `dataset.amplitude[1]`."""
    if isinstance(cfg, Mapping):
        for key, value in cfg.items():
            yield from numbers(value, f"{where}.{key}" if where else str(key))
    elif isinstance(cfg, list):
        for i, value in enumerate(cfg):
            yield from numbers(value, f"{where}[{i}]")
    elif isinstance(cfg, float):
        yield where, cfg


def check_numbers(cfg) -> None:
    """Every number is finite (`algorithm.optimizer.lr=inf` passes a positivity check but turns every
    weight non-finite at the first step) and fits in float32 (`lr=1e300` is finite in Python but
    overflows in the optimizer's float32 step)."""
    for where, value in numbers(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{where}={value} is not a finite number; give a finite value")
        if abs(value) > FLOAT32_MAX:
            raise ConfigError(
                f"{where}={value} does not fit in float32 (at most {FLOAT32_MAX:.3g}), the precision metalab "
                "trains in; give a smaller value"
            )


def check_positive_sizes(setting: str, section: Mapping, cls) -> None:
    """Integer arguments of a network's constructor (an int, or a list of ints) are sizes and
    counts (channels, layers, widths): each must be at least 1."""
    arguments, _ = declared_arguments(cls)
    for key, value in section.items():
        annotation = arguments.get(key)
        if annotation is int:
            sizes = [value]
        elif (
            typing.get_origin(annotation) is list and typing.get_args(annotation) == (int,) and isinstance(value, list)
        ):
            sizes = value
        else:
            continue
        if any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in sizes):
            example = "[40,40]" if isinstance(value, list) else "64"
            raise ConfigError(
                f"{setting}.{key}={value} is made of sizes, each at least 1; set e.g. {setting}.{key}={example}"
            )


# Scheduler arguments that count steps, so must be at least 1 (StepLR's step_size=0 divides by zero).
SCHEDULER_COUNTS = ("step_size", "T_max", "T_0", "T_mult", "total_iters", "total_steps", "epochs", "steps_per_epoch")


def check_optimizer_and_scheduler(algorithm: Mapping) -> None:
    """algorithm.optimizer.* and algorithm.scheduler.* against the classes they name."""
    for setting, set_by_code in (("optimizer", "params"), ("scheduler", "optimizer")):
        section = algorithm.get(setting)
        if not isinstance(section, Mapping) or "_target_" not in section:
            continue
        try:
            cls = get_class(section["_target_"])
        except Exception:  # not importable, or not a class
            raise ConfigError(
                f"algorithm.{setting}._target_={section['_target_']!r} is not a class that can be imported; "
                "give one such as torch.optim.Adam"
            ) from None
        check_against_signature(f"algorithm.{setting}", section, cls, set_by_code=(set_by_code,))
        for key in SCHEDULER_COUNTS if setting == "scheduler" else ():
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise ConfigError(
                    f"algorithm.scheduler.{key}={value} counts steps, so at least 1; "
                    f"set e.g. algorithm.scheduler.{key}=1000"
                )


# Top-level settings a `+key=value` override may add: Hydra's own, and the groups (which + selects).
ADDABLE_ROOTS = ("hydra",)


def check_added_settings(overrides: Sequence[str], config_groups: Sequence[str]) -> None:
    """A `+key=value` on the command line adds a setting the composed config lacks; at the top
    level, and under paths., no code reads one (the settings metalab reads all have defaults),
    so it would be ignored with exit 0. Refused naming it. Under algorithm., dataset., backbone.,
    trainer. and callbacks. the group and signature checks refuse unknown keys with their lists."""
    for override in overrides:
        if not override.startswith("+") or "=" not in override:
            continue
        key = override.lstrip("+").split("=", 1)[0].strip()
        root = key.split(".", 1)[0].split("@", 1)[0]
        if root in ADDABLE_ROOTS or (root == key and root in config_groups):
            continue
        if "." in key and root not in ("paths",):
            continue  # checked where the section is: by its class's signature or its group's yaml
        raise ConfigError(
            f"{override} adds the setting {key}, which no code reads, so it would be ignored; "
            f"remove it (metalab-train --cfg job lists every setting)"
        )
