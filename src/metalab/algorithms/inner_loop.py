"""The functional adaptation mechanism shared by the optimization-based learners.

Parameters are plain dicts of tensors with a leading task dimension, so adapting never
mutates a module and all tasks of a meta-batch adapt at once:

- the forward pass is `torch.func.functional_call` vmapped over the tasks;
- the inner gradient is one `torch.autograd.grad` of the *sum* of the task losses.
  Task t's loss depends only on task t's slice of the parameters, so the gradient of
  the sum with respect to that slice is exactly task t's own gradient.

This gives the same numbers as a loop over tasks (tests check it to 1e-5) at a fraction
of the cost: a handful of large batched kernels instead of many small ones, and plain
autograd for the backward passes, which on a CPU is several times cheaper than nesting
`torch.func.grad` inside `vmap`.
"""

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils.checkpoint import checkpoint

from metalab.backbones.conv4 import options_for_tasks
from metalab.backbones.forward_options import PLAIN_PASS, ForwardOptions, takes_forward_options
from metalab.errors import check_choice

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
# (per-task params [tasks, ...], x [tasks, n, ...], y [tasks, n, ...], the pass's ForwardOptions)
# -> per-task losses [tasks]
BatchedLoss = Callable[[Params, Tensor, Tensor, ForwardOptions], Tensor]


def parameter_key(name: str) -> str:
    """A parameter name usable as a ParameterDict key ('.' is not allowed there): the per-parameter
    inner learning rates of Meta-SGD and MAML++, and Reptile's Adam state, are keyed by it."""
    return name.replace(".", "__")


def per_task(params: Mapping[str, Tensor], tasks: int, meta_gradient: bool = True) -> Params:
    """Give each task its own view of the shared parameters: [tasks, *shape].

    With `meta_gradient`, gradients of the views flow back to (and sum into) the shared
    parameters: the outer loop's meta-gradient. Without it (evaluation) the views are cut
    from the meta-parameters but still differentiable for the inner loop.
    """
    views = {}
    with torch.enable_grad():  # evaluation runs under no_grad; the inner loop still needs a graph
        for name, p in params.items():
            base = p if meta_gradient else p.detach().requires_grad_(True)
            views[name] = base.expand(tasks, *p.shape)
    return views


# How the tasks' forward passes run (algorithm.task_execution); the numbers are the same:
#   vmap:     all tasks at once, vmapped: per-task convolution weights become one grouped
#             convolution, and every activation holds the whole meta-batch;
#   per_task: the model once per task on its own slice of the per-task parameters, plain
#             kernels on cache-sized tensors; everything around the forward passes (losses,
#             inner gradients, parameter updates) stays batched over the tasks;
#   auto:     per_task for a convolutional model on a CPU when each task's first convolution
#             has PER_TASK_MIN_POSITIONS output positions or more: there the grouped-convolution
#             kernels are slower than plain ones and a whole meta-batch's feature maps run at
#             memory speed. Below it (Finn et al.'s stride-2 network on 5 images, a 1-shot
#             support set) the plain kernels' fixed cost per task loses to one grouped call.
#             vmap for the rest (an MLP's per-task layers become batched matmuls, faster than a
#             loop), on other devices and while torch.compile traces (one graph, not one per
#             task). docs/speed.md has the measurements.
TASK_EXECUTIONS = ("auto", "per_task", "vmap")
# Images × output height × width of a task's first convolution from which `auto` runs each task
# alone. Measured crossovers (conv4, 32 tasks, 2-core CPU, docs/speed.md): 2,000-3,900 for
# passes differentiated twice, 2,900-3,900 for passes differentiated once or not at all.
PER_TASK_MIN_POSITIONS = 3000


