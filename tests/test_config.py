"""Every algorithm × dataset × hardware composes, validates and builds its learner."""

import inspect
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from metalab.algorithms import ALGORITHMS
from metalab.errors import ConfigError
from metalab.settings import CONFIG_DIR, group_defaults
from metalab.validation import SPEED_ONLY_BACKBONE, check_algorithm, check_learner_fits_data, resolve

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
    for group in (
        "hardware/cpu",
        "hardware/gpu",
        "backbone/conv4",
        "backbone/mlp",
        "logger/tensorboard",
        "callbacks/default",
        "paths/default",
        "hydra/default",
    ):
        assert (Path(CONFIG_DIR) / f"{group}.yaml").is_file(), group


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_pair_composes_and_builds_or_is_refused_clearly(algorithm, dataset):
    root = ["dataset.root=/some/classes"] if dataset == "image_folder" else []
    cfg = composed(f"algorithm={algorithm}", f"dataset={dataset}", *root)
    assert cfg["algorithm"]["name"] == algorithm and cfg["dataset"]["name"] == dataset
    if not (Path(CONFIG_DIR) / "paper_defaults" / f"{algorithm}_{dataset}.yaml").is_file():  # a paper may test
        assert cfg["test_ways"] == cfg["ways"] and cfg["test_shots"] == cfg["shots"]  # test_* follow training
    check_algorithm(cfg)
    learner_cls, task_type = ALGORITHMS[algorithm], TASK_TYPES.get(dataset, "classification")
    if task_type not in learner_cls.task_types:
        with pytest.raises(ConfigError, match=f"dataset={dataset}"):
            check_learner_fits_data(cfg, learner_cls, task_type)
        return
    check_learner_fits_data(cfg, learner_cls, task_type)
    if cfg["algorithm"].get("num_classes", 0) is None:  # metalab-train takes it from the data (settings_from_data)
        cfg["algorithm"]["num_classes"] = 64
    learner = learner_cls.from_config(cfg, INPUT_SHAPES[dataset], task_type)
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


# The settings that choose only how fast a run goes (docs/speed.md), at their defaults.
SPEED_ONLY = {"algorithm": ("task_execution", "compile"), "backbone": SPEED_ONLY_BACKBONE}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_paper_setting_runs_on_the_default_fast_path(experiment):
    """The long reproduction runs (scripts/reproduce.py runs experiment=...) leave every speed-only
    setting to `auto`, which picks the measured fastest path for the machine."""
    cfg = composed(f"experiment={experiment}")
    chosen = {
        f"{group}.{key}": cfg[group][key] for group, keys in SPEED_ONLY.items() for key in keys if key in cfg[group]
    }
    assert all(value == "auto" for value in chosen.values()), chosen
    if cfg["backbone"]["name"] == "conv4":  # not vacuous where the settings exist
        assert {f"backbone.{key}" for key in SPEED_ONLY["backbone"]} <= chosen.keys()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_compose(experiment):
    cfg = composed(f"experiment={experiment}")
    check_algorithm(cfg)
    # Named <algorithm>_<dataset>_<setting>.
    assert experiment.startswith(f"{cfg['algorithm']['name']}_{cfg['dataset']['name']}_")
    # Each paper setting records the published figure scripts/compare.py and reproduce.py print
    # beside ours (the memory learners: the 2nd instance, and each instance under `figures`), and
    # where given the paper's training budget.
    paper = cfg["paper"]
    # A figure measured in another test setting names the evaluation that makes it (reproduce.py).
    for metric in [paper["metric"], *(paper.get("figures") or {})]:
        evaluation = re.fullmatch(r"(?:(\w+)/)?test/(acc|mse)(_inst\d+|_step\d+)?", metric)
        assert evaluation and paper["source"], paper
        assert evaluation.group(1) is None or evaluation.group(1) in paper["evaluations"], paper
    # More figures: the paper's value, or null where it publishes none (ours is shown alone).
    assert all(value is None or isinstance(value, float) for value in (paper.get("figures") or {}).values())
    budget = paper.get("budget") or {}
    assert set(budget) <= {"steps", "episodes", "note"} and all(
        isinstance(budget.get(k, 0), int) for k in ("steps", "episodes")
    )


