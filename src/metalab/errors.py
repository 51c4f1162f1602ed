"""Errors that metalab reports to the user as a message, not a traceback, and the checks that raise them."""

import inspect
import math
from importlib import import_module


class MetalabError(Exception):
    """Base class: the command-line entry points print these and exit with `exit_status`."""

    exit_status = 2


class ConfigError(MetalabError):
    """A configuration value is invalid; the message names the value and the fix."""


def check_choice(setting: str, value, choices) -> None:
    """Refuse `value` for `setting` unless it is one of `choices`, listing them in the given order."""
    if value not in choices:
        raise ConfigError(f"{setting}={value!r} is unknown; choose one of {list(choices)}")


def check_positive(setting: str, value, example, integer: bool = True, meaning: str = "", otherwise: str = "") -> None:
    """Refuse `value` for `setting` unless it is a positive integer (or, `integer=False`, a positive
    finite number), naming the value and a fix: "<setting>=<value> must be a positive integer
    (<meaning>)[, or <otherwise>]; set e.g. <setting>=<example>". Booleans are not numbers here."""
    kinds = (int,) if integer else (int, float)
    if not isinstance(value, bool) and isinstance(value, kinds) and 0 < value < math.inf:
        return  # an integer > 0 is >= 1
    what = "a positive integer" if integer else "a positive number"
    raise ConfigError(
        f"{setting}={value!r} must be {what}{f' ({meaning})' if meaning else ''}"
        f"{f', or {otherwise}' if otherwise else ''}; set e.g. {setting}={example}"
    )


def check_meta_batch_split(meta_batch_size: int, world: int) -> None:
    """DDP gives each of `world` processes an equal share of every meta-batch."""
    if meta_batch_size % world:
        raise ConfigError(
            f"meta_batch_size={meta_batch_size} does not split evenly over {world} DDP processes "
            f"(trainer.devices x trainer.num_nodes); set meta_batch_size to a multiple of {world}"
        )


def metalab_class(setting: str, target, package: str, base: type, choose: str) -> type:
    """The class a config's `_target_` names, if it is one of `package`'s (a `base` subclass in a
    module of metalab's own `package`): a checkpoint's stored config can make metalab build its
    own classes only, never import or call anything else."""
    module, _, name = str(target).rpartition(".")
    if not (module.startswith(f"{package}.") and module[len(package) + 1 :].isidentifier() and name.isidentifier()):
        raise ConfigError(
            f"{setting}={target!r} is not one of metalab's classes ({package}.<module>.<Class>); {choose}"
        )
    try:
        found = getattr(import_module(module), name)
    except (ImportError, AttributeError):
        raise ConfigError(f"{setting}={target!r}: {module} has no class {name}; {choose}") from None
    if not (isinstance(found, type) and issubclass(found, base)):
        raise ConfigError(f"{setting}={target!r} is not a {base.__name__}; {choose}")
    if found is base or inspect.isabstract(found):  # the shared base, which nothing can build on its own
        raise ConfigError(f"{setting}={target!r} is the base every {base.__name__} builds on, not one; {choose}")
    return found


class DataError(MetalabError):
    """Data is missing or malformed; the message names the files and how to provide them."""


class TrainingDiverged(MetalabError):
    """A loss became NaN or infinite; training stops before the bad update is applied.

    The learner that finds it knows the step and the loss; the checkpoint callback knows the last
    good file, and adds it (`name_last_good_checkpoint`) as the error passes through its
    `on_exception`, so neither reads the other's state."""

    names_checkpoint = False  # whether the message names the last good checkpoint yet

    def name_last_good_checkpoint(self, path: str) -> None:
        """Complete the message with the last good checkpoint ("" : none was written yet), once."""
        if self.names_checkpoint:
            return
        kept = f"The last good checkpoint is {path}" if path else "No checkpoint had been written yet"
        self.args = (f"{self.args[0]}. {kept}",)
        self.names_checkpoint = True


class StorageError(MetalabError):
    """A file could not be written (disk full, read-only file system, no permission)."""


class Interrupted(MetalabError):
    """The run was stopped by a signal (SIGTERM) after saving its state; resumable."""

    exit_status = 143  # 128 + SIGTERM, what a scheduler expects of a job it terminated
