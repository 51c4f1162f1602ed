"""MAML++ (Antoniou, Edwards, Storkey 2019): MAML made stable and faster to train.

On top of MAML's inner loop θ_{k+1} = θ_k − α_{k,l} ∇L(θ_k; S) this learner has:

- multi-step loss (MSL): the outer loss is Σ_k v_k L(θ_k; Q) over every inner step k,
  with weights v starting uniform and annealed toward the last step over
  `msl_steps` outer steps; afterwards only the last step's loss counts;
- learned per-layer, per-step inner learning rates α_{k,l} (LSLR), one scalar for each
  parameter tensor l and inner step k, meta-learned with θ;
- derivative-order annealing: first order for the first `first_order_steps` outer
  steps, second order afterwards;
- per-step normalization: BatchNorm's scale and shift are separate parameters for each
  inner step (BNWB). They are meta-learned, not adapted. Step k's set normalizes step k's
  support pass and the query pass after the update it makes. The normalization statistics
  are the batch statistics of each step's own forward pass, so they are per step by
  construction (metalab's backbones keep no running statistics: those do not work under
  vmap, and evaluation is transductive like MAML's);
- cosine annealing of the outer learning rate (the scheduler in conf/algorithm/mamlpp.yaml).

Evaluation with more inner steps than training reuses the last step's learning rates
and normalization parameters.
"""

from functools import partial

import torch
from torch import Tensor, nn

from metalab.algorithms.inner_loop import Params, checkpointed_sgd_step, parameter_key, per_task, sgd_step
from metalab.algorithms.maml import MAML
from metalab.backbones.forward_options import PLAIN_PASS, ForwardOptions
from metalab.data.episodes import Episode


