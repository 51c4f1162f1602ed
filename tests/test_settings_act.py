"""Every setting either acts or is refused (issue 15): no key is accepted and then ignored."""

import json

import pytest
from hydra import compose, initialize_config_dir
from preloaded_cli import metalab_command, trained_briefly

from metalab.algorithms import ALGORITHMS
from metalab.backbones import build_backbone
from metalab.errors import ConfigError
from metalab.eval import evaluation_config
from metalab.settings import CONFIG_DIR
from metalab.validation import check_algorithm, check_learner_fits_data, check_train_config, resolve


def composed(config_name: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return resolve(compose(config_name, overrides=["paths.run_dir=unused", *overrides]))


# ---------------------------------------------------------------- learner settings
def test_fomaml_refuses_second_order_instead_of_ignoring_it():
    check_algorithm(composed("train", "algorithm=fomaml"))  # its own value is fine
    with pytest.raises(
        ConfigError,
        match=r"algorithm.first_order=False cannot act: fomaml is first order by "
        r"definition; for second-order MAML use algorithm=maml",
    ):
        check_algorithm(composed("train", "algorithm=fomaml", "algorithm.first_order=false"))
    # MAML reads the same key: there it acts.
    check_algorithm(composed("train", "algorithm=maml", "algorithm.first_order=true"))


@pytest.mark.parametrize("algorithm", ["maml", "anil", "mamlpp", "protonet", "reptile", "mann", "baselinepp"])
def test_an_algorithm_key_no_code_reads_is_refused_listing_the_accepted_ones(algorithm):
    cfg = composed("train", f"algorithm={algorithm}")
    check_algorithm(cfg)
    cfg["algorithm"]["first_ordr"] = True  # as `+algorithm.first_ordr=true` gives it
    with pytest.raises(
        ConfigError,
        match=rf"algorithm={algorithm} has no setting first_ordr, so it would be ignored; "
        rf"its settings are name, .*optimizer.*; remove with ~algorithm.first_ordr",
    ):
        check_algorithm(cfg)


def test_mamlpp_has_no_first_order_switch_to_ignore():
    # MAML++ anneals first order with first_order_steps; a `first_order` key would be read by nothing.
    cfg = composed("train", "algorithm=mamlpp", "+algorithm.first_order=true")
    with pytest.raises(ConfigError, match=r"algorithm=mamlpp has no setting first_order.*first_order_steps"):
        check_algorithm(cfg)


# ---------------------------------------------------------------- backbone settings
def test_a_backbone_key_metalab_sets_itself_is_refused_not_a_type_error():
    with pytest.raises(
        ConfigError,
        match=r"backbone=mlp has no option input_shape .*its options are hidden_sizes;"
        r" remove with ~backbone.input_shape",
    ):
        build_backbone({"name": "mlp", "input_shape": [1]}, (1,))


def test_an_unknown_backbone_key_is_refused_before_any_data_is_read():
    cfg = composed("train", "+backbone.widht=3")  # sinusoid: no data; check_train_config reads none
    with pytest.raises(ConfigError, match=r"backbone=mlp has no option widht .*its options are hidden_sizes"):
        check_train_config(cfg)


# ---------------------------------------------------------------- the metric
@pytest.mark.parametrize(
    "override,message",
    [
        (
            "dataset.metric_mode=max",
            r"dataset.metric_mode=max disagrees with the metric learners report on regression "
            r"tasks \(mse, best at its minimum\); set dataset.metric_mode=min",
        ),
        ("dataset.metric=acc", r"dataset.metric=acc disagrees .* set dataset.metric=mse"),
    ],
)
def test_dataset_metric_cannot_contradict_the_learners_metric(override, message):
    check_learner_fits_data(composed("train"), ALGORITHMS["maml"], "regression")
    with pytest.raises(ConfigError, match=message):
        check_learner_fits_data(composed("train", override), ALGORITHMS["maml"], "regression")


def test_a_config_without_the_dataset_metric_keys_still_fits():
    cfg = composed("train")
    del cfg["dataset"]["metric"], cfg["dataset"]["metric_mode"]
    check_learner_fits_data(cfg, ALGORITHMS["maml"], "regression")


# ---------------------------------------------------------------- metalab-eval
TRAINED = ("hardware=gpu", "tf32=false")  # a checkpoint trained on a GPU in full float32


def test_eval_honours_tf32_given_on_its_command_line():
    trained = composed("train", *TRAINED)
    chosen = ["ckpt_path=x.ckpt", "hardware=gpu", "tf32=true"]
    run = evaluation_config(composed("eval", *chosen), trained, [1], chosen)
    assert run["tf32"] is True and run["trainer"]["accelerator"] == "gpu"
    # Left out, the evaluation's hardware choice decides, not the training run's.
    run = evaluation_config(
        composed("eval", "ckpt_path=x.ckpt"), composed("train", "hardware=gpu", "tf32=true"), [1], ["ckpt_path=x.ckpt"]
    )
    assert run["tf32"] is None and run["trainer"]["accelerator"] == "cpu"


@pytest.mark.parametrize(
    "override,why",
    [
        ("+algorithm.inner_lr=0.5", "the learner and its hyper-parameters are the checkpoint's"),
        ("backbone=conv4", "the network's architecture is the checkpoint's"),
        ("+backbone.hidden_sizes=[8]", "the network's architecture is the checkpoint's"),
        ("+ways=3", "meta-test another number with test_ways"),
        ("+seed=3", "the meta-test episodes follow eval_seed"),
        ("+max_steps=3", "metalab-eval does not read it"),
    ],
)
def test_eval_refuses_what_cannot_change_at_evaluation(override, why):
    chosen = ["ckpt_path=x.ckpt", override]
    with pytest.raises(ConfigError, match=rf"cannot change at evaluation: .*{why}.*; leave it out"):
        evaluation_config(composed("eval", *chosen), composed("train"), [1], chosen)


# ---------------------------------------------------------------- dataset settings
def test_an_unknown_dataset_key_is_refused_listing_the_accepted_ones():
    check_train_config(composed("train", "dataset=omniglot"))  # its own keys act
    cfg = composed("train", "dataset=omniglot", "+dataset.image_sise=32")
    with pytest.raises(
        ConfigError,
        match=r"dataset=omniglot has no setting image_sise, so it would be ignored; "
        r"its settings are name, _target_, protocol, .*image_size.*; "
        r"remove with ~dataset.image_sise",
    ):
        check_train_config(cfg)


def test_eval_refuses_an_unknown_key_of_the_dataset_it_is_given():
    chosen = ["ckpt_path=x.ckpt", "dataset=sinusoid", "+dataset.amplitud=[1,2]"]
    with pytest.raises(ConfigError, match=r"dataset=sinusoid has no setting amplitud"):
        evaluation_config(composed("eval", *chosen), composed("train", "dataset.x_range=[-4,4]"), [1], chosen)


def test_baseline_refuses_the_cosine_scale_only_baselinepp_reads():
    check_algorithm(composed("train", "algorithm=baselinepp", "algorithm.cosine_scale=5"))
    with pytest.raises(
        ConfigError,
        match=r"algorithm.cosine_scale=5 cannot act: baseline's linear head has no "
        r"cosine scale; it is Baseline\+\+'s \(algorithm=baselinepp\)",
    ):
        check_algorithm(composed("train", "algorithm=baseline", "algorithm.cosine_scale=5"))


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "+algorithm.optimizer.lrr=0.1",
            r"algorithm\.optimizer\.lrr is not a setting of algorithm\.optimizer \(did you mean "
            r"algorithm\.optimizer\.lr\? its settings are lr, betas, .*\); remove it with ~algorithm\.optimizer\.lrr",
        ),
        (
            "algorithm.optimizer._target_=torch.optim.Adamm",
            r"algorithm\.optimizer\._target_='torch\.optim\.Adamm' is not a "
            r"class that can be imported",
        ),
    ],
)
def test_an_optimizer_setting_its_class_does_not_take_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        check_algorithm(composed("train", override))


