"""The steps metalab-train and metalab-eval share: data, trainer, meta-test, results.json."""

import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning import LightningModule, Trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

import metalab.run_dirs  # noqa: F401  (registers the resolvers conf/hydra/default.yaml names)
from metalab.allocator import keep_freed_memory
from metalab.callbacks import StepProgressBar, progress_callbacks
from metalab.checkpoint import AtomicCheckpointIO
from metalab.data import EpisodicDataModule
from metalab.errors import ConfigError, Interrupted, MetalabError, StorageError
from metalab.files import write_atomic, write_json_atomic
from metalab.provenance import TEST_EPISODES_FILE, machine, software, test_episodes_identity
from metalab.results import overrides_of
from metalab.run_log import log, print_config_tree, quiet_known_warnings
from metalab.settings import CONFIG_DIR, EPISODE_SETTINGS


def save_config(cfg: dict, run_dir: Path) -> None:
    """Keep the resolved config in the run directory (config.yaml) and show it as a tree."""
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    print_config_tree(cfg)


def report_error(error, run_dir: Path | None, details: str = "", echo: bool = True) -> Path | None:
    """Print the one-line message (unless not `echo`); keep it (and `details`, e.g. a traceback) in
    run_dir/error.txt.

    Returns the error.txt written, or None where it could not be (a full disk, a read-only
    directory: the message on stderr is then all there is, and says so).
    """
    message = f"metalab: error: {error}"
    if run_dir is not None:
        try:
            write_atomic(run_dir / "error.txt", message + "\n" + (f"\n{details}" if details else ""))
            if echo:
                print(message, file=sys.stderr, flush=True)
            return run_dir / "error.txt"
        except StorageError as failure:
            message += f" (and error.txt could not be kept: {failure})"
    print(message, file=sys.stderr, flush=True)
    return None


def build_datamodule(config: dict) -> EpisodicDataModule:
    return EpisodicDataModule(
        dataset=config["dataset"],
        data_dir=config["paths"]["data_dir"],
        cache_dir=config["paths"]["cache_dir"],
        num_workers=config.get("num_workers", 0),
        trainval=config.get("trainval", False),  # absent from configs written before it existed
        **{key: config[key] for key in EPISODE_SETTINGS},  # under the same names
    )


def build_trainer(config: dict, run_dir: Path, with_callbacks: bool = True) -> Trainer:
    loggers = [instantiate(cfg) for cfg in (config.get("logger") or {}).values()]
    callbacks = [instantiate(cfg) for cfg in (config.get("callbacks") or {}).values()] if with_callbacks else []
    # trainer.enable_progress_bar: metalab's bar of steps on a terminal; the progress lines always
    callbacks += progress_callbacks(config["trainer"].get("enable_progress_bar", True))
    if config["trainer"].get("accelerator") in ("gpu", "cuda"):
        use_tf32(bool(config.get("tf32", False)))
    settings = dict(config["trainer"])
    if config.get("trainval"):  # it trains on the val classes: there is nothing left to validate on
        settings["limit_val_batches"] = 0
    try:
        return Trainer(
            **{**settings, "enable_progress_bar": any(isinstance(c, StepProgressBar) for c in callbacks)},
            default_root_dir=str(run_dir),
            logger=loggers or False,
            callbacks=callbacks,
            enable_checkpointing=with_callbacks,
            plugins=[AtomicCheckpointIO()],
            # The data module shards the fixed evaluation episodes over DDP processes itself,
            # without the repeated episodes Lightning's distributed sampler pads with.
            use_distributed_sampler=False,
        )
    except (MisconfigurationException, ValueError) as error:
        # What Lightning checks in its own code, beyond its signature's types (schema.py): a time
        # that is not DD:HH:MM:SS, a profiler or clipping algorithm it does not know. Its message
        # names the value and what it accepts.
        raise ConfigError(f"Lightning refuses the trainer.* settings: {str(error).splitlines()[0]}") from None


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