class MAMLPlusPlus(MAML):
    compilable = True

    def __init__(
        self,
        *,
        step_lr_lr: float | None = 1e-5,
        msl_steps: int = 5000,
        first_order_steps: int = 25000,
        inner_steps: int = 5,
        eval_inner_steps: int = 5,
        **settings,
    ):
        """MAML's settings (conf/algorithm/mamlpp.yaml), and: `step_lr_lr`, the outer lr of the
        learned inner rates (null: the optimizer's); `msl_steps`, the outer steps over which the
        multi-step loss anneals to the last step's; `first_order_steps`, the outer steps trained
        first order before second order. The order is annealed (first_order does not apply) and
        the normalization is per step, never adapted (adapt_norm does not apply)."""
        super().__init__(
            first_order=False, adapt_norm=False, inner_steps=inner_steps, eval_inner_steps=eval_inner_steps, **settings
        )
        self.step_lr_lr, self.msl_steps, self.first_order_steps = step_lr_lr, msl_steps, first_order_steps
        named = dict(self.model.named_parameters())
        self.adapted_names = [n for n in named if n not in self.norm_names]
        # α_{k,l}: one learning rate per adapted parameter tensor and inner step.
        self.step_lrs = nn.ParameterDict(
            {
                parameter_key(n): nn.Parameter(torch.full((self.inner_steps,), float(self.inner_lr)))
                for n in self.adapted_names
            }
        )
        # Normalization scale/shift of inner steps k = 1..steps-1; step 0 uses the module's own.
        # As in the reference, one set per inner step (MetaBatchNormLayer's weight and bias
        # have a leading num_step dimension, meta_neural_network_architectures.py).
        self.step_norms = nn.ParameterDict(
            {
                parameter_key(n): nn.Parameter(
                    named[n].detach().clone().expand(self.inner_steps - 1, *named[n].shape).clone()
                )
                for n in self.norm_names
            }
        )
        # algorithm.compile=true: the schedules of the current outer step, set outside the
        # compiled graph (see compiled_meta_loss). Not saved: they follow from global_step.
        self.register_buffer("msl_weights", torch.zeros(self.inner_steps), persistent=False)
        self.compiled_schedule: tuple[bool, Tensor | None] = (False, None)

    def parameter_groups(self) -> list[dict]:
        # The learned inner rates may take their own outer lr (`step_lr_lr`): Adam moves every
        # parameter by about its lr per step, which is large next to a small initial α.
        if self.step_lr_lr is None:
            return super().parameter_groups()
        rates = list(self.step_lrs.parameters())
        chosen = {id(p) for p in rates}
        return [
            {"params": [p for p in self.parameters() if id(p) not in chosen]},
            {"params": rates, "lr": self.step_lr_lr},
        ]

    # ------------------------------------------------------------------ schedules
    def training_first_order(self) -> bool:
        return self.first_order_at(self.global_step)

    def outer_schedule(self) -> tuple[bool, Tensor | None]:
        """(first order?, multi-step loss weights v or None) at the current outer step."""
        if torch.compiler.is_compiling():
            return self.compiled_schedule
        return self.training_first_order(), self.step_loss_weights(self.global_step)

    def compiled_meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        # Read inside the graph, global_step would be a constant: a recompilation every outer
        # step. Instead the weights v enter as a buffer updated in place (a graph input) and
        # the two switches as flags, which change at most twice in a run (one compilation each).
        first_order, weights = self.outer_schedule()  # outside the graph: from global_step
        if weights is not None:
            self.msl_weights.copy_(weights)
        self.compiled_schedule = (first_order, None if weights is None else self.msl_weights)
        return super().compiled_meta_loss(batch)

    def first_order_at(self, outer_step: int) -> bool:
        return outer_step < self.first_order_steps

    def step_loss_weights(self, outer_step: int) -> Tensor | None:
        """v_k for k = 1..steps while the multi-step loss is on, None once only the last step counts."""
        n = self.inner_steps
        if outer_step >= self.msl_steps:
            return None
        decay = 1.0 / n / self.msl_steps * outer_step
        floor = 0.03 / n  # the paper's minimum weight of a non-final step
        weights = torch.full((n,), max(1.0 / n - decay, floor))
        weights[-1] = min(1.0 / n + decay * (n - 1), 1.0 - floor * (n - 1))
        return weights

    # ------------------------------------------------------------------ inner loop
    def trajectory(
        self, support_x: Tensor, support_y: Tensor, steps: int, first_order: bool, meta_gradient: bool
    ) -> tuple[list[Params], Tensor | None]:
        """Per-task parameters after each of `steps` inner updates (index 0: before any)."""
        tasks = support_x.shape[0]
        named = dict(self.model.named_parameters())
        weights = per_task({n: named[n] for n in self.adapted_names}, tasks, meta_gradient)
        norm_sets = [per_task({n: named[n] for n in self.norm_names}, tasks, meta_gradient)]
        for k in range(self.inner_steps - 1):
            norm_sets.append(
                per_task({n: self.step_norms[parameter_key(n)][k] for n in self.norm_names}, tasks, meta_gradient)
            )
        states, inner_losses = [{**weights, **norm_sets[0]}], None
        take_step = (
            checkpointed_sgd_step
            if meta_gradient and self.checkpoint_inner_steps
            else partial(sgd_step, traceable=self.compiled and meta_gradient)
        )
        for k in range(steps):
            step = min(k, self.inner_steps - 1)  # evaluation past the trained steps reuses the last step's
            norms = norm_sets[step]
            lr = {n: self.step_lrs[parameter_key(n)][step] for n in self.adapted_names}

            def support_loss(
                params: Params, x: Tensor, y: Tensor, options: ForwardOptions = PLAIN_PASS, norms: Params = norms
            ) -> Tensor:
                return self.inner_loss({**params, **norms}, x, y, options)

            weights, inner_losses = take_step(support_loss, weights, support_x, support_y, lr, first_order)
            # The query after update k+1 is normalized with step k's parameters, those of the
            # support pass that made the update: few_shot_learning_system.py `forward` passes the
            # same num_step to both net_forward calls of an inner step.
            states.append({**weights, **norms})
        return states, inner_losses

    def inner_adapt(
        self, support_x: Tensor, support_y: Tensor, steps: int, first_order: bool, meta_gradient: bool
    ) -> tuple[Params, Tensor | None]:
        states, inner_losses = self.trajectory(support_x, support_y, steps, first_order, meta_gradient)
        return states[-1], inner_losses

    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        first_order, weights = self.outer_schedule()
        states, inner_losses = self.trajectory(
            batch.support_x, batch.support_y, self.inner_steps, first_order, meta_gradient=True
        )
        final = self.predict(states[-1], batch.query_x)
        loss = self.query_loss(final, batch.query_y)
        if weights is not None:  # Σ_k v_k L(θ_k; Q), each L the mean over the meta-batch
            losses = [self.query_loss(self.predict(s, batch.query_x), batch.query_y) for s in states[1:-1]]
            loss = (weights.to(final.dtype).to(final.device) * torch.stack([*losses, loss])).sum()
        return loss, self.training_metrics(final, batch.query_y, inner_losses)
