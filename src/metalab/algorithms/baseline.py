"""Baseline and Baseline++ (Chen et al. 2019, "A Closer Look at Few-shot Classification").

Transfer learning instead of meta-learning:

- Training: a standard classifier over all C training classes, a backbone f_φ and a head
  trained together by cross-entropy on mini-batches of images labelled with their class
  index in the training split (`dataset.episodes=global_labels`, data/global_labels.py).
  Baseline's head is linear, W f_φ(x) + b; Baseline++'s is cosine similarity,
  s · cos(f_φ(x), w_c) with each class's weight vector w_c = g_c v_c/‖v_c‖ (a learnable norm
  g_c and direction v_c) and a fixed scale s (wyharveychen/CloserLookFewShot,
  methods/baselinetrain.py lines 14-18, backbone.py `distLinear` lines 22-44).
- Meta-test: the backbone is frozen and the training head discarded; a new head of the same
  kind with one output per way is fitted on each episode's support features (by SGD with
  momentum, mini-batches of 4, 100 passes: methods/baselinefinetune.py lines 27-50), then
  classifies the queries. All tasks of a batch fit their heads at once: each task's head
  is a slice of one tensor, and the gradient of the sum of the task losses is each task's
  own gradient (as in inner_loop.py).

BatchNorm: `algorithm.batch_norm` (algorithms/metric.py); the default `running` trains in
training mode and extracts features in eval mode, as the authors' save_features.py
(line 120) does before fitting the heads.
"""

import math
from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import Tensor, nn

from metalab.algorithms.inner_loop import Params, take_examples
from metalab.algorithms.metric import MetricLearner
from metalab.data.episodes import Episode
from metalab.errors import ConfigError

HEADS = ("linear", "cosine")


def cosine_scale(classes: int) -> float:
    """Baseline++'s fixed scale s of the cosine logits: 2 for up to 200 classes, 10 above
    (a larger one for Omniglot's thousands of training classes; backbone.py lines 30-33)."""
    return 2.0 if classes <= 200 else 10.0


def head_logits(kind: str, features: Tensor, head: Params, scale: float) -> Tensor:
    """[tasks, n, classes] logits of a head for [tasks, n, dim] features.

    linear: `weight` [tasks, classes, dim], `bias` [tasks, classes]. cosine: `direction`
    [tasks, classes, dim] and `norm` [tasks, classes], the weight normalization w = g v/‖v‖
    (torch's WeightNorm over dim 0, which distLinear applies), against features divided by
    their norm + 1e-5 (backbone.py lines 36-37).
    """
    if kind == "linear":
        return features @ head["weight"].transpose(-1, -2) + head["bias"].unsqueeze(-2)
    weight = head["norm"].unsqueeze(-1) * head["direction"] / head["direction"].norm(dim=-1, keepdim=True)
    unit = features / (features.norm(dim=-1, keepdim=True) + 1e-5)
    return scale * unit @ weight.transpose(-1, -2)


def initial_head(
    kind: str, classes: int, dim: int, generator: torch.Generator | None = None, zero_bias: bool = False
) -> Params:
    """A head's starting parameters, without a task dimension, as torch initializes nn.Linear
    (weight and bias uniform in ±1/√dim), with the norm g = ‖v‖ that WeightNorm starts from
    (so w = v at first). `zero_bias`: the training head of Baseline (baselinetrain.py line 16)."""
    bound = 1 / math.sqrt(dim)
    weight = (torch.rand(classes, dim, generator=generator) * 2 - 1) * bound
    if kind == "linear":
        bias = torch.zeros(classes) if zero_bias else (torch.rand(classes, generator=generator) * 2 - 1) * bound
        return {"weight": weight, "bias": bias}
    return {"direction": weight, "norm": weight.norm(dim=-1)}


def fit_heads(
    kind: str,
    features: Tensor,
    labels: Tensor,
    ways: int,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    scale: float,
    generator: torch.Generator | None = None,
) -> Params:
    """A new head per task fitted on its [tasks, n, dim] support features and [tasks, n] labels.

    baselinefinetune.py lines 33-50: `epochs` passes over the support set in a random order,
    mini-batches of `batch_size` (the last one of a pass smaller), cross-entropy, and
    torch.optim.SGD with momentum, dampening and weight decay on every head parameter:
    d = ∇ + λp; b = d at the first step, then b ← μb + (1 − dampening)d; p ← p − lr·b.
    Every task starts from the same random head and visits its examples in the same order
    (both drawn from `generator`), so a task's head does not depend on which other tasks share
    its batch. Returns the heads' parameters, [tasks, ...] each.
    """
    tasks, examples, dim = features.shape
    start = initial_head(kind, ways, dim, generator)
    head = {name: p.to(features).expand(tasks, *p.shape).clone() for name, p in start.items()}
    velocity: Params = {}
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(examples, generator=generator).to(features.device)
            for first in range(0, examples, batch_size):
                batch = order[first : first + batch_size].expand(tasks, -1)
                x, y = take_examples(features, batch), take_examples(labels, batch)
                params = {name: p.requires_grad_(True) for name, p in head.items()}
                logits = head_logits(kind, x, params, scale)
                losses = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
                grads = torch.autograd.grad(losses.view(tasks, -1).mean(1).sum(), list(params.values()))
                for (name, p), grad in zip(params.items(), grads):
                    step = grad + weight_decay * p.detach()
                    velocity[name] = (
                        step if name not in velocity else velocity[name].mul(momentum).add(step, alpha=1 - dampening)
                    )
                    head[name] = p.detach() - lr * velocity[name]
    return head