def first_convolution_positions(convolution: nn.modules.conv._ConvNd, x: Tensor) -> int:
    """Output positions of `convolution` over one task's images x[t] ([tasks, n, C, *spatial]),
    counting 'same'-sized outputs at its stride (3×3 padded, or padded by hand as Finn's network)."""
    positions = x.shape[1]
    for size, stride in zip(x.shape[3:], convolution.stride):
        positions *= -(-size // stride)
    return positions


def map_tasks(module: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """`module` on each task's slice of x ([tasks, n, ...] -> [tasks, n, ...]), every task its own
    batch (its own BatchNorm statistics): vmapped, or, while torch.export traces (metalab.export),
    one call per task. vmap's batching rules for convolution, BatchNorm and pooling fix symbolic
    sizes to the example's, so an exported graph would take only as many images as the example
    had; the loop keeps them free and computes the same numbers."""
    if torch.compiler.is_exporting():
        return torch.stack([module(task) for task in x.unbind(0)])
    return vmap(module)(x)


def batched_forward(model: nn.Module, execution: str = "auto") -> Callable[..., Tensor]:
    """f(params, x, options=PLAIN_PASS): the model run with per-task `params` ([tasks, ...]) on
    per-task inputs ([tasks, n, ...]), giving [tasks, n, ...] outputs; `options` (ForwardOptions)
    go to a model that takes them (takes_forward_options), every task's pass."""
    check_choice("algorithm.task_execution", execution, TASK_EXECUTIONS)
    takes_options = takes_forward_options(model)

    def call(params: Params, x: Tensor, options: ForwardOptions) -> Tensor:
        return functional_call(model, params, (x,), {"options": options} if takes_options else None)

    def vmapped(params: Params, x: Tensor, options: ForwardOptions) -> Tensor:
        return vmap(lambda params, x: call(params, x, options))(params, x)

    def looped(params: Params, x: Tensor, options: ForwardOptions) -> Tensor:
        # unbind/stack: each task's gradient lands in its own slice in one copy, where
        # indexing p[t] would add a full [tasks, ...] tensor per task.
        slices = zip(*(p.unbind(0) for p in params.values()))
        # a Conv4's first convolution may run for all tasks at once (backbone.input_convolution),
        # each task's output then handed to its pass in its options
        per_task_options = options_for_tasks(model, params, x, options) if takes_options else [options] * len(x)
        outputs = [
            call(dict(zip(params, task_params)), x_t, options_t)
            for task_params, x_t, options_t in zip(slices, x.unbind(0), per_task_options)
        ]
        return torch.stack(outputs)

    first_convolution = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)

    def forward(params: Params, x: Tensor, options: ForwardOptions = PLAIN_PASS) -> Tensor:
        if torch.compiler.is_exporting():  # the loop: vmap would fix the traced sizes (map_tasks)
            per_task_run = True
        elif execution == "auto":  # decided per call: the device, shapes and compiling state can change
            per_task_run = (
                first_convolution is not None
                and x.device.type == "cpu"
                and not torch.compiler.is_compiling()
                and first_convolution_positions(first_convolution, x) >= PER_TASK_MIN_POSITIONS
            )
        else:
            per_task_run = execution == "per_task"
        return looped(params, x, options) if per_task_run else vmapped(params, x, options)

    return forward


def mean_loss_per_task(loss_fn: LossFn, outputs: Tensor, y: Tensor) -> Tensor:
    """[tasks]: each task's mean loss, from [tasks, examples, ...] outputs and targets.

    `loss_fn` is a torch.nn.functional loss taking `reduction`. It runs once on all tasks'
    examples, unreduced, then is averaged per task: vmapping it instead falls back to a
    slow per-task path for cross-entropy.
    """
    per_example = loss_fn(outputs.flatten(0, 1), y.flatten(0, 1), reduction="none")
    return per_example.reshape(outputs.shape[0], -1).mean(1)


INNER_LOSS_REDUCTIONS = ("mean", "sum", "sum_over_shots")


def batched_loss(
    model: nn.Module, loss_fn: LossFn, reduction: str = "mean", ways: int = 1, execution: str = "auto"
) -> BatchedLoss:
    """loss(params, x, y) -> [tasks]: each task's loss under its own parameters.

    `reduction` over a task's examples sets what an inner learning rate α means:
    `mean`; `sum`; `sum_over_shots`, the sum over the N·K support examples divided by K,
    which for balanced episodes is N (`ways`) × the mean (Finn et al.'s, algorithms/maml.py).
    `execution`: how the forward passes run (TASK_EXECUTIONS).
    """
    check_choice("algorithm.inner_loss", reduction, INNER_LOSS_REDUCTIONS)
    forward = batched_forward(model, execution)

    def loss(params: Params, x: Tensor, y: Tensor, options: ForwardOptions = PLAIN_PASS) -> Tensor:
        task_losses = mean_loss_per_task(loss_fn, forward(params, x, options), y)
        if reduction == "sum":
            return task_losses * x.shape[1]
        return task_losses * ways if reduction == "sum_over_shots" else task_losses

    return loss


def sgd_step(
    loss: BatchedLoss,
    params: Params,
    x: Tensor,
    y: Tensor,
    lr: float | Mapping[str, Tensor],
    first_order: bool,
    traceable: bool = False,
) -> tuple[Params, Tensor]:
    """One inner step for every task: θ'_t = θ_t − α ∇θ_t L_t(θ_t; x_t, y_t).

    The outer backward pass differentiates through ∇θ L (second-order MAML) unless
    `first_order`, where the gradient is taken without a graph and so acts as a
    constant: that drops exactly the Hessian-vector terms. `lr` is a scalar, or one
    tensor per parameter broadcast over tasks (Meta-SGD's per-element rates, MAML++'s
    per-layer rates). Returns the new parameters and the per-task support losses
    L_t(θ_t) (detached), so callers can watch them.

    `traceable` takes the inner gradient with `torch.func.grad` instead: the same numbers,
    in a form torch.compile captures whole (algorithm.compile=true). Uncompiled,
    `torch.autograd.grad` is the faster of the two (by about 12% on the bench MLP).
    """
    with torch.enable_grad():
        if traceable:

            def summed(params: Params) -> tuple[Tensor, Tensor]:
                task_losses = loss(params, x, y)
                return task_losses.sum(), task_losses

            grads, task_losses = torch.func.grad(summed, has_aux=True)(params)
            grads = [g.detach() if first_order else g for g in grads.values()]
        else:
            # A second-order step differentiates this pass twice: the backbone may pick kernels
            # for that (ForwardOptions). Not under torch.func.grad above: metalab's BatchNorm
            # double backward is an autograd.Function, which torch.func transforms do not take.
            task_losses = loss(params, x, y, ForwardOptions(differentiated_twice=not first_order))
            grads = torch.autograd.grad(task_losses.sum(), list(params.values()), create_graph=not first_order)
        step = {}
        for (name, p), g in zip(params.items(), grads):
            if isinstance(lr, Mapping):
                step[name] = torch.addcmul(p, lr[name], g, value=-1.0)
            else:  # one fused kernel: on a CPU, p - lr * g costs several times more
                step[name] = torch.add(p, g, alpha=-lr)
    return step, task_losses.detach()


def sgd_adapt(
    loss: BatchedLoss,
    params: Params,
    x: Tensor,
    y: Tensor,
    steps: int,
    lr: float | Mapping[str, Tensor],
    first_order: bool = False,
    checkpointed: bool = False,
    traceable: bool = False,
) -> tuple[Params, Tensor | None]:
    """`steps` inner SGD steps on every task's support set (x, y).

    Returns the adapted parameters and the per-task support losses of the last step
    (None for zero steps).

    `checkpointed` trades compute for memory: each step's activations are dropped after
    the forward pass and recomputed during the outer backward pass
    (torch.utils.checkpoint), so memory holds one step's graph at a time plus the
    parameters between steps. The gradient is unchanged, second order included.
    """
    task_losses = None
    for _ in range(steps):
        if checkpointed and torch.is_grad_enabled():
            params, task_losses = checkpointed_sgd_step(loss, params, x, y, lr, first_order)
        else:
            params, task_losses = sgd_step(loss, params, x, y, lr, first_order, traceable)
    return params, task_losses


def checkpointed_sgd_step(
    loss: BatchedLoss, params: Params, x: Tensor, y: Tensor, lr: float | Mapping[str, Tensor], first_order: bool
) -> tuple[Params, Tensor]:
    names = list(params)

    def step(*values: Tensor) -> tuple[Tensor, ...]:
        new, task_losses = sgd_step(loss, dict(zip(names, values)), x, y, lr, first_order)
        return (*new.values(), task_losses)

    *values, task_losses = checkpoint(step, *params.values(), use_reentrant=False)
    return dict(zip(names, values)), task_losses


class AdamMoments:
    """Adam's moment estimates and step count, kept across calls of `adam_adapt`.

    `first` and `second` hold one tensor per parameter, of the parameters' per-task shape
    [tasks, ...]; `adam_adapt` updates them in place, so views of longer-lived tensors (a
    learner's buffers) carry the state on. `steps` counts the updates taken so far.
    """

    def __init__(self, first: Params, second: Params, steps: int = 0):
        self.first, self.second, self.steps = first, second, steps

    @classmethod
    def zeros(cls, params: Params) -> "AdamMoments":
        return cls(
            {n: torch.zeros_like(p) for n, p in params.items()}, {n: torch.zeros_like(p) for n, p in params.items()}
        )


def minibatch_indices(
    tasks: int,
    examples: int,
    steps: int,
    batch_size: int,
    generator: torch.Generator | None,
    device: torch.device | None = None,
) -> Tensor:
    """[tasks, steps, batch_size] example indices: consecutive minibatches of each task's
    examples, reshuffled whenever a pass over them ends (a minibatch may straddle two passes).

    The sampling of openai/supervised-reptile, reptile.py `_mini_batches` without replacement.
    """
    passes = -(-steps * batch_size // examples)
    orders = [torch.cat([torch.randperm(examples, generator=generator) for _ in range(passes)]) for _ in range(tasks)]
    return torch.stack(orders)[:, : steps * batch_size].reshape(tasks, steps, batch_size).to(device)


def take_examples(x: Tensor, indices: Tensor) -> Tensor:
    """x[t, indices[t]] for every task t: [tasks, batch, ...]."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], indices]


def adam_adapt(
    loss: BatchedLoss,
    params: Params,
    x: Tensor,
    y: Tensor,
    steps: int,
    lr: float,
    betas: tuple[float, float] = (0.0, 0.999),
    eps: float = 1e-8,
    moments: AdamMoments | None = None,
    batches: Tensor | None = None,
) -> tuple[Params, Tensor | None]:
    """`steps` inner Adam steps on every task, each task with its own moment estimates.

    For learners that need no gradient through the inner loop (Reptile): every step is
    cut from the graph, so memory does not grow with the number of steps.

    `moments`: the state to start from, updated in place (default: zeros, discarded).
    `batches`: [tasks, steps, batch] support indices, step i on minibatch i (default: the
    whole support set at every step).
    """
    beta1, beta2 = betas
    moments = moments if moments is not None else AdamMoments.zeros(params)
    first, second = moments.first, moments.second
    params = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    task_losses = None
    for i in range(steps):
        moments.steps += 1
        t = moments.steps
        step_x, step_y = (
            (x, y) if batches is None else (take_examples(x, batches[:, i]), take_examples(y, batches[:, i]))
        )
        with torch.enable_grad():
            task_losses = loss(params, step_x, step_y)
            grads = torch.autograd.grad(task_losses.sum(), list(params.values()))
        updated = {}
        for (name, p), g in zip(params.items(), grads):
            first[name].mul_(beta1).add_(g, alpha=1 - beta1)
            second[name].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denominator = (second[name] / (1 - beta2**t)).sqrt_().add_(eps)
            step = first[name] / (1 - beta1**t) / denominator
            updated[name] = (p.detach() - lr * step).requires_grad_(True)
        params = updated
        task_losses = task_losses.detach()
    return params, task_losses