def test_hardware_choices():
    assert composed("hardware=cpu")["trainer"]["accelerator"] == "cpu"
    assert composed("hardware=gpu")["trainer"]["accelerator"] == "gpu"


PAPER_DEFAULTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "paper_defaults").glob("*.yaml"))


def test_a_bare_algorithm_and_dataset_is_the_papers_episode_shape():
    protonet = composed("algorithm=protonet", "dataset=omniglot")
    # Snell et al.: one 60-way episode per update, 5 queries per class; tested 5-way with 15.
    assert (protonet["meta_batch_size"], protonet["ways"], protonet["queries"]) == (1, 60, 5)
    assert (protonet["test_ways"], protonet["test_queries"]) == (5, 15)
    maml = composed("algorithm=maml", "dataset=omniglot")
    assert (maml["meta_batch_size"], maml["queries"], maml["algorithm"]["inner_lr"]) == (32, 1, 0.4)
    assert composed("algorithm=reptile", "dataset=mini_imagenet")["meta_batch_size"] == 5
    # Every learner with a paper setting on the dataset has its paper_defaults.
    for algorithm in ALGORITHMS:
        for dataset in ("omniglot", "mini_imagenet"):
            # mann and lstm set their sequence shape in conf/algorithm/; pretrained is for regression only
            if algorithm not in ("mann", "lstm") and "classification" in ALGORITHMS[algorithm].task_types:
                assert f"{algorithm}_{dataset}" in PAPER_DEFAULTS, (algorithm, dataset)
    # The command line still wins.
    assert composed("algorithm=protonet", "dataset=omniglot", "meta_batch_size=4")["meta_batch_size"] == 4


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value}
    return out


