"""metalab-eval: meta-test a checkpoint on fixed episodes.

    metalab-eval ckpt_path=<run>/checkpoints/last.ckpt
    metalab-eval ckpt_path=... dataset=image_folder dataset.root=/my/classes test_ways=5   # cross-domain

The checkpoint carries its training config; values given here (test_*, eval_seed,
eval_inner_steps, transductive, dataset, paths, hardware, tf32, logger) replace those for
this evaluation only. Anything else (the learner, its backbone, training settings) cannot
change at evaluation and is refused, saying why, rather than dropped.
"""

import copy
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from metalab import schema
from metalab.algorithms.base import MetaLearner
from metalab.checkpoint import RUN_GROUPS, read_checkpoint
from metalab.errors import ConfigError
from metalab.hardware import check_hardware, require_positive_int
from metalab.memory import check_episode_counts
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
from metalab.settings import EVALUATION_KEYS, SHARED_DATASET_KEYS, TEST_EPISODE_KEYS, check_group_keys
from metalab.validation import check_learner_fits_data, check_loggers, check_trainer_section, resolve

# The episode settings a meta-test may change: which fixed episodes, their shape, how batched.
OVERRIDABLE = ("eval_seed", *TEST_EPISODE_KEYS, "test_episodes", "eval_batch_size")
# Run settings taken from this command, not the checkpoint: where and on what it runs.
FROM_COMMAND = ("paths", "trainer", "logger", "num_workers", "tags", "tf32")
# Everything this command's line may set (evaluation_config reads each; `hardware`, `paths`,
# `logger`, `dataset` are also group choices).
ACTING = (
    *OVERRIDABLE,
    *FROM_COMMAND,
    "ckpt_path",
    "task_name",
    "eval_inner_steps",
    "transductive",
    "dataset",
    "hardware",
    "hydra",
)
# Settings that cannot change at evaluation, and why (anything else not in ACTING: generic).
FIXED_AT_TRAINING = {
    "algorithm": "the learner and its hyper-parameters are the checkpoint's (only eval_inner_steps and "
    "transductive change at meta-test)",
    "backbone": "the network's architecture is the checkpoint's, its weights were trained for it",
    "ways": "the checkpoint was trained with its ways; meta-test another number with test_ways",
    "shots": "it is a training setting; meta-test another number with test_shots",
    "queries": "it is a training setting; meta-test another number with test_queries",
    "seed": "it seeds training; the meta-test episodes follow eval_seed",
    "meta_batch_size": "it is a training setting; evaluation batches are eval_batch_size",
    "val_episodes": "metalab-eval runs the test episodes only; set test_episodes",
}


def evaluation_config(config: dict, trained: dict, input_shape: list[int], chosen: list[str]) -> dict:
    """The checkpoint's training config with this command's choices laid over it.

    `chosen` are the command line's overrides (`key=value`): a dataset setting given there is
    kept as given; one left out that shapes the model's input takes the checkpoint's value.
    """
    run = copy.deepcopy(trained)
    run["task_name"] = "eval"
    run["ckpt_path"] = config["ckpt_path"]
    for key in OVERRIDABLE:
        if config.get(key) is not None:
            run[key] = config[key]
    given = {item.split("=", 1)[0].lstrip("+~") for item in chosen}
    refuse_inactive(given)
    for key in FROM_COMMAND:  # tf32 too: a hardware setting of this run, not the training's
        run[key] = config.get(key)
    if config.get("eval_inner_steps") is not None:
        if "eval_inner_steps" not in run["algorithm"]:
            raise ConfigError(
                f"eval_inner_steps applies to learners with an inner loop, not "
                f"algorithm={run['algorithm']['name']}; leave it out"
            )
        run["algorithm"]["eval_inner_steps"] = config["eval_inner_steps"]
        require_positive_int(run["algorithm"], "eval_inner_steps")
    if config.get("transductive") is not None:  # Reptile: predict the queries together, or each beside the support
        if "transductive" not in run["algorithm"]:
            raise ConfigError(
                f"transductive applies to learners with that option (reptile), not "
                f"algorithm={run['algorithm']['name']}; leave it out"
            )
        run["algorithm"]["transductive"] = bool(config["transductive"])
    dataset = config.get("dataset")
    if dataset is not None and dataset != trained["dataset"]:
        run["dataset"] = dataset = dict(dataset)
        check_group_keys("dataset", dataset, SHARED_DATASET_KEYS)  # the checkpoint's own is not re-judged
        if len(input_shape) == 3:
            transform_as_trained(dataset, trained["dataset"], input_shape, given)
        # The episode shape the learner reads (few-shot episodes or sequences) goes along.
        if "episodes" in trained["dataset"] and "dataset.episodes" not in given:
            dataset["episodes"] = trained["dataset"]["episodes"]
        # A folder that is not split into train/val/test is all meta-test classes,
        # unless the command says otherwise.
        if dataset.get("split_fractions") is not None and "dataset.split_fractions" not in given:
            dataset["split_fractions"] = {"train": 0.0, "val": 0.0, "test": 1.0}
    return run


