"""Every algorithm × dataset × hardware composes, validates and builds its learner."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from metalab.algorithms import ALGORITHMS
from metalab.config import check_algorithm, check_learner_fits_data, resolve
from metalab.errors import ConfigError
from metalab.paths import CONFIG_DIR

DATASETS = sorted(p.stem for p in (Path(CONFIG_DIR) / "dataset").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
# What each dataset's images look like to the model (no data is read here).
INPUT_SHAPES = {"sinusoid": [1], "omniglot": [1, 28, 28], "image_folder": [3, 84, 84], "mini_imagenet": [3, 84, 84]}
TASK_TYPES = {"sinusoid": "regression"}


def composed(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["paths.run_dir=unused", *overrides])
    return resolve(cfg)


def test_config_groups_cover_the_public_names():
    assert set(ALGORITHMS) == {p.stem for p in (Path(CONFIG_DIR) / "algorithm").glob("*.yaml")}
    assert set(DATASETS) == {"sinusoid", "omniglot", "image_folder", "mini_imagenet"}
    for group in ("hardware/cpu", "hardware/gpu", "backbone/conv4", "backbone/mlp", "logger/tensorboard",
                  "callbacks/default", "paths/default", "hydra/default"):
        assert (Path(CONFIG_DIR) / f"{group}.yaml").is_file(), group


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_pair_composes_and_builds_or_is_refused_clearly(algorithm, dataset):
    root = ["dataset.root=/some/classes"] if dataset == "image_folder" else []
    cfg = composed(f"algorithm={algorithm}", f"dataset={dataset}", *root)
    assert cfg["algorithm"]["name"] == algorithm and cfg["dataset"]["name"] == dataset
    assert cfg["test_ways"] == cfg["ways"] and cfg["test_shots"] == cfg["shots"]  # test_* follow training
    check_algorithm(cfg, ALGORITHMS)
    learner_cls, task_type = ALGORITHMS[algorithm], TASK_TYPES.get(dataset, "classification")
    if task_type not in learner_cls.task_types:
        with pytest.raises(ConfigError, match=f"dataset={dataset}"):
            check_learner_fits_data(cfg, learner_cls, task_type)
        return
    check_learner_fits_data(cfg, learner_cls, task_type)
    learner = learner_cls(cfg, INPUT_SHAPES[dataset], task_type)
    assert sum(p.numel() for p in learner.parameters()) > 0


def test_datasets_choose_their_backbone_and_episode_defaults():
    sinusoid = composed("dataset=sinusoid")
    assert sinusoid["backbone"]["name"] == "mlp" and sinusoid["shots"] == 10
    omniglot = composed("dataset=omniglot")
    assert omniglot["backbone"]["name"] == "conv4" and (omniglot["ways"], omniglot["shots"]) == (5, 1)
    # The command line still wins over the dataset's choices.
    assert composed("dataset=sinusoid", "shots=5", "backbone=conv4")["backbone"]["name"] == "conv4"


def test_test_episode_settings_default_to_training_and_can_differ():
    cfg = composed("dataset=omniglot", "algorithm=protonet", "ways=60", "test_ways=5")
    assert (cfg["ways"], cfg["test_ways"], cfg["test_episodes"]) == (60, 5, 600)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_compose(experiment):
    cfg = composed(f"experiment={experiment}")
    check_algorithm(cfg, ALGORITHMS)
    # Named <algorithm>_<dataset>_<setting>.
    assert experiment.startswith(f"{cfg['algorithm']['name']}_{cfg['dataset']['name']}_")
    # Each few-shot paper setting records the published figure scripts/compare.py prints beside ours
    # (the memory learners report a curve over instances, which one figure cannot hold).
    if cfg["algorithm"]["name"] not in ("mann", "lstm"):
        paper = cfg["paper"]
        assert paper["metric"] in ("test/acc", "test/mse") and paper["source"], paper


def test_hardware_choices():
    assert composed("hardware=cpu")["trainer"]["accelerator"] == "cpu"
    assert composed("hardware=gpu")["trainer"]["accelerator"] == "gpu"
