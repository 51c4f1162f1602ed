"""MAML: Model-Agnostic Meta-Learning (Finn, Abbeel, Levine 2017).

Meta-learn an initialization θ such that a few gradient steps on a task's support set
give parameters that do well on its query set:

    θ'_i = θ − α ∇θ L(θ; S_i)                       (inner loop, `inner_steps` times)
    θ   ← θ − β ∇θ Σ_i L(θ'_i; Q_i)                  (outer loop, through the inner steps)

The outer gradient flows through ∇θ L (second order) unless `first_order=true`. The
inner loop is functional and batched over the tasks of the meta-batch (inner_loop.py).
"""

from torch import Tensor, nn
from torch.func import vmap

from metalab.algorithms.base import MetaLearner
from metalab.algorithms.inner_loop import batched_forward, batched_loss, per_task, sgd_adapt
from metalab.backbones import build_backbone
from metalab.data.episodes import Episode


class MAML(MetaLearner):
    # The linear head has one output per training way.
    fixed_ways = True

    def __init__(self, config: dict, input_shape: list[int], task_type: str):
        super().__init__(config, input_shape, task_type)
        backbone = build_backbone(config["backbone"], input_shape)
        outputs = config["ways"] if task_type == "classification" else 1
        self.model = nn.Sequential(backbone, nn.Linear(backbone.out_features, outputs))
        self.forward_tasks = batched_forward(self.model)
        self.inner_loss = batched_loss(self.model, self.task_loss_fn())

    def adapted_query_predictions(self, batch: Episode, steps: int, first_order: bool, meta_gradient: bool) -> Tensor:
        """Adapt to each task's support set, then predict its query set: [tasks, queries, outputs]."""
        params = per_task(dict(self.model.named_parameters()), batch.support_x.shape[0], meta_gradient)
        lr = self.algorithm_cfg["inner_lr"]
        adapted = sgd_adapt(self.inner_loss, params, batch.support_x, batch.support_y, steps, lr, first_order)
        return self.forward_tasks(adapted, batch.query_x)

    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.algorithm_cfg
        predictions = self.adapted_query_predictions(batch, cfg["inner_steps"], cfg["first_order"], meta_gradient=True)
        loss = self.task_loss_fn()(predictions.flatten(0, 1), batch.query_y.flatten(0, 1))
        return loss, {self.metric: self.episode_metric(predictions, batch.query_y)}

    def evaluate(self, batch: Episode) -> dict[str, Tensor]:
        steps = self.algorithm_cfg["eval_inner_steps"]
        # Evaluation needs no graph through the inner steps, so first order is exact here.
        after = self.adapted_query_predictions(batch, steps, first_order=True, meta_gradient=False)
        results = {self.metric: self.episode_metric(after, batch.query_y)}
        if self.task_type == "regression":
            # The pre-adaptation error shows what the inner loop buys.
            before = vmap(self.model)(batch.query_x)
            results[f"{self.metric}_before"] = self.episode_metric(before, batch.query_y)
        return results