def refuse_inactive(given: set[str]) -> None:
    """A setting on this command line that evaluation would not use is refused, not dropped."""
    for key in sorted(given):
        top = key.split(".", 1)[0]
        if top in ACTING:
            continue
        why = FIXED_AT_TRAINING.get(top, "metalab-eval does not read it")
        raise ConfigError(
            f"{key} cannot change at evaluation: {why}; leave it out (what metalab-eval sets: {', '.join(ACTING)})"
        )


def transform_as_trained(dataset: dict, trained: dict, input_shape: list[int], given: set[str]) -> None:
    """Cross-domain: bring the images to what the model was trained on, as metalab-predict and
    load_learner do (api.ImageTransform): the checkpoint's size, channels, ink polarity and resampling,
    unless the command sets them; the choice is printed. (Images are scaled to [0, 1] and not
    otherwise normalized, in training as here.)"""
    chosen = {
        "image_size": input_shape[-1],
        "channels": input_shape[0],
        "invert": bool(trained.get("invert", False)),
        "resample": trained.get("resample", "lanczos"),
    }
    described = []
    for key, value in chosen.items():
        if key not in dataset and key != "invert":
            continue  # a dataset without the setting (omniglot has no channels): nothing to bring
        if f"dataset.{key}" in given:
            described.append(f"{key}={dataset[key]} (given)")
        else:
            dataset[key] = value
            described.append(f"{key}={value} (the checkpoint's)")
    log.warning(f"images as the model sees them: {', '.join(described)}; set dataset.<key>= to change one")


def evaluate(cfg: DictConfig) -> float | None:
    started = time.perf_counter()
    config = resolve(cfg)
    run_dir = Path(config["paths"]["run_dir"])
    checkpoint = read_checkpoint(config["ckpt_path"], groups=RUN_GROUPS)
    hyper = checkpoint["hyper_parameters"]
    run = evaluation_config(config, hyper["config"], hyper["input_shape"], list(HydraConfig.get().overrides.task))
    if process_rank() == 0:  # under DDP every process runs this command in the same run dir
        save_config(run, run_dir)

    check_trainer_section(run)
    check_loggers(run)
    schema.check_numbers(run)
    for key in (*TEST_EPISODE_KEYS, *EVALUATION_KEYS):
        require_positive_int(run, key)
    check_hardware(run["trainer"])
    schema.check_trainer(run["trainer"])
    schema.check_seeds({"seed": 0, "eval_seed": run.get("eval_seed")})  # the training seed is the checkpoint's
    check_episode_counts(run, ("test_episodes",))
    trainer = build_trainer(run, run_dir, with_callbacks=False)  # Lightning's own refusals, before the data
    datamodule = build_datamodule(run)
    datamodule.setup("test")
    if list(datamodule.input_shape) != list(hyper["input_shape"]):
        raise ConfigError(
            f"dataset={run['dataset']['name']} gives inputs of shape {list(datamodule.input_shape)} but the "
            f"checkpoint expects {hyper['input_shape']}; choose a dataset of the same kind"
        )
    # The learner gets this evaluation's config (e.g. eval_inner_steps), the checkpoint's weights.
    model = MetaLearner.from_checkpoint(config["ckpt_path"], checkpoint, config=run)
    check_learner_fits_data(run, type(model), datamodule.task_type)
    metrics = meta_test(trainer, model, datamodule, None, run)
    if trainer.is_global_zero:  # the metrics are already gathered from every process
        write_results(
            run_dir,
            run,
            metrics,
            started,
            tested_checkpoint=config["ckpt_path"],
            world_size=trainer.world_size,
            test_episodes_evaluated=model.eval_episodes.get("test"),
            per_episode=model.eval_per_episode.get("test"),
        )
    return metrics.get(f"test/{model.metric}")


main = command_line(evaluate, "eval")


if __name__ == "__main__":
    main()
