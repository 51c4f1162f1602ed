"""Reading metalab checkpoints, with clear errors for files that are not ones, and writing them atomically."""

import io
import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints that are either the old file or the complete new one, never half of one.

    The checkpoint is written to a temporary file beside its target, flushed to disk, and
    renamed over the target (a rename within one directory is atomic on POSIX). A run killed
    mid-save (SIGKILL, out of memory, a pre-empted node) leaves the previous checkpoint,
    still loadable, plus at most a stray `.tmp` file.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialize first: a failure here touches no file
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as file:
                file.write(buffer.getbuffer())
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        # The rename itself is made durable by syncing the directory entry.
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
