"""Plain per-task MAML, written the textbook way: the baseline for tests and benchmarks.

One task at a time, inner gradients from `torch.autograd.grad(create_graph=True)`: easy
to check by eye and slow. `MAML.meta_loss` must give the same loss and gradient.
"""

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalab.data.episodes import Episode


def per_task_maml_loss(model: nn.Module, batch: Episode, steps: int, lr: float, first_order: bool, loss_fn) -> Tensor:
    """Mean query loss after `steps` SGD steps on each task's support set, looping over tasks."""
    names, params = zip(*model.named_parameters())
    task_losses = []
    for t in range(batch.support_x.shape[0]):
        fast = list(params)
        for _ in range(steps):
            outputs = functional_call(model, dict(zip(names, fast)), (batch.support_x[t],))
            grads = torch.autograd.grad(loss_fn(outputs, batch.support_y[t]), fast, create_graph=not first_order)
            fast = [p - lr * g for p, g in zip(fast, grads)]
        outputs = functional_call(model, dict(zip(names, fast)), (batch.query_x[t],))
        task_losses.append(loss_fn(outputs, batch.query_y[t]))
    return torch.stack(task_losses).mean()
