"""What the metric learners (ProtoNet, Matching Networks, Relation Networks) share: how their
BatchNorm normalizes, chosen with `algorithm.batch_norm`. The transfer baselines (Baseline,
Baseline++: algorithms/baseline.py) embed their images the same way.

- `running` (the default in their configs): the authors' protocol as in
  jakesnell/prototypical-networks, which trains in training mode (protonets/engine.py,
  line 29) and evaluates after `model.eval()` (protonets/utils/model.py, line 15;
  scripts/predict/few_shot/eval.py, line 16). In training, BatchNorm normalizes with the
  statistics of the whole meta-batch's images, embedded as one batch (the weights are
  shared across tasks, so no per-task vmap is needed), and keeps running averages; at
  meta-test, in eval mode (Lightning's validate/test, and `metalab.load_learner`), it
  uses those averages, so a query's output depends on the support set and itself only.
- `transductive`: every task's images are normalized with that task's own statistics
  (the backbone vmapped per task, BatchNorm without running statistics), in training and
  at meta-test alike, so a query's output depends on the other queries of its pass. This is
  what floodsung/LearningToCompare_FSL's test scripts compute: they never call
  `model.eval()`, so their BatchNorm (momentum 1, omniglot/omniglot_test_one_shot.py lines
  62-98) normalizes the support set and the queries each with their own pass's statistics
  (lines 172-173). It is also what a checkpoint written before this setting existed was
  trained with: a config without `algorithm.batch_norm` is read as `transductive`, so such
  checkpoints load and predict as they did.
"""

from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import Tensor, nn

from metalab.algorithms.base import MetaLearner
from metalab.algorithms.inner_loop import map_tasks
from metalab.errors import ConfigError

BATCH_NORM = ("running", "transductive")
# Adam's rate halved every 2,000 episodes: Snell et al.'s schedule, the metric learners' default.
STEP_LR = MappingProxyType({"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 2000, "gamma": 0.5})


def one_hot_labels(support_y: Tensor) -> Tensor:
    """[tasks, support, ways] one-hot matrix of labels 0..ways-1 (ways: the largest label + 1)."""
    return nn.functional.one_hot(support_y, int(support_y.max()) + 1)


class MetricLearner(MetaLearner):
    task_types = ("classification",)
    # Checkpoints written before batch_norm existed normalized with each pass's own statistics.
    settings_of_older_checkpoints = {"batch_norm": "transductive"}

    def __init__(self, *, batch_norm: str = "running", scheduler: Mapping | None = STEP_LR, **common):
        """`batch_norm`: running or transductive (the module docstring); `common`: MetaLearner's arguments.
        The default schedule is the authors' for ProtoNet (conf/algorithm/protonet.yaml)."""
        super().__init__(scheduler=scheduler, **common)
        self.batch_norm = batch_norm
        if self.batch_norm not in BATCH_NORM:
            raise ConfigError(
                f"algorithm.batch_norm={self.batch_norm!r} is unknown; use running (the authors' "
                f"evaluation with running statistics) or transductive (each task's own statistics)"
            )
        self.running_stats = self.batch_norm == "running"

    def adapt(self, support_x: Tensor, support_y: Tensor):
        """`adapt_one_hot` given the labels as a one-hot matrix."""
        return self.adapt_one_hot(support_x, one_hot_labels(support_y))

    def adapt_one_hot(self, support_x: Tensor, support_one_hot: Tensor):
        """The adapted state from the support images and their [tasks, support, ways] one-hot labels
        (any dtype). The number of ways is the matrix's width, not a value read from the labels, so
        the whole of adapt and predict is one traceable graph (metalab.export) for any ways."""
        raise NotImplementedError

    def build_embedding(self, backbone_cfg: dict | None = None) -> nn.Module:
        """The backbone (default: the one this learner was given) for its input shape, its
        BatchNorm keeping running statistics or not as `batch_norm` says."""
        return self.backbone_network(backbone_cfg, running_stats=self.running_stats)

    def embed(self, module: nn.Module, x: Tensor) -> Tensor:
        """module applied to [tasks, n, ...] inputs -> [tasks, n, ...] outputs: all tasks as one
        batch (`running`), or each task as its own batch (`transductive`)."""
        if self.running_stats:
            return module(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        return map_tasks(module, x)

    def embed_episode(self, module: nn.Module, support_x: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
        """(support, query) embeddings for training. `running`: support and query images in one
        batch, as prototypical-networks' loss does (protonets/models/few_shot.py, lines 39-42);
        `transductive`: support and query passes apart, as at meta-test."""
        if not self.running_stats:
            return self.embed(module, support_x), self.embed(module, query_x)
        both = self.embed(module, torch.cat([support_x, query_x], 1))
        return both[:, : support_x.shape[1]], both[:, support_x.shape[1] :]
