"""Reptile (Nichol, Achiam, Schulman 2018).

Adapt to each task with plain SGD or Adam for k steps, then move the initialization
toward the adapted weights:

    φ_i = U^k_{S_i}(θ)                      (k inner steps, tasks adapted in parallel)
    θ  ← θ + ε (mean_i φ_i − θ)              (ε: meta step size, annealed linearly to 0)

No gradient flows through the inner loop. The outer update is applied by the outer
optimizer (SGD with lr ε, conf/algorithm/reptile.yaml) as the gradient of a surrogate
loss whose gradient is exactly θ − mean_i φ_i; keeping it a gradient means one backward
per outer step, so DDP averages it across processes like any other learner's.
"""

import torch
from torch import Tensor

from metalab.algorithms.inner_loop import Params, adam_adapt, mean_loss_per_task, per_task, sgd_adapt
from metalab.algorithms.maml import MAML
from metalab.data.episodes import Episode


class Reptile(MAML):
    compilable = False  # its inner loop cuts the graph with requires_grad_, which torch.func forbids

    def inner_adapt(self, support_x: Tensor, support_y: Tensor, steps: int, first_order: bool,
                    meta_gradient: bool) -> tuple[Params, Tensor | None]:
        # Reptile never differentiates through the inner loop, in training or evaluation.
        cfg = self.algorithm_cfg
        params = per_task(dict(self.model.named_parameters()), support_x.shape[0], meta_gradient=False)
        if cfg["inner_optimizer"] == "adam":
            betas = (cfg["adam_beta1"], cfg["adam_beta2"])
            return adam_adapt(self.inner_loss, params, support_x, support_y, steps, cfg["inner_lr"], betas)
        return sgd_adapt(self.inner_loss, params, support_x, support_y, steps, cfg["inner_lr"], first_order=True)

    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        adapted, inner_losses = self.inner_adapt(batch.support_x, batch.support_y, self.algorithm_cfg["inner_steps"],
                                                 first_order=True, meta_gradient=False)
        # ∂/∂θ Σ θ·(θ − φ̄) with (θ − φ̄) held constant is θ − φ̄: the Reptile direction.
        surrogate = sum((p * (p - adapted[name].mean(0)).detach()).sum() for name, p in self.model.named_parameters())
        with torch.no_grad():  # query performance of the adapted weights, for the logs only
            predictions = self.predict(adapted, batch.query_x)
        metrics = self.training_metrics(predictions, batch.query_y, inner_losses)
        metrics["loss"] = mean_loss_per_task(self.task_loss_fn(), predictions, batch.query_y)  # logged as train/loss
        return surrogate, metrics
