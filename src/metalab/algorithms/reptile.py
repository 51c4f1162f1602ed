"""Reptile (Nichol, Achiam, Schulman 2018).

Adapt to each task with plain SGD or Adam for k steps, then move the initialization
toward the adapted weights:

    φ_i = U^k_{S_i}(θ)                      (k inner steps, tasks adapted in parallel)
    θ  ← θ + ε (mean_i φ_i − θ)              (ε: meta step size, annealed linearly to 0)

No gradient flows through the inner loop. The outer update is applied by the outer
optimizer (SGD with lr ε, conf/algorithm/reptile.yaml) as the gradient of a surrogate
loss whose gradient is exactly θ − mean_i φ_i; keeping it a gradient means one backward
per outer step, so DDP averages it across processes like any other learner's.

What follows the authors' code (openai/supervised-reptile), each an option:

- `inner_batch_size` / `eval_inner_batch_size`: each inner step takes a minibatch of the
  support set, consecutive slices of a shuffled pass over it, reshuffled when a pass ends
  (reptile.py `_mini_batches`, replacement=False); null takes the whole support set.
- `inner_adam_state: shared`: the inner Adam's moments and step count are never reset.
  The reference adapts the tasks of a meta-batch one after another with one TensorFlow
  Adam whose slot variables are not part of the state it restores between tasks
  (reptile.py `train_step` exports/imports only the trainable variables), so they carry
  over from task to task and across outer steps; evaluation starts from them and restores
  them afterwards (`evaluate` exports/imports the full state). With it metalab adapts the
  training tasks one after another too. `per_task`: each task starts from zero moments.
- `transductive`: true predicts a task's queries in one batch, so BatchNorm normalizes them
  with their joint statistics; false predicts each query in a batch with the support set
  and keeps its row (reptile.py `_test_predictions`).
"""

from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metalab.algorithms.inner_loop import (
    AdamMoments,
    Params,
    adam_adapt,
    mean_loss_per_task,
    minibatch_indices,
    parameter_key,
    per_task,
    sgd_step,
    take_examples,
)
from metalab.algorithms.maml import MAML
from metalab.data.episodes import Episode
from metalab.errors import check_choice, check_positive

ADAM_STATES = ("per_task", "shared")
# Images in one pass of the non-transductive predictions; chunks keep the memory bounded.
NON_TRANSDUCTIVE_IMAGES = 4096


