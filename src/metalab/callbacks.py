"""Lightning callbacks for metalab runs."""

import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from metalab.errors import ConfigError, TrainingDiverged
from metalab.run_log import log


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
        shown = (("support", batch.support_x, batch.support_y), ("query", batch.query_x, batch.query_y))
        for name, images, labels in shown:
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Files this run may delete when a newer best or last replaces them: the ones it wrote,
        # and those of the run it resumes in this same folder (a requeued SLURM job).
        self._owned: set[str] = set()
        self._resuming_trainer: Trainer | None = None

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
        if isinstance(exception, TrainingDiverged):  # the learner found it: say which file is still good
            exception.name_last_good_checkpoint(self.last_good_checkpoint)
        # SIGTERM (a scheduler's notice before it kills the job): Lightning stops at the end of an
        # outer step, a consistent state to resume from, and raises SIGTERMException; save it.
        if (
            isinstance(exception, SIGTERMException)
            and self.save_last
            and self._saving(trainer)
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @property
    def last_good_checkpoint(self) -> str:
        """The file last written ("" before any): never one refused for non-finite weights."""
        return self._last_checkpoint_saved

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        # Never write a state whose weights are not finite (lr=inf, a diverged update) over a
        # good checkpoint: training stops here instead, and the files on disk stay good.
        bad = next(
            (name for name, p in trainer.lightning_module.named_parameters() if not bool(torch.isfinite(p).all())), None
        )
        if bad is not None:
            diverged = TrainingDiverged(
                f"training stopped at step {trainer.global_step}: the parameter {bad} is no longer finite, so "
                f"{filepath} was not written; lower the learning rates or clip the meta-gradient with "
                f"algorithm.grad_clip=<norm>"
            )
            diverged.name_last_good_checkpoint(self.last_good_checkpoint)  # the last file written, all finite
            raise diverged
        super()._save_checkpoint(trainer, filepath)
        self._owned.add(str(Path(filepath).resolve()))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Lightning names the checkpoint it resumes from (trainer.ckpt_path) only after setup,
        # just before it restores the callbacks' states: read there.
        self._resuming_trainer = trainer

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = self._trusted_record(state_dict)
        super().load_state_dict(state)
        for key in ("best_model_score", "best_k_models", "kth_best_model_path", "kth_value"):
            if key in state:
                setattr(self, key, state[key])

    def _checkpoint_folders(self) -> list[Path]:
        """Where a restored record may point: this run's checkpoint folder and the resumed checkpoint's."""
        folders = [Path(self.dirpath).resolve()] if self.dirpath else []
        resumed = self._resuming_trainer.ckpt_path if self._resuming_trainer is not None else None
        if resumed:
            folders.append(Path(resumed).resolve().parent)
        return folders

    def _trusted_path(self, path) -> bool:
        """True for a path to an existing .ckpt file that lies, links resolved, in one of _checkpoint_folders."""
        if not isinstance(path, str) or not path.endswith(".ckpt"):
            return False
        real = Path(path).resolve()
        return real.is_file() and any(real.parent == folder for folder in self._checkpoint_folders())

    def _trusted_record(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The callback state with every path checked: a checkpoint is a file from anywhere, and the
        paths in it decide what is deleted when a better checkpoint is saved and which one is
        meta-tested. A record naming any path outside the run's (or the resumed run's) checkpoint
        folder, or no such file, is dropped whole with a warning: the resumed run keeps its own best."""
        state = dict(state_dict)
        kept = state.get("best_k_models") or {}
        if isinstance(kept, dict):
            best = [state.get("best_model_path"), state.get("kth_best_model_path"), *kept]
            refused = [p for p in best if p and not self._trusted_path(p)]
        else:
            refused = [repr(kept)]
        if refused:
            log.warning(
                f"the resumed checkpoint's record of the best checkpoint names {refused[0]}, which is not a "
                f"checkpoint file in {' or '.join(map(str, self._checkpoint_folders()))}; the record is ignored, "
                "so this run meta-tests the best of its own validations"
            )
            state.update(best_model_path="", best_model_score=None, best_k_models={}, kth_best_model_path="")
            state.pop("kth_value", None)
        if state.get("last_model_path") and not self._trusted_path(state["last_model_path"]):
            state["last_model_path"] = ""  # (restored only into the same folder, where Lightning deletes it)
        own = Path(self.dirpath).resolve() if self.dirpath else None
        for path in [state.get("best_model_path"), state.get("last_model_path"), *state.get("best_k_models", {})]:
            if path and Path(path).resolve().parent == own:
                self._owned.add(str(Path(path).resolve()))
        return state

    def _remove_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        # Lightning removes the previous best or last by the path in its record; only a file this
        # run wrote (or the one it resumes in the same folder) is removed, never what a path
        # from a file points at (a link resolves elsewhere; AtomicCheckpointIO removes one
        # regular file only).
        real = str(Path(filepath).resolve())
        if real not in self._owned:
            log.warning(f"{filepath} was not written by this run, so it is not removed")
            return
        self._owned.discard(real)
        super()._remove_checkpoint(trainer, filepath)


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

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._resuming_trainer = trainer  # its ckpt_path names the file a restored state comes from

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A state read from a file may be anything: each generator checks its own, and what
        # one refuses is one line naming the checkpoint, before any training step.
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            random.setstate(state_dict["python"])
            name, keys, position, has_gauss, gauss = state_dict["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
            torch.set_rng_state(state_dict["torch"])
            if "cuda" in state_dict and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state_dict["cuda"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
            random.setstate(saved[0]), np.random.set_state(saved[1]), torch.set_rng_state(saved[2])
            trainer = getattr(self, "_resuming_trainer", None)
            path = trainer.ckpt_path if trainer is not None else "the checkpoint"
            raise ConfigError(
                f"ckpt_path={path}: its random state is damaged ({type(error).__name__}: {str(error)[:120]}), so "
                "the run cannot continue the same random sequence; resume from another checkpoint, or start a new run"
            ) from None


class StepProgressBar(RichProgressBar):
    """Lightning's Rich progress bar counting outer steps of trainer.max_steps, one bar for the run.

    Lightning's own counts the batches of an epoch and is titled "Epoch 0/-2" when training is
    bounded by steps (max_epochs=-1); metalab trains by steps only (an endless episode stream),
    and a resumed run starts the bar where it stopped. (Overrides private hooks of Lightning
    2.6's RichProgressBar: lightning/pytorch/callbacks/progress/rich_progress.py.)
    """

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.trainer.max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'Meta-training':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.is_disabled or (self.progress is not None and self.train_progress_bar_id is not None):
            return  # keep the one bar across Lightning's epochs (trainer.overfit_batches makes short ones)
        super().on_train_epoch_start(trainer, pl_module)
        self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.is_disabled:
            return
        if self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


class ProgressLines(Callback):
    """A log line about every 1/`lines` of training, and at least every `max_seconds`: step/max_steps,
    the training and validation metrics, tasks per second and the time left; one after each validation.

    The lines go to the run's log file always, and to the console when `console` (stdout is not
    a terminal, so no progress bar is drawn: `metalab-train ... > run.log`, a batch job).
    """

    def __init__(self, lines: int = 20, max_seconds: float = 300.0, console: bool = True):
        self.lines, self.max_seconds, self.console = lines, max_seconds, console
        self.first_step, self.started, self.last_line, self.every = 0, 0.0, 0.0, 1

    def _log(self, message: str) -> None:
        log.info(message, extra={"console": self.console})

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.first_step = trainer.global_step
        self.started = self.last_line = time.perf_counter()
        self.every = max(1, trainer.max_steps // self.lines)
        self._log(f"meta-training from step {trainer.global_step} to {trainer.max_steps}")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step, last, now = trainer.global_step, trainer.max_steps, time.perf_counter()
        due = step % self.every == 0 or step in (last, self.first_step + 1) or now - self.last_line >= self.max_seconds
        if not due:
            return
        self.last_line = now
        done, elapsed = step - self.first_step, now - self.started
        parts = [f"step {step}/{last} ({100 * step / last:.0f}%)"]
        parts += [f"{key} {value:.4g}" for key, value in scalar_metrics(trainer, ("train/", "val/"))]
        meta_batch = getattr(trainer.datamodule, "meta_batch_size", None)
        if elapsed > 0 and meta_batch:
            parts.append(f"{done * meta_batch / elapsed:.1f} tasks/s")
        if done and step < last:
            parts.append(f"ETA {format_seconds(elapsed / done * (last - step))}")
        self._log(" | ".join(parts))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        values = dict(scalar_metrics(trainer, ("val/",), keep_ci=True))
        shown = [
            f"{key} {value:.4g}" + (f" ± {values[f'{key}_ci95']:.2g}" if f"{key}_ci95" in values else "")
            for key, value in values.items()
            if not key.endswith("_ci95")
        ]
        self._log(f"validation at step {trainer.global_step}: " + ", ".join(shown))

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        data = trainer.datamodule
        if data is None or not hasattr(data, "test_episodes"):
            return self._log("meta-testing")
        # trainer.limit_test_batches and fast_dev_run (debug=limit, fdr) evaluate only some batches
        batches = sum(trainer.num_test_batches) * trainer.world_size
        self._log(f"meta-testing on {min(data.test_episodes, batches * data.eval_batch_size)} fixed episodes")


def scalar_metrics(trainer: Trainer, prefixes: tuple[str, ...], keep_ci: bool = False) -> list[tuple[str, float]]:
    """The logged metrics under `prefixes`, as floats; the 95% CIs, learning rate and the
    learner's own per-step rate left out unless asked for."""
    hidden = ("train/lr", "train/tasks_per_sec")
    return [
        (key, float(value))
        for key, value in trainer.callback_metrics.items()
        if key.startswith(prefixes)
        and key not in hidden
        and (keep_ci or not key.endswith("_ci95"))
        and getattr(value, "numel", lambda: 1)() == 1
    ]


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def progress_callbacks(enable_progress_bar: bool) -> list[Callback]:
    """On a terminal, one bar of steps (and the progress lines in the log file only); otherwise
    the progress lines on the console too, and no bar: a bar redrawn into a file is unreadable."""
    if enable_progress_bar and sys.stdout.isatty():
        return [StepProgressBar(), ProgressLines(console=False)]
    return [ProgressLines(console=True)]
