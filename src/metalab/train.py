"""metalab-train: meta-train a learner, then meta-test it on fixed episodes.

metalab-train algorithm=protonet dataset=omniglot ways=60 test_ways=5 shots=1
metalab-train -m algorithm=maml,protonet dataset=omniglot     # a sweep, one run dir per job
metalab-train hardware=ddp trainer.devices=4                  # 4 GPUs, the meta-batch split over them
metalab-train ckpt_path=<run>/checkpoints/last.ckpt           # resume a killed run where it stopped
"""

import time
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from metalab.algorithms import ALGORITHMS, learner_class
from metalab.algorithms.compile_passes import check_compile
from metalab.errors import Interrupted
from metalab.hardware import check_distributed, world_size
from metalab.memory import check_meta_batch_fits
from metalab.run_dirs import requeued_checkpoint, slurm_job_name
from metalab.run_log import log
from metalab.runner import (
    build_datamodule,
    build_trainer,
    command_line,
    meta_test,
    process_rank,
    save_config,
    write_results,
)
from metalab.schema import check_added_settings
from metalab.validation import check_learner_fits_data, check_train_config, resolve


def train(cfg: DictConfig) -> float | None:
    started = time.perf_counter()
    config = resolve(cfg)
    run_dir = Path(config["paths"]["run_dir"])
    if config.get("ckpt_path") is None:
        # A SLURM job that was requeued (pre-empted, or on Lightning's requeue signal) runs this
        # same command again, in the same run directory: it resumes from its newest checkpoint.
        requeued = requeued_checkpoint(run_dir)
        if requeued is not None:
            config["ckpt_path"] = str(requeued)
            log.warning(f"requeued SLURM job: resuming from {requeued}")
    if process_rank() == 0:  # DDP's other processes run this same function in the same run dir
        save_config(config, run_dir)

    # Everything that can be wrong is checked before the first step.
    hydra_cfg = HydraConfig.get()
    groups = [group.split("/")[0] for group in hydra_cfg.runtime.choices]
    check_added_settings(hydra_cfg.overrides.task, config_groups=groups)
    check_train_config(config)
    check_distributed(
        config, multirun=hydra_cfg.mode == RunMode.MULTIRUN, launcher=str(hydra_cfg.launcher.get("_target_", ""))
    )
    # Built before the data is read: what Lightning refuses in its own code comes before any work.
    trainer = build_trainer(config, run_dir)
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    if datamodule.trainval:
        log.info(
            "trainval=true: training on the train and val classes together; no validation; the last weights are tested"
        )
    learner_cls = learner_class(config["algorithm"])
    check_learner_fits_data(config, learner_cls, datamodule.task_type)
    learner_cls.settings_from_data(config, datamodule)  # e.g. a classifier sized to the training classes
    check_compile(config, learner_cls, ALGORITHMS)  # training only: evaluation never compiles

    L.seed_everything(config["seed"], workers=True, verbose=False)
    model = learner_cls.from_config(config, list(datamodule.input_shape), datamodule.task_type)
    if model.compile_fallback:
        log.info(model.compile_choice)  # what algorithm.compile=auto chose, and why
    check_meta_batch_fits(
        model,
        datamodule,
        config["meta_batch_size"],
        processes=world_size(config["trainer"]),
        accelerator=str(config["trainer"].get("accelerator", "cpu")),
    )
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=config["ckpt_path"])
    except SIGTERMException:
        # Lightning stopped at the end of an outer step; ResumableCheckpoint saved last.ckpt.
        saver = trainer.checkpoint_callback
        if saver is None or not saver.last_model_path or saver._last_global_step_saved != trainer.global_step:
            raise Interrupted(
                f"stopped by SIGTERM at step {trainer.global_step}; no checkpoint of that step was "
                "saved (checkpointing is off)"
            ) from None
        last = saver.last_model_path
        resume = (
            "a requeued SLURM job resumes from it by itself" if slurm_job_name() else f"resume with ckpt_path={last}"
        )
        raise Interrupted(
            f"stopped by SIGTERM at step {trainer.global_step}; its state is saved in {last}; {resume}"
        ) from None

    metrics, tested = {}, None
    if config["test_after_training"]:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        # None: the weights as training left them (the last step's)
        tested = best or None if config.get("test_checkpoint", "best") == "best" else None
        metrics = meta_test(trainer, model, datamodule, tested, config)
    # What a sweeper optimizes: the best validation score (the tested checkpoint's), never the
    # meta-test one; the meta-test metric only where no validation ran.
    best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    val_best = float(best) if best is not None else None
    objective = val_best if val_best is not None else metrics.get(f"test/{model.metric}")
    if not trainer.is_global_zero:
        return objective
    # Each process timed its own share of every meta-batch, in parallel with the others.
    train_rate = model.timed_tasks * trainer.world_size / model.train_time if model.train_time else None
    write_results(
        run_dir,
        config,
        metrics,
        started,
        train_tasks_per_sec=train_rate,
        tested_checkpoint=tested,
        test_checkpoint=config.get("test_checkpoint", "best"),  # which weights were tested: best or last
        last_checkpoint=str(run_dir / "checkpoints" / "last.ckpt"),
        global_step=trainer.global_step,
        world_size=trainer.world_size,
        test_episodes_evaluated=model.eval_episodes.get("test"),
        per_episode=model.eval_per_episode.get("test"),
        **{f"val/{model.metric}": val_best},
    )
    return objective


main = command_line(train, "train")


if __name__ == "__main__":
    main()