def base_of(defaults: list) -> list[str]:
    """The overrides that compose what an experiment file builds on: the experiment it names, or the
    learner's paper setting (conf/paper_defaults/) that its algorithm and dataset select."""
    overrides = []
    for entry in defaults:
        if isinstance(entry, str) and entry != "_self_":
            overrides.append(f"experiment={entry}")
        elif isinstance(entry, dict):
            ((key, value),) = entry.items()
            overrides.append(f"{key.removeprefix('override /')}={value}")
    return overrides


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_state_only_what_differs(experiment):
    """A paper setting is written once: in conf/paper_defaults/ for a learner on a dataset, and an
    experiment adds only its budget, figure and episode shape, or what differs from the experiment
    it builds on. (tests/test_composed_configs.py keeps the composed result the same.)"""
    own = yaml.safe_load((Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml").read_text())
    base = composed(*base_of(own.pop("defaults")))
    restated = {key: value for key, value in flat(own).items() if key in flat(base) and flat(base)[key] == value}
    assert not restated, f"conf/experiment/{experiment}.yaml restates what it builds on: {restated}"


def test_a_backbone_option_of_another_backbone_is_refused_clearly():
    from metalab.backbones import build_backbone

    with pytest.raises(
        ConfigError,
        match=r"backbone=mlp has no option batch_norm_scale, global_average, pooled_blocks, stride .*; "
        r"remove with ~backbone.batch_norm_scale ~backbone.global_average ~backbone.pooled_blocks ~backbone.stride",
    ):
        build_backbone(composed("algorithm=maml", "dataset=omniglot", "backbone=mlp")["backbone"], (1, 28, 28))


def test_one_positivity_check_names_the_value_the_meaning_and_a_fix():
    from metalab.errors import check_meta_batch_split, check_positive

    for good, integer in ((1, True), (7, True), (0.5, False), (3, False)):
        check_positive("x", good, 5, integer=integer)
    for bad, integer in (
        (0, True),
        (-2, True),
        (2.5, True),
        (True, True),
        ("5", True),
        (None, True),
        (0.0, False),
        (float("inf"), False),
        (float("nan"), False),
        (False, False),
    ):
        with pytest.raises(ConfigError, match=r"^x=.* must be a positive (integer|number); set e\.g\. x=5$"):
            check_positive("x", bad, 5, integer=integer)
    with pytest.raises(
        ConfigError,
        match=r"^algorithm\.read_steps=0 must be a positive integer \(the LSTM's K\), or "
        r"null; set e\.g\. algorithm\.read_steps=5$",
    ):
        check_positive("algorithm.read_steps", 0, 5, meaning="the LSTM's K", otherwise="null")
    check_meta_batch_split(8, 4)
    with pytest.raises(ConfigError, match="meta_batch_size=6 does not split evenly over 4 DDP processes"):
        check_meta_batch_split(6, 4)


def test_an_experiment_that_shares_a_setting_builds_on_it():
    """First-order MAML and ANIL take MAML's experiments, Baseline++ Baseline's, MANN the LSTM's, the
    sinusoid learners MAML's, and a 10-shot or second shape the experiment it shares the rest with: each names the
    experiment it builds on in its defaults list and states only what differs (its algorithm, its
    own values, its paper figure; test_experiments_state_only_what_differs checks each value)."""
    experiments = Path(CONFIG_DIR) / "experiment"
    builders = {p.stem: yaml.safe_load(p.read_text()) for p in experiments.glob("*.yaml")}
    children = {
        name: next(d for d in cfg["defaults"] if isinstance(d, str))
        for name, cfg in builders.items()
        if any(isinstance(d, str) for d in cfg.get("defaults", []))
    }
    assert {name for name in builders if name.startswith(("fomaml_", "anil_", "baselinepp_"))} <= set(children)
    for name, base in children.items():
        algorithm, setting = name.split("_", 1)
        dataset = setting.rsplit("_", 1)[0]
        assert base in builders and base.split("_", 1)[1].rsplit("_", 1)[0] == dataset, name
        if base.split("_", 1)[0] != algorithm:  # another learner's experiment of the same shape
            assert base == {"baselinepp": "baseline", "mann": "lstm"}.get(algorithm, "maml") + "_" + setting, name
        own = set(builders[name]) - {"defaults", "paper"}
        assert len(yaml.safe_dump({k: builders[name][k] for k in own}).splitlines()) <= 8, name


def test_each_group_file_names_the_class_it_builds():
    """conf/algorithm/<name>.yaml and conf/backbone/<name>.yaml name their class in `_target_`: a
    reader goes from the yaml to the code in one step, and it is the class the name builds."""
    from metalab.algorithms import learner_class
    from metalab.backbones import BACKBONES, backbone_class
    from metalab.settings import group_defaults

    for name in ALGORITHMS:
        target = group_defaults("algorithm", name)["_target_"]
        assert learner_class({"_target_": target}) is ALGORITHMS[name], name
    for name in BACKBONES:
        target = group_defaults("backbone", name)["_target_"]
        assert backbone_class(target) is BACKBONES[name], name
    from metalab.data.datamodule import DATASETS as DATASET_CLASSES
    from metalab.data.datamodule import dataset_class

    for name in DATASETS:
        target = group_defaults("dataset", name)["_target_"]
        assert dataset_class(target) is DATASET_CLASSES[name], name
    with pytest.raises(ConfigError, match=r"dataset._target_='os.system' is not one of metalab's classes"):
        dataset_class("os.system")


@pytest.mark.parametrize("name", DATASETS)
def test_a_datasets_yaml_keys_are_its_constructors_arguments(name):
    """conf/dataset/<name>.yaml reads as the call it makes, as the learners' do: its settings are
    the keyword arguments of the class its `_target_` names (beside the keys that are the data
    module's: `episodes`, and the checkpointing's metric)."""
    import inspect

    from metalab.data.datamodule import DATASETS as DATASET_CLASSES
    from metalab.data.datamodule import NOT_THE_DATASETS
    from metalab.settings import group_defaults

    settings = {k for k in group_defaults("dataset", name) if k not in NOT_THE_DATASETS}
    parameters = inspect.signature(DATASET_CLASSES[name]).parameters
    assert settings == set(parameters), name
    required = {key for key, p in parameters.items() if p.default is inspect.Parameter.empty}
    # Only paths a composed run fills in (`???`, `${paths.data_dir}/...`) may have a default: None, not given.
    assert all(parameters[key].default is None for key in set(parameters) - required), name


def test_a_default_is_written_once_in_its_yaml(tmp_path, monkeypatch):
    """conf/<group>/<name>.yaml is the one place a setting's default lives: change it there and a
    config written without the setting (a test, a script) follows it; no second copy in the code."""
    import shutil

    from metalab.data.datamodule import build_sources

    conf = tmp_path / "conf"
    shutil.copytree(CONFIG_DIR, conf)
    for path, old, new in (
        (conf / "algorithm" / "matchingnet.yaml", "read_steps: 5", "read_steps: 2"),
        (conf / "dataset" / "sinusoid.yaml", "x_range: [-5.0, 5.0]", "x_range: [-1.0, 2.0]"),
    ):
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new))
    monkeypatch.setattr("metalab.settings.CONFIG_DIR", str(conf))
    model = ALGORITHMS["matchingnet"].from_config(
        {
            "algorithm": {"name": "matchingnet", "fce": True},
            "backbone": {"name": "conv4", "hidden_channels": 4, "blocks": 2},
            "ways": 5,
        },
        [1, 8, 8],
        "classification",
    )
    assert model.read_steps == 2 and model.scale == 1.0
    assert build_sources({"name": "sinusoid"}, tmp_path, tmp_path)["train"].x_range == (-1.0, 2.0)