# The new head's fit at meta-test: Chen et al.'s (conf/algorithm/baseline.yaml).
FINETUNE = MappingProxyType(
    {"epochs": 100, "batch_size": 4, "lr": 0.01, "momentum": 0.9, "dampening": 0.9, "weight_decay": 0.001}
)


class Baseline(MetricLearner):
    """Baseline: a linear classifier over the training classes; a new linear head per test episode."""

    head_kind = "linear"
    settings_of_older_checkpoints = {}  # written with algorithm.batch_norm from the first
    # The linear head has no scale: a value would be ignored, so it is refused (validation.check_algorithm_keys).
    fixed_settings = {
        "cosine_scale": (None, "baseline's linear head has no cosine scale; it is Baseline++'s (algorithm=baselinepp)")
    }

    def __init__(
        self,
        *,
        num_classes: int | None = None,
        cosine_scale: float | None = None,
        finetune: Mapping = FINETUNE,
        scheduler: Mapping | None = None,
        **settings,
    ):
        """`num_classes`: the training classes the classifier tells apart (metalab-train sets it
        from the data, `settings_from_data`); `cosine_scale`: Baseline++'s similarity scale (null:
        chosen from the number of classes, `cosine_scale`); `finetune`: the new head's fit at
        meta-test (epochs, batch_size, lr, momentum, dampening, weight_decay). `settings`:
        MetricLearner's. The defaults are conf/algorithm/baseline.yaml's; `num_classes` has none
        worth having (it is the training data's), so from Python it must be given."""
        super().__init__(scheduler=scheduler, **settings)
        finetune = dict(finetune)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(
                f"algorithm.num_classes={num_classes!r} is invalid: {self.algorithm_name} "
                "classifies among the training classes; metalab-train sets it to their number, "
                "or give an integer >= 2"
            )
        self.backbone = self.build_embedding()
        start = initial_head(self.head_kind, num_classes, self.backbone.out_features, zero_bias=True)
        self.classifier = nn.ParameterDict({name: nn.Parameter(p) for name, p in start.items()})
        self.finetune = dict(finetune)
        self.cosine_scale = cosine_scale

    @classmethod
    def settings_from_data(cls, config: dict, datamodule) -> None:
        train = datamodule.sources["train"]
        name = config["algorithm"]["name"]
        if not hasattr(train, "num_classes"):
            raise ConfigError(
                f"algorithm={name} trains on images labelled with their class among all training "
                f"classes, but dataset.episodes={config['dataset'].get('episodes', 'few_shot')}; "
                "set dataset.episodes=global_labels (its algorithm config does)"
            )
        given = config["algorithm"].get("num_classes")
        if given is None:
            config["algorithm"]["num_classes"] = train.num_classes
        elif isinstance(given, bool) or not isinstance(given, int) or given < train.num_classes:
            raise ConfigError(
                f"algorithm.num_classes={given!r} but the training split has {train.num_classes} "
                f"classes; set algorithm.num_classes={train.num_classes}, or null to take it from "
                "the data"
            )

    def scale(self, classes: int) -> float:
        """The cosine head's scale for `classes` outputs (unused by the linear head)."""
        return cosine_scale(classes) if self.cosine_scale is None else float(self.cosine_scale)

    def classify(self, features: Tensor, head: Params) -> Tensor:
        classes = head["weight" if self.head_kind == "linear" else "direction"].shape[-2]
        return head_logits(self.head_kind, features, head, self.scale(classes))

    # ------------------------------------------------------------------ learner interface
    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy over all training classes, every image of the meta-batch (support and
        query alike) one example with its global label."""
        support, query = self.embed_episode(self.backbone, batch.support_x, batch.query_x)
        features = torch.cat([support, query], 1)
        labels = torch.cat([batch.support_y, batch.query_y], 1)
        head = {name: p.unsqueeze(0) for name, p in self.classifier.items()}  # one head shared by all
        logits = self.classify(features.flatten(0, 1).unsqueeze(0), head).view(*labels.shape, -1)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return loss, {"acc": self.episode_metric(logits, labels)}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Params:
        """A new head per task, fitted on the frozen backbone's support features."""
        features = self.embed(self.backbone, support_x).detach()
        ways = int(support_y.max()) + 1
        cfg = self.finetune
        # A fixed seed: the same random start and example order for every checkpoint and task.
        generator = torch.Generator().manual_seed(self.eval_seed)
        return fit_heads(
            self.head_kind,
            features,
            support_y,
            ways,
            cfg["epochs"],
            cfg["batch_size"],
            cfg["lr"],
            cfg["momentum"],
            cfg["dampening"],
            cfg["weight_decay"],
            self.scale(ways),
            generator,
        )

    def predict(self, head: Params, query_x: Tensor) -> Tensor:
        return self.classify(self.embed(self.backbone, query_x), head)


class BaselinePlusPlus(Baseline):
    """Baseline++: the same with cosine-similarity heads (weight-normalized, scaled)."""

    head_kind = "cosine"
    fixed_settings = {}  # cosine_scale acts here