def test_a_scheduler_setting_its_class_does_not_take_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"algorithm\.scheduler\.gama is not a setting of algorithm\.scheduler \(did you mean "
        r"algorithm\.scheduler\.gamma\?",
    ):
        check_algorithm(composed("train", "algorithm=protonet", "+algorithm.scheduler.gama=0.5"))
    check_algorithm(composed("train", "algorithm=protonet", "algorithm.scheduler.gamma=0.5"))


def test_a_checkpoint_without_a_speed_only_setting_resumes_and_another_backbone_is_still_refused():
    """A checkpoint written before the speed-only `memory_format` existed holds the same network:
    resuming it is not refused for the missing key; another network still is."""
    from metalab.validation import check_resumable

    cfg = composed("train", "dataset=omniglot", "ckpt_path=last.ckpt")
    older = {**cfg, "backbone": {k: v for k, v in cfg["backbone"].items() if k != "memory_format"}}
    assert "memory_format" in cfg["backbone"]
    check_resumable(cfg, older)
    wider = {**older, "backbone": {**older["backbone"], "hidden_channels": 32}}
    with pytest.raises(ConfigError, match="was trained with backbone=.*'hidden_channels': 32"):
        check_resumable(cfg, wider)


def test_a_checkpoint_from_before_a_backbone_setting_resumes_at_its_default_only():
    """A backbone setting added later (batch_norm_scale) is absent from older checkpoints, which
    built what its default builds: resuming one is not refused, unless the run asks otherwise."""
    from metalab.validation import check_resumable

    cfg = composed("train", "algorithm=protonet", "dataset=omniglot", "ckpt_path=last.ckpt")
    assert cfg["backbone"]["batch_norm_scale"] is True
    older = {**cfg, "backbone": {k: v for k, v in cfg["backbone"].items() if k != "batch_norm_scale"}}
    check_resumable(cfg, older)
    unscaled = {**cfg, "backbone": {**cfg["backbone"], "batch_norm_scale": False}}
    with pytest.raises(ConfigError, match="not .*'batch_norm_scale': False"):
        check_resumable(unscaled, older)


def test_test_checkpoint_last_meta_tests_the_last_steps_weights(tmp_path, cache_dir):
    """Finn et al. test MAML's last weights; test_checkpoint=last does, though validation chose a
    best checkpoint; a value neither best nor last is refused before any work."""
    run_dir = tmp_path / "run"
    short = ("trainer.val_check_interval=5", "val_episodes=4", "test_episodes=4", "logger=none")
    trained_briefly(run_dir, 10, *short, "test_checkpoint=last", data_dir=tmp_path, cache_dir=cache_dir)
    results = json.loads((run_dir / "results.json").read_text())
    assert list((run_dir / "checkpoints").glob("best-step*.ckpt"))  # validation did choose one
    assert results["tested_checkpoint"] is None and results["test_checkpoint"] == "last"
    refused = metalab_command("metalab-train", "test_checkpoint=final", data_dir=tmp_path, cache_dir=cache_dir)
    assert refused.returncode == 2 and "test_checkpoint='final' is unknown" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
