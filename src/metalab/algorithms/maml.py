"""MAML: Model-Agnostic Meta-Learning (Finn, Abbeel, Levine 2017).

Meta-learn an initialization θ such that a few gradient steps on a task's support set
give parameters that do well on its query set:

    θ'_i = θ − α ∇θ L(θ; S_i)                       (inner loop, `inner_steps` times)
    θ   ← θ − β ∇θ Σ_i L(θ'_i; Q_i)                  (outer loop, through the inner steps)

The outer gradient flows through ∇θ L (second order) unless `first_order=true`. The
inner loop is functional and batched over the tasks of the meta-batch (inner_loop.py).

Two settings follow Finn's code (cbfinn/maml) where it differs from the textbook form:

- `inner_loss`: `mean` adapts on the mean support loss; `sum_over_shots` on the sum over
  the N·K support examples divided by K (`sum`: the plain sum), which is what cbfinn/maml differentiates
  (utils.py:58, `xent` returns each example's loss / update_batch_size, and maml.py:90
  `tf.gradients` sums them). The second is N × the first, so the same α takes an N times
  larger step: the paper's α = 0.4 for 5-way Omniglot needs it.
- `adapt_norm`: false keeps the normalization's scale/shift out of the inner loop. They
  are then meta-learned only, as in cbfinn/maml, whose batch-norm variables are created by
  tf.contrib.layers.batch_norm (utils.py:41) outside the `weights` dict that the inner
  step updates (maml.py:90-93).

`MAML` is also the base of the rest of the optimization-based family (first-order MAML,
Reptile, ANIL, Meta-SGD, MAML++): each overrides only the hook that differs —
`training_first_order`, `inner_learning_rate`, `inner_adapt`, `predict` or `meta_loss`.
"""

from collections.abc import Mapping
from typing import Literal

from torch import Tensor, nn
from torch.func import vmap

from metalab.algorithms.base import MetaLearner
from metalab.algorithms.inner_loop import Params, batched_forward, batched_loss, per_task, sgd_adapt
from metalab.backbones.forward_options import PLAIN_PASS, ForwardOptions, takes_forward_options
from metalab.data.episodes import Episode
from metalab.errors import ConfigError


def finn_init(model: nn.Sequential) -> None:
    """Finn et al.'s initialisation (cbfinn/maml maml.py `construct_conv_weights`): convolutions
    Glorot-uniform (TensorFlow's xavier_initializer_conv2d) with zero biases, the output layer's
    weights standard normal N(0, 1) with zero biases. BatchNorm keeps scale 1 and shift 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    head = model[-1]
    nn.init.normal_(head.weight, 0.0, 1.0)
    nn.init.zeros_(head.bias)


class BackboneWithHead(nn.Sequential):
    """The backbone, then the head: an nn.Sequential (its parameters named 0.* and 1.*, as
    checkpoints hold them) whose forward hands the pass's ForwardOptions from the inner loop to
    the backbone, where the backbone takes them (takes_forward_options)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__(backbone, head)
        self.backbone_takes_options = takes_forward_options(backbone)

    def forward(self, x: Tensor, options: ForwardOptions = PLAIN_PASS) -> Tensor:
        backbone, head = self
        return head(backbone(x, options=options) if self.backbone_takes_options else backbone(x))


