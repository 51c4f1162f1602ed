"""The functional adaptation mechanism shared by the optimization-based learners.

Parameters are plain dicts of tensors, so adapting never mutates a module, and every
function here works on one task: `torch.func.vmap` batches it over the meta-batch.
"""

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def task_loss(model: nn.Module, loss_fn: LossFn) -> Callable[[Params, Tensor, Tensor], Tensor]:
    """loss(params, x, y): the model run with `params` in place of its own, scored by `loss_fn`."""

    def loss(params: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, params, (x,)), y)

    return loss


def sgd_step(
    loss: Callable[[Params, Tensor, Tensor], Tensor],
    params: Params,
    x: Tensor,
    y: Tensor,
    lr: float | Mapping[str, Tensor],
    first_order: bool,
) -> Params:
    """One inner step θ' = θ − α ∇θ L(θ; x, y).

    The outer backward pass differentiates through ∇θ L (second-order MAML) unless
    `first_order`, which treats the gradient as a constant: that drops exactly the
    Hessian-vector terms. `lr` is a scalar, or one tensor per parameter (Meta-SGD).
    """
    grads = grad(loss)(params, x, y)
    step = {}
    for name, p in params.items():
        g = grads[name].detach() if first_order else grads[name]
        alpha = lr[name] if isinstance(lr, Mapping) else lr
        step[name] = p - alpha * g
    return step


def sgd_adapt(
    loss: Callable[[Params, Tensor, Tensor], Tensor],
    params: Params,
    x: Tensor,
    y: Tensor,
    steps: int,
    lr: float | Mapping[str, Tensor],
    first_order: bool = False,
) -> Params:
    """`steps` inner SGD steps on the support set (x, y) of one task."""
    for _ in range(steps):
        params = sgd_step(loss, params, x, y, lr, first_order)
    return params
