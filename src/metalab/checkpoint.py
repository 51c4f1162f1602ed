"""Reading metalab checkpoints safely, with clear errors for files that are not ones, and writing them atomically.

A checkpoint is loaded with `torch.load(weights_only=True)`: tensors, numbers, strings and
containers only, so a file that holds other pickled objects (whose unpickling could run any
code) is refused before anything in it is used. Every load goes through `read_checkpoint`:
metalab-eval, metalab-predict, `metalab.load_learner`, and Lightning's own resume and test
loads (`AtomicCheckpointIO.load_checkpoint`, the trainer's checkpoint IO).

This module reads and writes files only; the learner a checkpoint holds is built above it,
by `MetaLearner.from_checkpoint` (algorithms/base.py).
"""

import inspect
import io
import pickle
from pathlib import Path

import torch
from hydra.utils import get_class
from lightning.pytorch.plugins.io import TorchCheckpointIO

from metalab.errors import ConfigError
from metalab.files import write_atomic
from metalab.pretrained import resolve as resolve_named

# Written into every checkpoint by MetaLearner.on_save_checkpoint.
MARKER = "metalab_version"


def read_checkpoint(path, map_location="cpu", groups: tuple[str, ...] = ("algorithm", "backbone")) -> dict:
    """Load a checkpoint (on the CPU unless told) without unpickling objects, and check it was written by metalab.

    `path` may name a checkpoint shipped in the package, `pretrained:<name>` (metalab/pretrained/).
    `groups`: the run config's groups the reader needs (RUN_GROUPS where it rebuilds the data too).
    """
    file = Path(resolve_named(path))
    if not file.is_file():
        raise ConfigError(f"ckpt_path={path} does not exist; give the path of a .ckpt file in a run's checkpoints/")
    try:
        checkpoint = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(
            f"ckpt_path={path} holds pickled Python objects other than tensors and plain values, "
            "which could run code when loaded, so it is refused (metalab checkpoints hold none); "
            "give a checkpoint written by metalab-train"
        ) from None
    except Exception as error:  # any unreadable file is the same problem for the user
        raise ConfigError(f"ckpt_path={path} is not a readable PyTorch checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or MARKER not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ConfigError(
            f"ckpt_path={path} is not a metalab checkpoint; give a file from a metalab run's checkpoints/"
        )
    config = checkpoint["hyper_parameters"].get("config") if isinstance(checkpoint["hyper_parameters"], dict) else None
    if not isinstance(config, dict):
        raise ConfigError(
            f"ckpt_path={path} lacks the run config metalab stores; give a checkpoint written by metalab-train"
        )
    check_stored_targets(config, path)
    check_stored_shapes(checkpoint["hyper_parameters"], config, path, groups)
    return checkpoint


# The groups of a run config a reader that rebuilds the learner and its data needs (metalab-eval,
# load_learner, a resume), and the task types the learners are written for.
RUN_GROUPS = ("algorithm", "backbone", "dataset")
TASK_TYPES = ("classification", "regression")


def check_stored_shapes(hyper: dict, config: dict, path, groups: tuple[str, ...]) -> None:
    """A stored run config that a reader would trip over (a group missing, an input shape of
    anything but positive whole numbers, an unknown task type) is refused here, naming the file,
    whatever reads it: metalab-eval, metalab-predict, load_learner, a resume."""
    missing = [group for group in groups if not isinstance(config.get(group), dict)]
    if missing:
        raise ConfigError(
            f"ckpt_path={path} lacks the {', '.join(missing)} settings of its run config; "
            "give a checkpoint written by metalab-train"
        )
    shape = hyper.get("input_shape")
    if not (
        isinstance(shape, (list, tuple))
        and shape
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise ConfigError(
            f"ckpt_path={path} stores the input shape {shape!r}, not a list of positive whole numbers; "
            "give a checkpoint written by metalab-train"
        )
    if hyper.get("task_type") not in TASK_TYPES:
        raise ConfigError(
            f"ckpt_path={path} stores the task type {hyper.get('task_type')!r}, not one of "
            f"{', '.join(TASK_TYPES)}; give a checkpoint written by metalab-train"
        )


# What a stored config may name for Hydra to build (`_target_`): metalab's own classes, and
# the kinds of class metalab's configs build from other packages, by module and base class.
TRUSTED_TARGETS = {
    "metalab.": object,
    "torch.optim.": (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler),
    "lightning.pytorch.loggers.": "lightning.pytorch.loggers.Logger",
    "lightning.pytorch.callbacks.": "lightning.pytorch.callbacks.Callback",
}


def trusted_target(name) -> bool:
    """True if `name` is a class metalab may build from a stored config.

    Checked on the object the name resolves to, not on the name alone: a trusted prefix can
    reach other objects through attributes (`metalab.settings.os.system`).
    """
    prefix = next((p for p in TRUSTED_TARGETS if isinstance(name, str) and name.startswith(p)), None)
    if prefix is None:
        return False
    try:
        cls = get_class(name)  # imports only modules under the trusted prefix
    except Exception:  # not found, or not a class
        return False
    bases = TRUSTED_TARGETS[prefix]
    bases = tuple(get_class(b) if isinstance(b, str) else b for b in (bases if isinstance(bases, tuple) else (bases,)))
    return inspect.isclass(cls) and cls.__module__.startswith(prefix) and issubclass(cls, bases)


def check_stored_targets(config, path, where: str = "") -> None:
    """Refuse a stored config naming anything but a trusted class to build (see TRUSTED_TARGETS)."""
    if isinstance(config, dict):
        target = config.get("_target_")
        if target is not None and not trusted_target(target):
            raise ConfigError(
                f"ckpt_path={path} names {target!r} at {where or ''}_target_ to build, which is not a "
                "metalab class (nor a torch optimizer or scheduler, a Lightning logger or callback), "
                "so it is refused; give a checkpoint written by metalab-train"
            )
        for key, value in config.items():
            check_stored_targets(value, path, f"{where}{key}.")
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            check_stored_targets(value, path, f"{where}{i}.")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints that are either the old file or the complete new one, never half of one,
    and loaded without unpickling objects.

    The checkpoint is written to a temporary file beside its target, flushed to disk, and
    renamed over the target (files.write_atomic). A run killed mid-save (SIGKILL, out of
    memory, a pre-empted node) leaves the previous checkpoint, still loadable; a full disk
    is a StorageError naming the file and the space it needs, the previous file intact.
    Lightning's loads (resume with ckpt_path=, meta-test of the best checkpoint, a SLURM
    requeue's checkpoint) go through `read_checkpoint`.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialize first: a failure here touches no file
        write_atomic(path, buffer.getbuffer())

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return read_checkpoint(path, map_location=map_location)  # None: each tensor to the device it was saved from

    def remove_checkpoint(self, path) -> None:
        # Lightning's own removes recursively whatever the path names; a checkpoint is one regular
        # file, so a folder or a symbolic link there is left alone (the link itself is not
        # followed, and nothing below a folder is touched).
        file = Path(path)
        if file.is_symlink() or not file.is_file():
            return
        file.unlink(missing_ok=True)
