"""Lightning callbacks for metalab runs."""

import random
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from metalab.errors import TrainingDiverged


def class_grid(images: torch.Tensor, labels: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Tile one episode's images [N, C, H, W] into a [C, H', W'] grid, one row per class."""
    order = torch.argsort(labels, stable=True)
    ways = labels.unique().numel()  # labels need not be 0..ways-1 (global labels: data/global_labels.py)
    images = torch.nn.functional.pad(images[order], (pad, pad, pad, pad), value=0.5)
    _, channels, height, width = images.shape
    rows = images.reshape(ways, -1, channels, height, width)  # [ways, per_class, C, H, W]
    return rows.permute(2, 0, 3, 1, 4).reshape(channels, ways * height, -1)


class EpisodeImages(Callback):
    """Show one training episode's support and query images in TensorBoard, a row per class."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None or len(pl_module.input_shape) != 3:
            return  # only image episodes have pictures to show
        batch = trainer.datamodule.example_batch("train")
        for name, images, labels in (("support", batch.support_x, batch.support_y), ("query", batch.query_x, batch.query_y)):
            grid = class_grid(images[0].float().cpu(), labels[0].cpu())
            logger.experiment.add_image(f"episode/{name}", grid.clamp(0, 1), global_step=trainer.global_step)


class ResumableCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with the saving policy a killed run needs to resume exactly.

    - `last.ckpt` is always the newest state: written every `every_n_train_steps` outer steps,
      after every validation, and when training ends. (Lightning 2.6 rewrites it only when a
      new best is saved, and defers step-triggered saves until a validation has run.)
    - `best-step*.ckpt` is the best by the validation metric (`monitor`), chosen after each
      validation only.
    - The record of the best so far survives a resume into a new run directory. Every metalab
      run writes into its own directory, and Lightning forgets the best score when the
      directory changes, so the resumed run would meta-test the best of the validations after
      the resume. The earlier files stay where they are (Lightning deletes only inside its own
      directory), so keeping the record makes a resumed run meta-test the same checkpoint as
      an uninterrupted one.

    Files are written atomically (checkpoint.AtomicCheckpointIO, set by runner.build_trainer).
    """

    def _saving(self, trainer: Trainer) -> bool:
        return not (trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        every = self._every_n_train_steps
        if every >= 1 and trainer.global_step % every == 0 and self._saving(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._saving(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # SIGTERM (a scheduler's notice before it kills the job): Lightning stops at the end of an
        # outer step, a consistent state to resume from, and raises SIGTERMException; save it.
        if (isinstance(exception, SIGTERMException) and self.save_last and self._saving(trainer)
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        # Never write a state whose weights are not finite (lr=inf, a diverged update) over a
        # good checkpoint: training stops here instead, and the files on disk stay good.
        bad = next((name for name, p in trainer.lightning_module.named_parameters()
                    if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            kept = self._last_checkpoint_saved  # the last file actually written, all finite
            raise TrainingDiverged(
                f"training stopped at step {trainer.global_step}: the parameter {bad} is no longer finite, so "
                f"{filepath} was not written; lower the learning rates or clip the meta-gradient with "
                f"algorithm.grad_clip=<norm>. " + (f"The last good checkpoint is {kept}" if kept
                                                    else "No checkpoint had been written yet"))
        super()._save_checkpoint(trainer, filepath)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for key in ("best_model_score", "best_k_models", "kth_best_model_path", "kth_value"):
            if key in state_dict:
                setattr(self, key, state_dict[key])


class RandomState(Callback):
    """Saves the Python, NumPy and torch random states in each checkpoint and restores them on resume.

    The training episode stream is seeded by step (data/datamodule.py), so it resumes by itself;
    this covers everything else that draws random numbers during training (dropout, random
    initial states, ...), so that a resumed run continues the very same random sequence. Under
    DDP the checkpoint holds rank 0's state, which every rank shares after `seed_everything`
    as long as ranks draw the same numbers.
    """

    def state_dict(self) -> dict[str, Any]:
        # Plain tuples, ints and tensors only: checkpoints stay loadable with torch.load(weights_only=True).
        name, keys, position, has_gauss, gauss = np.random.get_state()
        numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)
        state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        name, keys, position, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
