"""MAML's vmapped, functional meta-gradient against a plain per-task autograd loop."""

import pytest
import torch

from metalab.algorithms.maml import MAML
from metalab.algorithms.reference import per_task_maml_loss
from metalab.data.episodes import Episode

WAYS, SHOTS, QUERIES, TASKS, FEATURES = 3, 2, 3, 4, 5


def small_maml(inner_steps: int, first_order: bool, inner_lr: float = 0.3) -> MAML:
    config = {
        "algorithm": {
            "name": "maml",
            "inner_lr": inner_lr,
            "inner_steps": inner_steps,
            "eval_inner_steps": inner_steps,
            "first_order": first_order,
            "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1},
        },
        "backbone": {"name": "mlp", "hidden_sizes": [7, 6]},
        "ways": WAYS,
    }
    torch.manual_seed(0)
    return MAML.from_config(config, [FEATURES], "classification").double()


def random_batch() -> Episode:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(WAYS)
    return Episode(
        support_x=torch.randn(TASKS, WAYS * SHOTS, FEATURES, generator=g, dtype=torch.float64),
        support_y=labels.repeat_interleave(SHOTS).repeat(TASKS, 1),
        query_x=torch.randn(TASKS, WAYS * QUERIES, FEATURES, generator=g, dtype=torch.float64),
        query_y=labels.repeat_interleave(QUERIES).repeat(TASKS, 1),
    )


def reference_meta_gradient(model: MAML, batch: Episode, steps: int, first_order: bool) -> list[torch.Tensor]:
    """The textbook loop: adapt each task with autograd.grad, average the query losses."""
    lr = model.inner_lr
    loss = per_task_maml_loss(model.model, batch, steps, lr, first_order, torch.nn.functional.cross_entropy)
    return list(torch.autograd.grad(loss, list(model.model.parameters())))


def vmapped_meta_gradient(model: MAML, batch: Episode) -> list[torch.Tensor]:
    loss, _ = model.meta_loss(batch)
    return list(torch.autograd.grad(loss, list(model.model.parameters())))


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_per_task_loop(steps, first_order):
    model, batch = small_maml(steps, first_order), random_batch()
    ours = vmapped_meta_gradient(model, batch)
    reference = reference_meta_gradient(model, batch, steps, first_order)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 3])
def test_first_order_drops_exactly_the_second_order_terms(steps):
    batch = random_batch()
    second = vmapped_meta_gradient(small_maml(steps, first_order=False), batch)
    first = vmapped_meta_gradient(small_maml(steps, first_order=True), batch)
    # The two differ (the Hessian terms are real) ...
    assert max((a - b).abs().max().item() for a, b in zip(second, first)) > 1e-4
    # ... and the first-order gradient is the second-order one with the inner gradient held constant.
    reference = reference_meta_gradient(small_maml(steps, first_order=True), batch, steps, first_order=True)
    for a, b in zip(first, reference):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_zero_inner_steps_is_plain_supervised_gradient():
    model, batch = small_maml(0, first_order=False), random_batch()
    ours = vmapped_meta_gradient(model, batch)
    logits = model.model(batch.query_x.flatten(0, 1))
    plain = torch.autograd.grad(
        torch.nn.functional.cross_entropy(logits, batch.query_y.flatten()), list(model.model.parameters())
    )
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)


def test_evaluation_adapts_under_no_grad_and_inference_mode():
    model, batch = small_maml(3, first_order=False), random_batch()
    with torch.no_grad():
        a = model.evaluate(batch)["acc"]
    with torch.inference_mode():  # as trainer.test runs by default
        inference_batch = Episode(*(t.clone() for t in batch))
        model._evaluate_and_store(inference_batch)  # what validation/test steps call
    b = model._eval_values["acc"][0]
    torch.testing.assert_close(a.float(), b)
    # Adaptation changes predictions: evaluation is not the unadapted model.
    unadapted = (model.model(batch.query_x.flatten(0, 1)).argmax(-1).view(TASKS, -1) == batch.query_y).double().mean(-1)
    assert not torch.equal(unadapted, a)


@pytest.mark.parametrize("double_backward", ["metalab", "pytorch"])
def test_finns_network_without_batch_norm_scale_has_an_exact_meta_gradient(double_backward):
    """Finn et al.'s Omniglot net: stride-2 convolutions, BatchNorm with a shift β but no scale γ
    (held at 1, not a parameter), his initialisation. Its second-order meta-gradient is the
    per-task loop's, through either BatchNorm double backward."""
    config = {
        "algorithm": {
            "name": "maml",
            "inner_lr": 0.3,
            "inner_steps": 2,
            "eval_inner_steps": 2,
            "first_order": False,
            "init": "finn",
            "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1},
        },
        "backbone": {
            "name": "conv4",
            "hidden_channels": 4,
            "pooled_blocks": 0,
            "stride": 2,
            "global_average": True,
            "batch_norm_scale": False,
            "batch_norm_double_backward": double_backward,
        },
        "ways": WAYS,
    }
    torch.manual_seed(0)
    model = MAML.from_config(config, [1, 12, 12], "classification").double()
    names = [name for name, _ in model.model.named_parameters()]
    assert "0.layers.0.1.bias" in names and "0.layers.0.1.weight" not in names  # β learned, γ not
    assert bool((model.model[0].layers[0][1].weight == 1).all())
    head = model.model[1].weight
    assert 0.7 < float(head.detach().std()) < 1.3  # Finn's output layer: N(0, 1)
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(WAYS)
    batch = Episode(
        support_x=torch.rand(2, WAYS * SHOTS, 1, 12, 12, generator=g, dtype=torch.float64),
        support_y=labels.repeat_interleave(SHOTS).repeat(2, 1),
        query_x=torch.rand(2, WAYS * QUERIES, 1, 12, 12, generator=g, dtype=torch.float64),
        query_y=labels.repeat_interleave(QUERIES).repeat(2, 1),
    )
    ours = vmapped_meta_gradient(model, batch)
    reference = reference_meta_gradient(model, batch, 2, False)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
