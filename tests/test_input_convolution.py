"""backbone.input_convolution: a Conv4's first convolution run for all tasks at once in the
per-task loop (backbones/conv4.py, input_convolutions_for_tasks), against one convolution a task."""

import pytest
import torch
from test_optimization_family import TINY_CONV, random_batch, small_learner

from metalab.backbones import conv4
from metalab.errors import ConfigError

FINN_NETWORK = {"pooled_blocks": 0, "stride": 2, "global_average": True}  # 'SAME'-padded, stride 2


def learner(name="maml", input_shape=(1, 8, 8), **backbone):
    return small_learner(name, {**TINY_CONV, **backbone}, list(input_shape), task_execution="per_task")


@pytest.mark.parametrize("name", ["maml", "metasgd", "mamlpp"])
@pytest.mark.parametrize(
    "backbone,input_shape",
    [({}, (1, 8, 8)), ({}, (3, 7, 7)), (FINN_NETWORK, (1, 8, 8)), (FINN_NETWORK, (3, 7, 7))],
    ids=["1-channel", "3-channel odd size", "stride 2", "stride 2, 3-channel odd size"],
)
def test_batching_the_input_convolution_changes_no_meta_gradient(name, backbone, input_shape):
    batch = random_batch(list(input_shape))
    gradients = []
    for choice in ("per_task", "batched"):
        model = learner(name, input_shape, input_convolution=choice, **backbone)
        model.meta_loss(batch)[0].backward()
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for key in gradients[0]:
        torch.testing.assert_close(gradients[1][key], gradients[0][key], rtol=1e-9, atol=1e-11, msg=key)


def first_convolutions_computed_per_task(monkeypatch, model, run) -> tuple[int, list[bool]]:
    """(how many times `run` computed the first convolution inside a task's pass, whether each
    per-task loop computed it for all tasks at once)."""
    first = model.model[0].layers[0][0]
    per_task, batched = [], []
    original_convolution, original_batched = conv4.channels_last_convolution, conv4.input_convolutions_for_tasks

    def convolution(conv, x):
        per_task.append(conv is first)
        return original_convolution(conv, x)

    def for_tasks(*args):
        outputs = original_batched(*args)
        batched.append(outputs is not None)
        return outputs

    monkeypatch.setattr(conv4, "channels_last_convolution", convolution)
    monkeypatch.setattr(conv4, "input_convolutions_for_tasks", for_tasks)
    run()
    return sum(per_task), batched


@pytest.mark.parametrize(
    "choice,backbone,first_order,batched_support",
    [
        ("auto", {}, False, True),
        ("auto", {}, True, False),  # a first-order pass is differentiated once
        ("auto", FINN_NETWORK, False, False),  # stride 2: measured slower batched
        ("per_task", {}, False, False),
        ("batched", {}, True, True),
        ("batched", FINN_NETWORK, False, True),
    ],
)
def test_where_the_input_convolution_runs_for_all_tasks_at_once(
    monkeypatch, choice, backbone, first_order, batched_support
):
    model = learner(input_convolution=choice, **backbone)
    batch = random_batch([1, 8, 8])
    tasks = batch.support_x.shape[0]
    adapted = {}

    def support():
        adapted.update(model.inner_adapt(batch.support_x, batch.support_y, 1, first_order, meta_gradient=True)[0])

    computed, batched = first_convolutions_computed_per_task(monkeypatch, model, support)
    assert batched == [batched_support]
    assert computed == (0 if batched_support else tasks)  # the batched output is the one used
    # the query pass is differentiated once: per task under auto
    computed, batched = first_convolutions_computed_per_task(
        monkeypatch, model, lambda: model.predict(adapted, batch.query_x)
    )
    assert batched == [choice == "batched"]
    assert computed == (0 if choice == "batched" else tasks)


def test_evaluation_keeps_one_convolution_per_task(monkeypatch):
    model = learner().eval()
    batch = random_batch([1, 8, 8])
    computed, batched = first_convolutions_computed_per_task(monkeypatch, model, lambda: model.evaluate(batch))
    assert not any(batched) and computed > 0


def test_an_unknown_choice_is_refused():
    with pytest.raises(ConfigError, match="backbone.input_convolution='fast'"):
        learner(input_convolution="fast")
    assert conv4.INPUT_CONVOLUTIONS == ("auto", "batched", "per_task")
