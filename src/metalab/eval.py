"""metalab-eval: meta-test a checkpoint on fixed episodes.

    metalab-eval ckpt_path=<run>/checkpoints/last.ckpt
    metalab-eval ckpt_path=... dataset=image_folder dataset.root=/my/classes test_ways=5   # cross-domain

The checkpoint carries its training config; values given here (test_*, eval_seed,
dataset, paths, hardware) replace those for this evaluation only.
"""

import copy
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from metalab.algorithms import ALGORITHMS
from metalab.checkpoint import read_checkpoint
from metalab.config import (
    EVAL_KEYS,
    check_hardware,
    check_learner_fits_data,
    require_positive_int,
    resolve,
    save_config,
)
from metalab.errors import ConfigError
from metalab.memory import keep_freed_memory
from metalab.paths import CONFIG_DIR
from metalab.runner import build_datamodule, build_trainer, guarded, meta_test, process_rank, write_results

OVERRIDABLE = ("eval_seed", "test_ways", "test_shots", "test_queries", "test_episodes", "eval_batch_size")


def evaluation_config(config: dict, trained: dict, input_shape: list[int]) -> dict:
    """The checkpoint's training config with this command's choices laid over it."""
    run = copy.deepcopy(trained)
    run["task_name"] = "eval"
    run["ckpt_path"] = config["ckpt_path"]
    for key in OVERRIDABLE:
        if config.get(key) is not None:
            run[key] = config[key]
    for key in ("paths", "trainer", "logger", "num_workers"):
        run[key] = config.get(key)
    if config.get("eval_inner_steps") is not None:
        if "eval_inner_steps" not in run["algorithm"]:
            raise ConfigError(f"eval_inner_steps applies to learners with an inner loop, not "
                              f"algorithm={run['algorithm']['name']}; leave it out")
        run["algorithm"]["eval_inner_steps"] = config["eval_inner_steps"]
        require_positive_int(run["algorithm"], "eval_inner_steps")
    if config.get("transductive") is not None:  # Reptile: predict the queries together, or each beside the support
        if "transductive" not in run["algorithm"]:
            raise ConfigError(f"transductive applies to learners with that option (reptile), not "
                              f"algorithm={run['algorithm']['name']}; leave it out")
        run["algorithm"]["transductive"] = bool(config["transductive"])
    dataset = config.get("dataset")
    if dataset is not None and dataset != trained["dataset"]:
        run["dataset"] = dataset = dict(dataset)
        # Cross-domain: bring the images to what the model was trained on.
        if "image_size" in dataset and len(input_shape) == 3:
            dataset["image_size"] = input_shape[-1]
        if "channels" in dataset and len(input_shape) == 3:
            dataset["channels"] = input_shape[0]
        # The episode shape the learner reads (few-shot episodes or sequences) goes along.
        if "episodes" in trained["dataset"] and "dataset.episodes" not in " ".join(HydraConfig.get().overrides.task):
            dataset["episodes"] = trained["dataset"]["episodes"]
        # A folder that is not split into train/val/test is all meta-test classes,
        # unless the command says otherwise.
        chosen = " ".join(HydraConfig.get().overrides.task)
        if dataset.get("split_fractions") is not None and "dataset.split_fractions" not in chosen:
            dataset["split_fractions"] = {"train": 0.0, "val": 0.0, "test": 1.0}
    return run


def evaluate(cfg: DictConfig) -> float | None:
    started = time.perf_counter()
    config = resolve(cfg)
    run_dir = Path(config["paths"]["run_dir"])
    checkpoint = read_checkpoint(config["ckpt_path"])
    hyper = checkpoint["hyper_parameters"]
    run = evaluation_config(config, hyper["config"], hyper["input_shape"])
    if process_rank() == 0:  # under DDP every process runs this command in the same run dir
        save_config(run, run_dir)

    for key in EVAL_KEYS:
        require_positive_int(run, key)
    check_hardware(run["trainer"])
    datamodule = build_datamodule(run)
    datamodule.setup("test")
    if list(datamodule.input_shape) != list(hyper["input_shape"]):
        raise ConfigError(
            f"dataset={run['dataset']['name']} gives inputs of shape {list(datamodule.input_shape)} but the "
            f"checkpoint expects {hyper['input_shape']}; choose a dataset of the same kind"
        )
    learner_cls = ALGORITHMS[run["algorithm"]["name"]]
    check_learner_fits_data(run, learner_cls, datamodule.task_type)

    # The learner gets this evaluation's config (e.g. eval_inner_steps), the checkpoint's weights.
    model = learner_cls.load_from_checkpoint(config["ckpt_path"], map_location="cpu", config=run)
    trainer = build_trainer(run, run_dir, with_callbacks=False)
    metrics = meta_test(trainer, model, datamodule, None, run)
    if trainer.is_global_zero:  # the metrics are already gathered from every process
        write_results(run_dir, run, metrics, started, tested_checkpoint=config["ckpt_path"],
                      world_size=trainer.world_size, test_episodes_evaluated=model.eval_episodes.get("test"))
    return metrics.get(f"test/{model.metric}")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> float | None:
    keep_freed_memory()
    return guarded(evaluate, cfg)


if __name__ == "__main__":
    main()
