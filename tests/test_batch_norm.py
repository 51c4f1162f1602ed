"""backbones/batch_norm.py: BatchNorm with a hand-written double backward, against PyTorch's own."""

import pytest
import torch
import torch.nn.functional as F

from metalab.backbones import batch_norm
from metalab.backbones.batch_norm import batch_norm_with_batch_statistics
from metalab.errors import ConfigError

EPS = 1e-5


def pytorch_batch_norm(x, weight, bias, eps):
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)


def second_order_gradients(norm, x, weight, bias, outer, memory_format=torch.contiguous_format):
    """The gradients with respect to (x, weight, bias) of `outer`, a function of the first
    gradients (dx, dweight, dbias) of a loss of the normalized map: what MAML's outer step asks."""
    x = x.detach().contiguous(memory_format=memory_format).requires_grad_(True)
    weight, bias = weight.detach().requires_grad_(True), bias.detach().requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    target = torch.randn(x.shape, dtype=x.dtype, generator=g)
    inner = (torch.tanh(norm(x, weight, bias, EPS)) * target).sum()  # a curved loss: the Hessian is not trivial
    first = torch.autograd.grad(inner, (x, weight, bias), create_graph=True)
    second = torch.autograd.grad(outer(*first), (x, weight, bias), allow_unused=True)
    return [torch.zeros_like(t) if s is None else s for s, t in zip(second, (x, weight, bias))]


OUTER_LOSSES = {
    "all three": lambda dx, dw, db: dx.sin().sum() + (dw**2).sum() + (db**3).sum(),
    "dx only (dweight, dbias unused)": lambda dx, dw, db: (dx**2).sum(),
    "dweight only": lambda dx, dw, db: (dw * torch.arange(dw.numel(), dtype=dw.dtype)).sum(),
    "dbias only": lambda dx, dw, db: db.exp().sum(),
}


@pytest.mark.parametrize("outer", OUTER_LOSSES.values(), ids=OUTER_LOSSES.keys())
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_second_order_gradients_are_pytorchs(outer, memory_format):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 7, 7, dtype=torch.float64, generator=g) * 3 + 1
    weight = torch.randn(6, dtype=torch.float64, generator=g)  # negative scales included
    bias = torch.randn(6, dtype=torch.float64, generator=g)
    ours = second_order_gradients(batch_norm_with_batch_statistics, x, weight, bias, outer, memory_format)
    theirs = second_order_gradients(pytorch_batch_norm, x, weight, bias, outer, memory_format)
    for name, a, b in zip(("x", "weight", "bias"), ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_forward_and_first_gradients_are_bit_for_bit_pytorchs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 8, 14, 14, generator=g, requires_grad=True)
    weight, bias = (torch.rand(8, generator=g) + 0.5).requires_grad_(True), torch.randn(8, requires_grad=True)
    outputs = [norm(x, weight, bias, EPS) for norm in (batch_norm_with_batch_statistics, pytorch_batch_norm)]
    assert torch.equal(*outputs)
    target = torch.randn(x.shape, generator=g)
    gradients = [torch.autograd.grad((y * target).sum(), (x, weight, bias)) for y in outputs]
    for a, b in zip(*gradients):
        assert torch.equal(a, b)


def conv4_learner(**backbone):
    from test_optimization_family import TINY_CONV, small_learner

    return small_learner("maml", {**TINY_CONV, **backbone}, [1, 8, 8], task_execution="per_task")


@pytest.mark.parametrize(
    "choice,first_order,expected",
    [("auto", False, True), ("metalab", False, True), ("pytorch", False, False), ("auto", True, False)],
)
def test_the_double_backward_is_used_where_a_pass_is_differentiated_twice(monkeypatch, choice, first_order, expected):
    """backbone.batch_norm_double_backward: under auto on a CPU the second-order support pass
    normalizes with it; a first-order pass (and the query pass) with the module; `pytorch` never."""
    from test_optimization_family import random_batch

    from metalab.backbones import conv4

    calls = []
    monkeypatch.setattr(
        conv4, "batch_norm_with_batch_statistics", lambda *args: calls.append(1) or pytorch_batch_norm(*args)
    )
    model = conv4_learner(batch_norm_double_backward=choice)
    batch = random_batch([1, 8, 8])
    adapted, _ = model.inner_adapt(batch.support_x, batch.support_y, 1, first_order, meta_gradient=True)
    tasks, blocks = batch.support_x.shape[0], 2
    assert len(calls) == (tasks * blocks if expected else 0)
    model.predict(adapted, batch.query_x)
    assert len(calls) == (tasks * blocks if expected else 0)


def test_the_choice_changes_no_meta_gradient():
    from test_optimization_family import random_batch

    batch = random_batch([1, 8, 8])
    gradients = []
    for choice in ("metalab", "pytorch"):
        model = conv4_learner(batch_norm_double_backward=choice)
        model.meta_loss(batch)[0].backward()
        gradients.append([p.grad for p in model.parameters()])
    for a, b in zip(*gradients):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_an_unknown_choice_is_refused():
    with pytest.raises(ConfigError, match="backbone.batch_norm_double_backward='fast'"):
        conv4_learner(batch_norm_double_backward="fast")
    assert batch_norm.BATCH_NORM_DOUBLE_BACKWARDS == ("auto", "metalab", "pytorch")