def learner_arguments(name: str) -> tuple[dict, dict]:
    """(the settings conf/algorithm/<name>.yaml gives its learner, the run context every learner takes)."""
    from metalab.settings import group_defaults, with_group_defaults

    settings = {k: v for k, v in group_defaults("algorithm", name).items() if k not in ("name", "_target_")}
    if "num_classes" in settings:  # metalab-train sets it from the data
        settings["num_classes"] = 64
    regression = name == "pretrained"
    context = {
        "backbone": with_group_defaults("backbone", {"name": "mlp" if regression else "conv4"}),
        "input_shape": [1] if regression else [1, 28, 28],
        "task_type": "regression" if regression else "classification",
        "ways": 5,
    }
    return settings, context


def constructor_defaults(cls) -> dict:
    """{argument: default} of a learner's constructor, its own and those it passes on to its bases
    (`**settings`), the nearest class's default where two give one."""
    defaults: dict = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is torch.nn.Module:
            continue
        for key, parameter in inspect.signature(vars(klass)["__init__"]).parameters.items():
            if parameter.default is not inspect.Parameter.empty:
                defaults.setdefault(key, parameter.default)
    return defaults


def plain(value):
    """A default as the yaml would write it (read-only mappings and tuples as dicts and lists)."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [plain(item) for item in value]
    return value


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_learners_constructor_defaults_are_its_yamls_settings(name):
    """conf/algorithm/<name>.yaml reads as the call it makes, and the constructor's defaults are the
    same paper settings, so a learner built from Python (`MAML(backbone=..., inner_lr=0.4)`) is the
    documented one: every key of the yaml is a keyword argument of its class with that very value as
    default (a value that needs the run's config, `${trainer.max_steps}`, excepted: it has none in
    code); and the yaml lists every setting the class takes."""
    settings, context = learner_arguments(name)
    learner = ALGORITHMS[name](**settings, **context)  # built from the yaml's keys
    assert learner.run_config is None and sum(p.numel() for p in learner.parameters()) > 0
    defaults = constructor_defaults(ALGORITHMS[name])
    yaml_settings = {k: v for k, v in group_defaults("algorithm", name).items() if k not in ("name", "_target_")}
    for key, value in yaml_settings.items():
        if key == "compile":  # auto decides from the run's trainer settings: from Python, without one, eager
            assert defaults[key] is False, name
            continue
        if "${" in str(value):
            continue
        assert key in defaults, f"{name}: {key} has no default in code"
        assert plain(defaults[key]) == value, f"{name}: {key} defaults to {defaults[key]!r}, the yaml says {value!r}"
    # A setting with a default in code that the yaml leaves out must be one the class fixes itself
    # (ANIL's adapt_norm=False: giving it is a TypeError), not one the yaml forgot to document.
    # compile is shared (SHARED_ALGORITHM_KEYS): a learner without a compiled path leaves it out.
    for key in sorted(set(defaults) - set(yaml_settings) - set(context) - {"eval_seed", "run_config", "compile"}):
        with pytest.raises(TypeError, match="multiple values|unexpected keyword"):
            ALGORITHMS[name](**settings, **context, **{key: defaults[key]})
            pytest.fail(f"{name}: {key} has a default in code but is not in its yaml")
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_setting'"):
        ALGORITHMS[name](**settings, **context, no_such_setting=1)


def test_a_hand_written_config_with_a_setting_its_learner_lacks_is_refused_by_name():
    """from_config (metalab-eval's and the API's way in, and scripts') refuses a key the learner
    would ignore, naming it and the fix, instead of dropping it or a TypeError."""
    config = {"algorithm": {"name": "protonet", "inner_lr": 0.1}, "backbone": {"name": "conv4"}, "ways": 5}
    with pytest.raises(ConfigError, match=r"algorithm=protonet has no setting inner_lr.*~algorithm.inner_lr"):
        ALGORITHMS["protonet"].from_config(config, [1, 28, 28], "classification")


def test_lightning_load_from_checkpoint_rebuilds_the_learner_without_unpickling(tmp_path):
    """`ProtoNet.load_from_checkpoint(path)`, Lightning's spelling, gives the stored learner with its
    weights through metalab's reader; asked of another learner class, it says what the file holds."""
    import torch

    from metalab.checkpoint import MARKER

    settings, context = learner_arguments("protonet")
    run = {"algorithm": {"name": "protonet", **settings}, "backbone": context["backbone"], "ways": 5}
    model = ALGORITHMS["protonet"].from_config(run, [1, 28, 28], "classification")
    path = tmp_path / "protonet.ckpt"
    torch.save({MARKER: "0", "hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, path)
    loaded = ALGORITHMS["protonet"].load_from_checkpoint(path)
    assert type(loaded) is type(model) and loaded.run_config["algorithm"]["batch_norm"] == "running"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ConfigError, match="holds a ProtoNet, not a MAML"):
        ALGORITHMS["maml"].load_from_checkpoint(path)


def test_a_checkpoint_rebuilds_its_learner_without_the_config_directory(tmp_path, monkeypatch):
    """The run config a checkpoint stores holds every setting its learner was built with, filled in
    from the yamls when built, so a file loads where no conf/ is at hand (an installed package, a
    user's own config directory) and predicts as before."""
    import torch

    from metalab.algorithms.base import MetaLearner
    from metalab.checkpoint import MARKER
    from metalab.settings import with_group_defaults

    run = {"algorithm": {"name": "matchingnet"}, "backbone": {"name": "conv4", "hidden_channels": 8}, "ways": 5}
    model = ALGORITHMS["matchingnet"].from_config(run, [1, 28, 28], "classification").eval()
    checkpoint = {MARKER: "0", "hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}
    stored = checkpoint["hyper_parameters"]["config"]["algorithm"]
    assert stored == with_group_defaults("algorithm", {"name": "matchingnet"}) and stored["read_steps"] == 5
    monkeypatch.setattr("metalab.settings.CONFIG_DIR", str(tmp_path / "no_conf_here"))
    loaded = MetaLearner.from_checkpoint("x.ckpt", checkpoint).eval()
    support, labels, query = torch.rand(1, 5, 1, 28, 28), torch.arange(5)[None], torch.rand(1, 3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.predict(loaded.adapt(support, labels), query), model.predict(model.adapt(support, labels), query)
        )
