"""The MAML paper's "pretrained" baseline for sinusoid regression (Finn et al. 2017, Section 5.1
and Figure 3): one network trained on all tasks jointly, fine-tuned on each test task's K points.

Training is plain regression, no inner loop: the mean squared error of the network θ on the
points of every task of the meta-batch, minimised with Adam. What cbfinn/maml runs for it
(main.py lines 7-8, `--pretrain_iterations=70000 --metatrain_iterations=0`) is its
`pretrain_op`, Adam on `total_loss1` (maml.py lines 135 and 142): the loss before any inner
update, on each task's K support points (`inputa`) only. `algorithm.fit_points=all` also fits
the query points (twice the points per step, from the same task distribution).

Meta-test is MAML's: `eval_inner_steps` SGD steps of size `inner_lr` on the K support points
from θ (the inner loop of algorithms/maml.py), then the error on the query points. As
cbfinn/maml's test (main.py lines 192-201: `total_loss1` and `total_losses2` for every update
count) the evaluation reports the whole curve: `mse_before` (no step), `mse_step1` ...
`mse_step<N>` after each step, and `mse` after all N, the figure MAML reports as `mse`.
"""

import torch
from torch import Tensor

from metalab.algorithms.inner_loop import per_task, sgd_step
from metalab.algorithms.maml import MAML
from metalab.data.episodes import Episode
from metalab.errors import ConfigError

FIT_POINTS = ("support", "all")


class PretrainedBaseline(MAML):
    task_types = ("regression",)
    fixed_ways = False
    compilable = False

    def __init__(self, *, fit_points: str = "support", **settings):
        """MAML's inner-loop settings for the fine-tuning at meta-test (conf/algorithm/pretrained.yaml),
        and `fit_points`: what the joint training fits (support, or all). It trains without an
        inner loop, so inner_steps, first_order and checkpoint_inner_steps do not apply; at
        meta-test the whole network is fine-tuned (adapt_norm)."""
        super().__init__(inner_steps=0, first_order=True, adapt_norm=True, checkpoint_inner_steps=False, **settings)
        self.fit_points = fit_points
        if self.fit_points not in FIT_POINTS:
            raise ConfigError(
                f"algorithm.fit_points={self.fit_points!r} is unknown; use support (the support points "
                f"only, as cbfinn/maml's pretraining) or all (support and query points)"
            )

    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch.support_x, batch.support_y
        if self.fit_points == "all":
            x, y = torch.cat([x, batch.query_x], 1), torch.cat([y, batch.query_y], 1)
        predictions = self.model(x.flatten(0, 1)).view(*y.shape)
        # Every task has as many points, so the mean over all is the mean of the task means (total_loss1).
        return self.query_loss(predictions, y), {self.metric: self.episode_metric(predictions, y)}

    def evaluate(self, batch: Episode) -> dict[str, Tensor]:
        steps = self.eval_inner_steps
        params = per_task(dict(self.model.named_parameters()), batch.support_x.shape[0], meta_gradient=False)
        results = {
            f"{self.metric}_before": self.episode_metric(self.forward_tasks(params, batch.query_x), batch.query_y)
        }
        for step in range(1, steps + 1):  # the steps `adapt` takes, scored after each
            params, _ = sgd_step(
                self.inner_loss, params, batch.support_x, batch.support_y, self.inner_learning_rate(), first_order=True
            )
            results[f"{self.metric}_step{step}"] = self.episode_metric(
                self.forward_tasks(params, batch.query_x), batch.query_y
            )
        results[self.metric] = results[f"{self.metric}_step{steps}"] if steps else results[f"{self.metric}_before"]
        return results