def meta_test(
    trainer: Trainer, model: LightningModule, datamodule: EpisodicDataModule, ckpt_path, config: dict
) -> dict:
    """Run the fixed test episodes; returns the logged `test/*` metrics and test throughput."""
    started = time.perf_counter()
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    seconds = time.perf_counter() - started
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    # the episodes actually evaluated: trainer.limit_test_batches or fast_dev_run (debug=) take fewer
    metrics["test_tasks_per_sec"] = (model.eval_episodes.get("test") or datamodule.test_episodes) / seconds
    # TensorBoard's hyper-parameter table: one row per run, with its meta-test result; the other
    # loggers (csv, wandb, mlflow) get the same settings (their test/* metrics came with the test).
    hparams = {
        **summary(config),
        "algorithm": config["algorithm"],
        "backbone": config.get("backbone"),
        "tags": ",".join(config.get("tags") or []),
    }
    scores = {f"hp/{k.removeprefix('test/')}": v for k, v in metrics.items() if k.startswith("test/")}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hparams, scores)
        else:
            logger.log_hyperparams(hparams)
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
        **({"trainval": True} if config.get("trainval") else {}),  # trained on the val classes too
    }


def write_results(
    run_dir: Path, config: dict, metrics: dict, started: float, per_episode: dict | None = None, **extra
) -> dict:
    """results.json, and beside it test_episodes.json: each meta-test episode's values in
    episode order (`per_episode`, the learner's eval_per_episode["test"]) with what fixes
    those episodes, so that runs on the same episodes can be compared pairwise."""
    results = {
        **metrics,
        "config": summary(config),
        "tags": list(config.get("tags") or []),
        "wall_time_sec": time.perf_counter() - started,
        **extra,
        "machine": machine(),
        "software": software(),
    }
    if per_episode is not None and per_episode["episode"]:
        write_json_atomic(run_dir / TEST_EPISODES_FILE, {"episodes": test_episodes_identity(config), **per_episode})
        results["per_episode_file"] = TEST_EPISODES_FILE
    else:  # no meta-test this time: an earlier attempt's values in this directory are not this run's
        (run_dir / TEST_EPISODES_FILE).unlink(missing_ok=True)
    write_json_atomic(run_dir / "results.json", results)
    # A run that finished has no error: drop one left by an earlier attempt in this directory
    # (a requeued SLURM job stopped by SIGTERM), which would mark it failed in a sweep.
    (run_dir / "error.txt").unlink(missing_ok=True)
    for key in sorted(k for k in metrics if k.startswith("test/") and not k.endswith("_ci95")):
        ci = metrics.get(f"{key}_ci95")
        log.info(f"{key} = {metrics[key]:.4f}" + (f" ± {ci:.4f} (95% CI)" if ci is not None else ""))
    log.info(f"results: {run_dir / 'results.json'}")
    return results


def command_line(task: Callable[[DictConfig], float | None], config_name: str) -> Callable[[], None]:
    """A console entry point: Hydra's main around `guarded(task)`.

    Hydra's own errors, raised before the task starts (an unknown group choice such as
    algorithm=foo, a misspelt key, a bad override, a run directory that cannot be made), are
    the same one-line message and exit status 2 as every other bad setting, not Hydra's
    multi-line report and exit 1.
    """

    def hydra_main(cfg: DictConfig) -> float | None:
        _started.append(True)
        keep_freed_memory()
        return guarded(task, cfg)

    # Hydra names the job (its log file, `--help`) after the task function's module: metalab.train
    # or metalab.eval, also under `python -m`, where the module is __main__.
    hydra_main.__module__ = f"metalab.{config_name}"
    hydra_main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(hydra_main)

    def main() -> None:
        _started.clear()
        quiet_known_warnings()
        previous = os.environ.get("HYDRA_FULL_ERROR")
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors here instead of printing them
        try:
            hydra_main()
        except Exception as error:
            if _started:  # the task's own failure: a bug, whose traceback is what helps
                raise
            report_error(hydra_error_message(error), None)
            sys.exit(2)
        finally:
            if previous is None:
                os.environ.pop("HYDRA_FULL_ERROR", None)
            else:
                os.environ["HYDRA_FULL_ERROR"] = previous

    main.__doc__ = task.__doc__
    return main


