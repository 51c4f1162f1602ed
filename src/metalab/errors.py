"""Errors that metalab reports to the user as a message, not a traceback."""


class MetalabError(Exception):
    """Base class: the command-line entry points print these and exit with `exit_status`."""

    exit_status = 2


class ConfigError(MetalabError):
    """A configuration value is invalid; the message names the value and the fix."""


def check_choice(setting: str, value, choices) -> None:
    """Refuse `value` for `setting` unless it is one of `choices`, listing them in the given order."""
    if value not in choices:
        raise ConfigError(f"{setting}={value!r} is unknown; choose one of {list(choices)}")


class DataError(MetalabError):
    """Data is missing or malformed; the message names the files and how to provide them."""


class TrainingDiverged(MetalabError):
    """A loss became NaN or infinite; training stops before the bad update is applied."""


class StorageError(MetalabError):
    """A file could not be written (disk full, read-only file system, no permission)."""


class Interrupted(MetalabError):
    """The run was stopped by a signal (SIGTERM) after saving its state; resumable."""

    exit_status = 143  # 128 + SIGTERM, what a scheduler expects of a job it terminated
