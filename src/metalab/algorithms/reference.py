"""Plain per-task references for the optimization-based family, written the textbook way.

One task at a time, inner gradients from `torch.autograd.grad`: easy to check by eye and
slow. They are the baseline of the gradient tests and of `make bench`; each learner's
batched `meta_loss` must give the same loss and gradient.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalab.algorithms.anil import ANIL
from metalab.algorithms.inner_loop import parameter_key
from metalab.algorithms.mamlpp import MAMLPlusPlus
from metalab.algorithms.metasgd import MetaSGD
from metalab.algorithms.reptile import Reptile
from metalab.data.episodes import Episode

# lr(step, parameter name) -> the inner learning rate (a float or a tensor)
LearningRate = Callable[[int, str], float | Tensor]


def per_task_meta_loss(
    model: nn.Module,
    batch: Episode,
    steps: int,
    lr: LearningRate,
    first_order: bool,
    loss_fn,
    adapted_names: list[str] | None = None,
    step_params: Callable[[int], dict[str, Tensor]] | None = None,
    step_weights: Tensor | None = None,
) -> Tensor:
    """Mean over tasks of the query loss after `steps` inner SGD steps, looping over tasks.

    adapted_names: the parameters the inner loop updates (default all; ANIL: the head).
    step_params(k): parameters that replace the model's in inner step k's forward passes:
        the support pass that makes update k+1 and the query pass after it (MAML++'s
        per-step normalization, indexed as in few_shot_learning_system.py `forward`).
    step_weights: weights v_k of the query losses after steps 1..steps (MAML++'s
        multi-step loss); default: the last step's loss only.
    """
    shared = dict(model.named_parameters())
    adapted_names = adapted_names or list(shared)
    task_losses = []
    for t in range(batch.support_x.shape[0]):
        fast = {n: shared[n] for n in adapted_names}

        def forward(k: int, x: Tensor, fast: dict[str, Tensor]) -> Tensor:
            overrides = step_params(k) if step_params is not None else {}
            return functional_call(model, {**shared, **overrides, **fast}, (x,))

        query_losses = []  # after each inner step, for the multi-step loss only
        for k in range(steps):
            support_loss = loss_fn(forward(k, batch.support_x[t], fast), batch.support_y[t])
            grads = torch.autograd.grad(support_loss, list(fast.values()), create_graph=not first_order)
            fast = {n: p - lr(k, n) * g for (n, p), g in zip(fast.items(), grads)}
            if step_weights is not None:
                query_losses.append(loss_fn(forward(k, batch.query_x[t], fast), batch.query_y[t]))
        if step_weights is None:
            task_losses.append(loss_fn(forward(steps - 1, batch.query_x[t], fast), batch.query_y[t]))
        else:
            task_losses.append(sum(w * loss for w, loss in zip(step_weights, query_losses)))
    return torch.stack(task_losses).mean()


def per_task_maml_loss(model: nn.Module, batch: Episode, steps: int, lr: float, first_order: bool, loss_fn) -> Tensor:
    """MAML's meta-loss with one scalar inner learning rate."""
    return per_task_meta_loss(model, batch, steps, lambda k, name: lr, first_order, loss_fn)


def per_task_reptile_direction(model: nn.Module, batch: Episode, steps: int, lr: float, loss_fn) -> list[Tensor]:
    """θ − mean_i φ_i, where φ_i is θ after `steps` SGD steps on task i's support set."""
    names, params = zip(*model.named_parameters())
    adapted_sum = [torch.zeros_like(p) for p in params]
    tasks = batch.support_x.shape[0]
    for t in range(tasks):
        fast = [p.detach().requires_grad_(True) for p in params]
        for _ in range(steps):
            outputs = functional_call(model, dict(zip(names, fast)), (batch.support_x[t],))
            grads = torch.autograd.grad(loss_fn(outputs, batch.support_y[t]), fast)
            fast = [(p - lr * g).detach().requires_grad_(True) for p, g in zip(fast, grads)]
        adapted_sum = [s + p.detach() for s, p in zip(adapted_sum, fast)]
    return [p.detach() - s / tasks for p, s in zip(params, adapted_sum)]


def reference_meta_loss(learner, batch: Episode) -> Tensor:
    """The per-task loop that gives the same meta-gradient as `learner.meta_loss(batch)[0]`.

    For Reptile it is the surrogate Σ θ·(θ − mean φ) with the direction from the loop
    (SGD inner loop only).
    """
    model, loss_fn, steps = learner.model, learner.task_loss_fn(), learner.inner_steps
    if isinstance(learner, Reptile):
        if learner.inner_optimizer != "sgd":
            raise ValueError("the Reptile reference loop implements the SGD inner loop only")
        direction = per_task_reptile_direction(model, batch, steps, learner.inner_lr, loss_fn)
        return sum((p * d).sum() for p, d in zip(model.parameters(), direction))
    if isinstance(learner, MAMLPlusPlus):
        rates = {n: learner.step_lrs[parameter_key(n)] for n in learner.adapted_names}
        norms = {n: learner.step_norms[parameter_key(n)] for n in learner.norm_names}
        weights = learner.step_loss_weights(learner.global_step)
        return per_task_meta_loss(
            model,
            batch,
            steps,
            lambda k, n: rates[n][k],
            learner.first_order_at(learner.global_step),
            loss_fn,
            adapted_names=learner.adapted_names,
            step_params=lambda k: {n: v[k - 1] for n, v in norms.items()} if k else {},
            step_weights=weights,
        )
    first_order = learner.training_first_order()
    if isinstance(learner, MetaSGD):
        rates = {n: learner.inner_lrs[parameter_key(n)] for n, _ in model.named_parameters()}
        return per_task_meta_loss(model, batch, steps, lambda k, n: rates[n], first_order, loss_fn)
    adapted = [f"1.{n}" for n, _ in model[1].named_parameters()] if isinstance(learner, ANIL) else None
    return per_task_meta_loss(
        model, batch, steps, lambda k, n: learner.inner_lr, first_order, loss_fn, adapted_names=adapted
    )