_started: list[bool] = []  # set once the task function runs: errors before it are Hydra's


def hydra_error_message(error: Exception) -> str | MetalabError:
    """One line for an error Hydra raised while reading the command line and composing the config."""
    chain, cause = [], error
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    own = next((e for e in chain if isinstance(e, MetalabError)), None)
    if own is not None:  # e.g. a run directory that cannot be created, from metalab's resolver
        return own
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and "/" in error.missing_cfg_file:
        group, _, choice = error.missing_cfg_file.rpartition("/")
        if error.options:
            choices = ", ".join(error.options)
            return f"{group}={choice} is unknown (no conf/{group}/{choice}.yaml); choose one of {choices}"
    if isinstance(error, ConfigCompositionException):
        match = re.match(r"Could not override '([^']+)'", str(error))
        if match:
            key = match.group(1)
            given = next((a for a in sys.argv[1:] if a.split("=", 1)[0] == key), key)
            return (
                f"{given}: there is no setting {key} to override; check its spelling "
                f"(--cfg job lists every setting), or add a new key with +{given}"
            )
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


class FailedJobs(Callback):
    """After a sweep (-m), the failed jobs by name with their error.txt, and a non-zero exit status.

    Each failed job wrote error.txt in its own directory (guarded); this reads the sweep
    directory, so it sees jobs run by any launcher, also in other processes (SLURM).
    """

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        failed = sorted(p for p in sweep_dir.rglob("error.txt") if ".submitit" not in p.parts)
        if not failed:
            return
        finished = sum(1 for p in sweep_dir.rglob("results.json") if ".submitit" not in p.parts)
        lines = [f"metalab: error: {len(failed)} job(s) of the sweep failed ({finished} finished) in {sweep_dir}:"]
        for error_file in failed:
            job_dir = error_file.parent
            setting = " ".join(overrides_of(job_dir))
            first = (error_file.read_text(errors="replace").splitlines() or [""])[0].removeprefix("metalab: ")
            lines.append(f"  job {job_dir.name} ({setting}): {first} [{error_file}]")
        print("\n".join(lines), file=sys.stderr, flush=True)
        sys.exit(1)


def guarded(task: Callable[[DictConfig], float | None], cfg: DictConfig) -> float | None:
    """Run a command; a MetalabError becomes a one-line message (and error.txt), not a traceback.

    In a multirun sweep a failing job (any exception) writes error.txt in its run dir and returns
    None, so the other jobs go on (a sweeper records None as a failed trial); FailedJobs reports
    them when all have run.
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
    except SIGTERMException:  # Lightning's way out of a loop on SIGTERM: a SystemExit of status 0
        error = Interrupted("stopped by SIGTERM before the run finished")
    except MetalabError as metalab_error:
        error = metalab_error
    except Exception as crash:
        hydra = HydraConfig.get()
        if hydra.mode != RunMode.MULTIRUN:
            raise  # a bug in a single run: the traceback is what helps
        # In a sweep, one job's crash (out of memory, a diverged run, a bug) must not end the
        # others: keep the traceback in the job's run dir and go on with the next job.
        kept = report_error(
            f"job failed: {type(crash).__name__}: {crash}",
            Path(hydra.runtime.output_dir),
            details=traceback.format_exc(),
            echo=False,
        )
        log.error(
            f"job {hydra.job.num} failed ({type(crash).__name__}: {crash}); "
            f"traceback in {kept or 'no file (it could not be written)'}"
        )
        return None
    hydra = HydraConfig.get()
    report_error(error, Path(hydra.runtime.output_dir))
    if hydra.mode == RunMode.MULTIRUN:
        return None
    sys.exit(error.exit_status)