class MAML(MetaLearner):
    # The linear head has one output per training way.
    fixed_ways = True
    compilable = True

    def __init__(
        self,
        *,
        inner_lr: float = 0.01,
        inner_loss: str = "mean",
        inner_steps: int = 1,
        eval_inner_steps: int = 10,
        task_execution: str = "auto",
        first_order: bool = False,
        adapt_norm: bool = True,
        checkpoint_inner_steps: bool = False,
        init: Literal["default", "finn"] = "default",
        **common,
    ):
        """`inner_lr` α, `inner_steps` (meta-training) and `eval_inner_steps` (meta-test) SGD steps
        on the support loss reduced as `inner_loss` (mean, sum or sum_over_shots); `first_order`
        drops the second-order terms; `adapt_norm` false keeps the normalization's scale and
        shift out of the inner loop; `checkpoint_inner_steps` recomputes each inner step's
        activations in the backward pass instead of keeping them (memory for time);
        `task_execution`: how the tasks' forward passes run (inner_loop.TASK_EXECUTIONS);
        `init`: default (PyTorch's) or finn (`finn_init`). `common`: MetaLearner's arguments.
        The defaults are conf/algorithm/maml.yaml's (the paper's sinusoid setting)."""
        super().__init__(**common)
        self.inner_lr, self.inner_loss_kind = inner_lr, inner_loss
        self.inner_steps, self.eval_inner_steps = inner_steps, eval_inner_steps
        self.execution, self.first_order = task_execution, first_order
        self.adapt_norm, self.checkpoint_inner_steps = adapt_norm, checkpoint_inner_steps
        backbone = self.backbone_network()
        outputs = self.ways if self.task_type == "classification" else 1
        if outputs is None:
            raise ConfigError(f"{type(self).__name__} sizes its output layer to the ways: give ways (e.g. ways=5)")
        self.model = BackboneWithHead(backbone, nn.Linear(self.feature_size(backbone), outputs))
        if init == "finn":
            finn_init(self.model)
        elif init != "default":
            raise ConfigError(f"algorithm.init={init!r} is unknown; use default (PyTorch's) or finn (Finn et al.'s)")
        self.forward_tasks = batched_forward(self.model, self.task_execution())
        self.inner_loss = batched_loss(self.model, self.task_loss_fn(), **self.inner_loss_reduction())
        self.norm_names = normalization_parameter_names(self.model)

    def inner_loss_reduction(self) -> dict:
        """`inner_loss` as keyword arguments of `batched_loss` (ways = 1 for regression)."""
        ways = self.ways if self.task_type == "classification" else 1
        return {"reduction": self.inner_loss_kind, "ways": ways, "execution": self.task_execution()}

    def task_execution(self) -> str:
        """How the tasks' forward passes run (inner_loop.TASK_EXECUTIONS)."""
        return self.execution

    # ------------------------------------------------------------------ hooks
    def training_first_order(self) -> bool:
        """Whether meta-training drops the second-order terms at the current step."""
        return self.first_order

    def inner_learning_rate(self) -> float | Mapping[str, Tensor]:
        """α: one scalar for MAML; a tensor per parameter for learners that learn it."""
        return self.inner_lr

    def inner_adapt(
        self, support_x: Tensor, support_y: Tensor, steps: int, first_order: bool, meta_gradient: bool
    ) -> tuple[Params, Tensor | None]:
        """θ'_t for every task t (`steps` SGD steps from θ on its support set), and the
        per-task support losses of the last step."""
        params = per_task(dict(self.model.named_parameters()), support_x.shape[0], meta_gradient)
        checkpointed = meta_gradient and self.checkpoint_inner_steps
        lr, loss = self.inner_learning_rate(), self.inner_loss
        fixed = {} if self.adapt_norm else {n: params.pop(n) for n in self.norm_names}
        if fixed:  # the normalization parameters take part in every forward pass but are not stepped
            lr = {n: lr[n] for n in params} if isinstance(lr, Mapping) else lr

            def loss(adapted: Params, x: Tensor, y: Tensor, options: ForwardOptions = PLAIN_PASS) -> Tensor:
                return self.inner_loss({**adapted, **fixed}, x, y, options)

        adapted, inner_losses = sgd_adapt(
            loss,
            params,
            support_x,
            support_y,
            steps,
            lr,
            first_order,
            checkpointed,
            traceable=self.compiled and meta_gradient,
        )
        return {**adapted, **fixed}, inner_losses

    # ------------------------------------------------------------------ learner interface
    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        adapted, inner_losses = self.inner_adapt(
            batch.support_x,
            batch.support_y,
            self.inner_steps,
            self.training_first_order(),
            meta_gradient=True,
        )
        predictions = self.predict(adapted, batch.query_x)
        return self.query_loss(predictions, batch.query_y), self.training_metrics(
            predictions, batch.query_y, inner_losses
        )

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Params:
        # Evaluation needs no graph through the inner steps, so first order is exact here.
        adapted, _ = self.inner_adapt(
            support_x, support_y, self.eval_inner_steps, first_order=True, meta_gradient=False
        )
        return adapted

    def predict(self, adapted: Params, query_x: Tensor) -> Tensor:
        return self.forward_tasks(adapted, query_x)

    def evaluate(self, batch: Episode) -> dict[str, Tensor]:
        results = super().evaluate(batch)
        if self.task_type == "regression":
            # The pre-adaptation error shows what the inner loop buys.
            before = vmap(self.model)(batch.query_x)
            results[f"{self.metric}_before"] = self.episode_metric(before, batch.query_y)
        return results

    # ------------------------------------------------------------------ helpers
    def query_loss(self, predictions: Tensor, targets: Tensor) -> Tensor:
        """Mean loss over every query of the meta-batch (tasks are equally sized, so this is
        also the mean of the per-task losses)."""
        return self.task_loss_fn()(predictions.flatten(0, 1), targets.flatten(0, 1))

    def training_metrics(self, predictions: Tensor, targets: Tensor, inner_losses: Tensor | None) -> dict[str, Tensor]:
        metrics = {self.metric: self.episode_metric(predictions, targets)}
        if inner_losses is not None:  # the support loss of the last inner step, watched for divergence
            metrics["inner_loss"] = inner_losses
        return metrics


def normalization_parameter_names(model: nn.Module) -> list[str]:
    """The names of the normalization layers' scale and shift parameters in `model`."""
    norm_modules = {name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)}
    return [n for n, _ in model.named_parameters() if n.rpartition(".")[0] in norm_modules]