class SharedAdamState(nn.Module):
    """The inner Adam's moments and step count, kept as buffers (saved in checkpoints)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = [name for name, _ in model.named_parameters()]
        for name, p in model.named_parameters():
            self.register_buffer(f"first__{parameter_key(name)}", torch.zeros_like(p))
            self.register_buffer(f"second__{parameter_key(name)}", torch.zeros_like(p))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def moment(self, kind: str, name: str) -> Tensor:
        return getattr(self, f"{kind}__{parameter_key(name)}")

    def live(self) -> AdamMoments:
        """Views of the buffers for one task ([1, ...]); updating them updates the state."""
        return AdamMoments(
            {n: self.moment("first", n).unsqueeze(0) for n in self.names},
            {n: self.moment("second", n).unsqueeze(0) for n in self.names},
            int(self.steps),
        )

    def copies(self, tasks: int) -> AdamMoments:
        """A copy of the state for each of `tasks` tasks, leaving the state as it is."""
        return AdamMoments(
            {n: self.moment("first", n).expand(tasks, *self.moment("first", n).shape).clone() for n in self.names},
            {n: self.moment("second", n).expand(tasks, *self.moment("second", n).shape).clone() for n in self.names},
            int(self.steps),
        )


# Reptile's outer step: θ ← θ + ε (φ − θ) as SGD on the surrogate, ε = 0.1 (conf/algorithm/reptile.yaml).
OUTER_SGD = MappingProxyType({"_target_": "torch.optim.SGD", "lr": 0.1})


class Reptile(MAML):
    compilable = False  # its inner loop cuts the graph with requires_grad_, which torch.func forbids
    # Checkpoints written before inner_adam_state existed kept one Adam state per task.
    settings_of_older_checkpoints = {"inner_adam_state": "per_task"}

    def __init__(
        self,
        *,
        inner_optimizer: str = "sgd",
        adam_beta1: float = 0.0,
        adam_beta2: float = 0.999,
        inner_adam_state: str = "shared",
        inner_batch_size: int | None = None,
        eval_inner_batch_size: int | None = None,
        transductive: bool = True,
        inner_lr: float = 0.02,
        inner_steps: int = 5,
        optimizer: Mapping = OUTER_SGD,
        **settings,
    ):
        """MAML's inner-loop settings (conf/algorithm/reptile.yaml), and: `inner_optimizer` (sgd,
        or adam with betas `adam_beta1`, `adam_beta2`), `inner_adam_state`, `inner_batch_size`,
        `eval_inner_batch_size` and `transductive` (the module docstring). No gradient flows
        through the inner loop, so first_order, adapt_norm (the whole network adapts) and
        checkpoint_inner_steps do not apply."""
        super().__init__(
            first_order=True,
            adapt_norm=True,
            checkpoint_inner_steps=False,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            optimizer=optimizer,
            **settings,
        )
        check_choice("algorithm.inner_adam_state", inner_adam_state, ADAM_STATES)
        for key, size in (("inner_batch_size", inner_batch_size), ("eval_inner_batch_size", eval_inner_batch_size)):
            if size is not None:
                check_positive(f"algorithm.{key}", size, 10, otherwise="null for the whole support set")
        self.inner_optimizer, self.adam_betas = inner_optimizer, (adam_beta1, adam_beta2)
        self.inner_batch_size, self.eval_inner_batch_size = inner_batch_size, eval_inner_batch_size
        self.transductive = transductive
        # Only an Adam inner loop has a state to share.
        self.shared_adam = (
            SharedAdamState(self.model) if inner_optimizer == "adam" and inner_adam_state == "shared" else None
        )

    # ------------------------------------------------------------------ inner loop
    def inner_adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        steps: int,
        first_order: bool,
        meta_gradient: bool,
        training: bool = False,
    ) -> tuple[Params, Tensor | None]:
        """φ_t for every task; `training` draws the inner minibatches of meta-training (and
        carries the shared Adam state on), otherwise those of evaluation."""
        # Reptile never differentiates through the inner loop, in training or evaluation.
        tasks, examples = support_x.shape[:2]
        batch_size = self.inner_batch_size if training else self.eval_inner_batch_size
        batches = None
        if batch_size is not None and steps > 0:
            # Evaluation draws its minibatches from a fixed seed: the same for every checkpoint.
            generator = None if training else torch.Generator().manual_seed(self.eval_seed)
            batches = minibatch_indices(tasks, examples, steps, min(batch_size, examples), generator, support_x.device)
        params = per_task(dict(self.model.named_parameters()), tasks, meta_gradient=False)
        if self.inner_optimizer != "adam":
            return self.sgd_adapt(params, support_x, support_y, steps, batches)
        betas, lr = self.adam_betas, self.inner_lr
        if self.shared_adam is None:
            return adam_adapt(self.inner_loss, params, support_x, support_y, steps, lr, betas, batches=batches)
        if not training:  # every evaluation task starts from the training state and leaves it unchanged
            return adam_adapt(
                self.inner_loss,
                params,
                support_x,
                support_y,
                steps,
                lr,
                betas,
                moments=self.shared_adam.copies(tasks),
                batches=batches,
            )
        # Meta-training: the tasks one after another, each continuing the state of the one before.
        adapted, losses = [], []
        for t in range(tasks):
            moments = self.shared_adam.live()
            task_params, task_losses = adam_adapt(
                self.inner_loss,
                {n: p[t : t + 1] for n, p in params.items()},
                support_x[t : t + 1],
                support_y[t : t + 1],
                steps,
                lr,
                betas,
                moments=moments,
                batches=None if batches is None else batches[t : t + 1],
            )
            self.shared_adam.steps.fill_(moments.steps)
            adapted.append(task_params)
            losses.append(task_losses)
        return (
            {n: torch.cat([a[n] for a in adapted]) for n in params},
            None if losses[0] is None else torch.cat(losses),
        )

    def sgd_adapt(
        self, params: Params, x: Tensor, y: Tensor, steps: int, batches: Tensor | None
    ) -> tuple[Params, Tensor | None]:
        task_losses = None
        for i in range(steps):
            step_x, step_y = (
                (x, y) if batches is None else (take_examples(x, batches[:, i]), take_examples(y, batches[:, i]))
            )
            params, task_losses = sgd_step(self.inner_loss, params, step_x, step_y, self.inner_lr, first_order=True)
            params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        return params, task_losses

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Params:
        adapted, _ = self.inner_adapt(
            support_x, support_y, self.eval_inner_steps, first_order=True, meta_gradient=False
        )
        return adapted

    # ------------------------------------------------------------------ learner interface
    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        adapted, inner_losses = self.inner_adapt(
            batch.support_x,
            batch.support_y,
            self.inner_steps,
            first_order=True,
            meta_gradient=False,
            training=True,
        )
        # ∂/∂θ Σ θ·(θ − φ̄) with (θ − φ̄) held constant is θ − φ̄: the Reptile direction.
        surrogate = sum((p * (p - adapted[name].mean(0)).detach()).sum() for name, p in self.model.named_parameters())
        with torch.no_grad():  # query performance of the adapted weights, for the logs only
            predictions = self.predict(adapted, batch.query_x)
        metrics = self.training_metrics(predictions, batch.query_y, inner_losses)
        metrics["loss"] = mean_loss_per_task(self.task_loss_fn(), predictions, batch.query_y)  # logged as train/loss
        return surrogate, metrics

    def evaluate(self, batch: Episode) -> dict[str, Tensor]:
        if self.transductive:
            return super().evaluate(batch)
        adapted = self.adapt(batch.support_x, batch.support_y)
        predictions = self.predict_beside_support(adapted, batch.support_x, batch.query_x)
        return {self.metric: self.episode_metric(predictions, batch.query_y)}

    def predict_beside_support(self, adapted: Params, support_x: Tensor, query_x: Tensor) -> Tensor:
        """[tasks, queries, outputs]: each query predicted in one batch with its task's support
        set, its own row kept, so no query's prediction depends on another query."""

        def one_task(params: Params, support: Tensor, queries: Tensor) -> Tensor:
            def one_query(query: Tensor) -> Tensor:
                return functional_call(self.model, params, (torch.cat([support, query[None]]),))[-1]

            return vmap(one_query)(queries)

        tasks, examples = support_x.shape[:2]
        chunk = max(1, NON_TRANSDUCTIVE_IMAGES // (tasks * (examples + 1)))
        return torch.cat(
            [
                vmap(one_task)(adapted, support_x, query_x[:, start : start + chunk])
                for start in range(0, query_x.shape[1], chunk)
            ],
            1,
        )
