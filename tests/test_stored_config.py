"""A checkpoint's stored run config is read as untrusted data: each defect is one line naming the file.

Every reader goes through checkpoint.read_checkpoint and MetaLearner.from_checkpoint (metalab-eval,
metalab-predict, metalab.load_learner, a resume); these cases ended in a KeyError, TypeError or
IndexError traceback before.
"""

import copy
from pathlib import Path

import pytest
import torch
from preloaded_cli import metalab_command, resumed, trained_briefly

import metalab
from metalab.errors import ConfigError

SHORT = ["trainer.val_check_interval=10", "val_episodes=2", "test_episodes=2", "meta_batch_size=2", "logger=none"]


@pytest.fixture(scope="module")
def genuine(tmp_path_factory, data_dir, cache_dir) -> Path:
    return trained_briefly(tmp_path_factory.mktemp("genuine"), 10, *SHORT, data_dir=data_dir, cache_dir=cache_dir)


def config(checkpoint: dict) -> dict:
    return checkpoint["hyper_parameters"]["config"]


def random_state(checkpoint: dict) -> dict:
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("RandomState")]
    return checkpoint["callbacks"][key]


def wrong_weight(checkpoint: dict) -> None:
    first = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][first] = torch.zeros(3, 3, 3)


DEFECTS = {
    "no-backbone": (lambda c: config(c).pop("backbone"), "lacks the backbone settings"),
    "no-dataset": (lambda c: config(c).pop("dataset"), "lacks the dataset settings"),
    "another-learner": (
        lambda c: config(c)["algorithm"].update(name="protonet", _target_="metalab.algorithms.protonet.ProtoNet"),
        "algorithm=protonet has no setting",
    ),
    "abstract-class": (
        lambda c: config(c)["algorithm"].update(_target_="metalab.algorithms.base.MetaLearner"),
        "is the base every MetaLearner builds on",
    ),
    "input-shape-words": (lambda c: c["hyper_parameters"].update(input_shape=["a", 2]), "stores the input shape"),
    "input-shape-negative": (lambda c: c["hyper_parameters"].update(input_shape=[-1]), "stores the input shape"),
    "task-type": (lambda c: c["hyper_parameters"].update(task_type="banana"), "stores the task type 'banana'"),
    "weights-shape": (wrong_weight, "its weights do not fit algorithm=maml"),
}


@pytest.mark.parametrize("mutate, message", DEFECTS.values(), ids=DEFECTS.keys())
def test_a_defective_stored_config_is_one_line_through_eval_and_load_learner(
    tmp_path, genuine, data_dir, cache_dir, mutate, message
):
    damaged = copy.deepcopy(torch.load(genuine, weights_only=True))
    mutate(damaged)
    path = tmp_path / "damaged.ckpt"
    torch.save(damaged, path)
    proc = metalab_command(
        "metalab-eval", f"ckpt_path={path}", f"paths.log_dir={tmp_path}", data_dir=data_dir, cache_dir=cache_dir
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert f"ckpt_path={path}" in line and message in line, line
    # load_learner serves image classifiers: a sinusoid checkpoint is refused there whole, or for
    # its defect, in one ConfigError naming the file either way.
    with pytest.raises(ConfigError, match=f"ckpt_path={path}"):
        metalab.load_learner(path)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda state: state.update(numpy=("MT19937", torch.zeros(3), 1, 0, 0.0)),
        lambda state: state.update(torch=torch.zeros(5, dtype=torch.uint8)),
        lambda state: state.pop("python"),
    ],
    ids=["numpy", "torch", "missing"],
)
def test_a_tampered_random_state_stops_the_resume_in_one_line(tmp_path, genuine, data_dir, cache_dir, tamper):
    damaged = copy.deepcopy(torch.load(genuine, weights_only=True))
    tamper(random_state(damaged))
    path = tmp_path / "damaged.ckpt"
    torch.save(damaged, path)
    run = tmp_path / "resumed"
    proc = resumed(run, path, 12, *SHORT, data_dir=data_dir, cache_dir=cache_dir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("metalab: error")]
    assert f"ckpt_path={path}: its random state is damaged" in line, line
    assert "Traceback" not in proc.stderr
    assert not list((run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").exists() else True
