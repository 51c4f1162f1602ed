"""Reading metalab checkpoints, with clear errors for files that are not ones."""

from pathlib import Path

import torch

from metalab.errors import ConfigError

# Written into every checkpoint by MetaLearner.on_save_checkpoint.
MARKER = "metalab_version"


def read_checkpoint(path) -> dict:
    """Load a checkpoint on the CPU and check it was written by metalab."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"ckpt_path={path} does not exist; give the path of a .ckpt file in a run's checkpoints/")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as error:  # any unreadable file is the same problem for the user
        raise ConfigError(f"ckpt_path={path} is not a readable PyTorch checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or MARKER not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ConfigError(f"ckpt_path={path} is not a metalab checkpoint; give a file from a metalab run's checkpoints/")
    return checkpoint
