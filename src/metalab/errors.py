"""Errors that metalab reports to the user as a message, not a traceback."""


class MetalabError(Exception):
    """Base class: the command-line entry points print these and exit with status 2."""


class ConfigError(MetalabError):
    """A configuration value is invalid; the message names the value and the fix."""


class DataError(MetalabError):
    """Data is missing or malformed; the message names the files and how to provide them."""


class TrainingDiverged(MetalabError):
    """A loss became NaN or infinite; training stops before the bad update is applied."""
