"""The steps metalab-train and metalab-eval share: data, trainer, meta-test, results.json."""

import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig

from metalab.checkpoint import AtomicCheckpointIO
from metalab.config import report_error
from metalab.data import EpisodicDataModule
from metalab.data.image_cache import write_json_atomic
from metalab.errors import MetalabError

# Run settings passed to the data module under the same names.
EPISODE_SETTINGS = ("ways", "shots", "queries", "meta_batch_size", "test_ways", "test_shots", "test_queries",
                    "val_episodes", "test_episodes", "seed", "eval_seed", "eval_batch_size")


def build_datamodule(config: dict) -> EpisodicDataModule:
    return EpisodicDataModule(
        dataset=config["dataset"],
        data_dir=config["paths"]["data_dir"],
        cache_dir=config["paths"]["cache_dir"],
        num_workers=config.get("num_workers", 0),
        **{key: config[key] for key in EPISODE_SETTINGS},
    )


def build_trainer(config: dict, run_dir: Path, with_callbacks: bool = True) -> Trainer:
    loggers = [instantiate(cfg) for cfg in (config.get("logger") or {}).values()]
    callbacks = [instantiate(cfg) for cfg in (config.get("callbacks") or {}).values()] if with_callbacks else []
    if config["trainer"].get("accelerator") in ("gpu", "cuda"):
        use_tf32(bool(config.get("tf32", False)))
    return Trainer(
        **config["trainer"],
        default_root_dir=str(run_dir),
        logger=loggers or False,
        callbacks=callbacks,
        enable_checkpointing=with_callbacks,
        plugins=[AtomicCheckpointIO()],
        # The data module shards the fixed evaluation episodes over DDP processes itself,
        # without the repeated episodes Lightning's distributed sampler pads with.
        use_distributed_sampler=False,
    )


def use_tf32(enabled: bool) -> None:
    """tf32=true: float32 matrix products and convolutions in TensorFloat-32 on Ampere+ GPUs
    (faster, ~3 significant digits per product); false: full float32."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def process_rank() -> int:
    """This process's global rank as its launcher (torchrun, SLURM, Lightning's DDP) set it; 0 alone."""
    for variable in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    return 0


def meta_test(trainer: Trainer, model: LightningModule, datamodule: EpisodicDataModule, ckpt_path,
              config: dict) -> dict:
    """Run the fixed test episodes; returns the logged `test/*` metrics and test throughput."""
    started = time.perf_counter()
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    seconds = time.perf_counter() - started
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    metrics["test_tasks_per_sec"] = datamodule.test_episodes / seconds
    # TensorBoard's hyper-parameter table: one row per run, with its meta-test result.
    hparams = {**summary(config), "algorithm": config["algorithm"], "backbone": config.get("backbone")}
    scores = {f"hp/{k.removeprefix('test/')}": v for k, v in metrics.items() if k.startswith("test/")}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hparams, scores)
            logger.finalize("success")  # test already closed the writer: flush what was reopened
    return metrics


def summary(config: dict) -> dict:
    """The settings a reader compares runs by."""
    keys = ("seed", "eval_seed", "ways", "shots", "queries", "meta_batch_size")
    keys += ("test_ways", "test_shots", "test_queries", "test_episodes")
    return {
        "algorithm": config["algorithm"]["name"],
        "dataset": config["dataset"]["name"],
        "backbone": config.get("backbone", {}).get("name"),
        **{key: config.get(key) for key in keys},
        "max_steps": config["trainer"].get("max_steps"),
    }


def write_results(run_dir: Path, config: dict, metrics: dict, started: float, **extra) -> dict:
    results = {**metrics, "config": summary(config), "wall_time_sec": time.perf_counter() - started, **extra}
    write_json_atomic(run_dir / "results.json", results)
    for key in sorted(k for k in metrics if k.startswith("test/") and not k.endswith("_ci95")):
        ci = metrics.get(f"{key}_ci95")
        print(f"{key} = {metrics[key]:.4f}" + (f" ± {ci:.4f} (95% CI)" if ci is not None else ""))
    print(f"results: {run_dir / 'results.json'}", flush=True)
    return results


def guarded(task: Callable[[DictConfig], float | None], cfg: DictConfig) -> float | None:
    """Run a command; a MetalabError becomes a one-line message (and error.txt), not a traceback.

    In a multirun sweep a failing job (any exception) writes error.txt in its run dir and returns
    None, so the other jobs go on (a sweeper records None as a failed trial).
    """
    try:
        return reporting_failures(task, cfg)
    finally:
        close_process_group()


def close_process_group() -> None:
    """End DDP's process group while the interpreter is whole.

    Left to interpreter shutdown, gloo's worker threads can outlive Python and abort the process
    ("terminate called without an active exception", exit -6) after a run that succeeded.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def reporting_failures(task: Callable[[DictConfig], float | None], cfg: DictConfig) -> float | None:
    try:
        return task(cfg)
    except MetalabError as error:
        hydra = HydraConfig.get()
        report_error(error, Path(hydra.runtime.output_dir))
        if hydra.mode == RunMode.MULTIRUN:
            return None
        sys.exit(2)
    except Exception as error:
        hydra = HydraConfig.get()
        if hydra.mode != RunMode.MULTIRUN:
            raise  # a bug in a single run: the traceback is what helps
        # In a sweep, one job's crash (out of memory, a diverged run, a bug) must not end the
        # others: keep the traceback in the job's run dir and go on with the next job.
        run_dir = Path(hydra.runtime.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(f"metalab: job failed: {type(error).__name__}: {error}\n\n"
                                           + traceback.format_exc())
        print(f"metalab: job {hydra.job.num} failed ({type(error).__name__}: {error}); "
              f"traceback in {run_dir / 'error.txt'}", file=sys.stderr, flush=True)
        return None
