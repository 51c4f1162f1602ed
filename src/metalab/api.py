"""Few-shot learning for applications: adapt a meta-trained checkpoint to your own classes.

    import metalab
    learner = metalab.load_learner("last.ckpt")                     # any metalab checkpoint
    task = learner.adapt({"cat": ["c1.png", "c2.png"], "dog": ["d1.png", "d2.png"]})
    for p in task.predict(["x.png", "y.png"]):                      # adapt once, predict many times
        print(p.label, p.probability, p.probabilities)

Adapting and predicting call the learner's own `adapt(support_x, support_y)` and
`predict(state, query_x)` (algorithms/base.py) on a single task, exactly as meta-test
evaluation does: inner-loop steps for the gradient-based learners, prototypes or attention
for the metric learners, a support sequence for the memory learners. Images are brought to
the model's input by the transform it was trained with (data/image_cache.py: mode,
size and resampling, layout, ink polarity), whose settings come from the checkpoint.

Inputs: a file path or a PIL image is a raw image and goes through that transform; a
numpy array is a raw image too (PIL's `fromarray`); a torch tensor is taken as already
model-ready: float [C, H, W] in [0, 1] of the checkpoint's input shape, as the episode
tensors are (`learner.transform(item)` gives one).

The metric learners' BatchNorm meta-tests with running statistics (eval mode, as
`load_learner` sets it; algorithms/metric.py), so an item's output does not depend on the
others predicted with it. The MAML family's conv4 BatchNorm uses the statistics of the batch
it is given (no running averages), so there a query's output depends on the other items
predicted in the same pass (`Learner.transductive` says which). `predict`
by default passes all given items together, as meta-test evaluation passes an episode's
queries (best when the items are a mix of the classes, as there); `batch_size=k` splits
them into passes of k items. `independent=True` predicts each item in its own pass
beside the support examples: its prediction then depends only on the support set and
itself, with statistics of a mixed set as in evaluation (an item alone, `batch_size=1`,
gets statistics of one image and far lower accuracy).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from metalab.algorithms.base import MetaLearner, evaluation_mode
from metalab.checkpoint import RUN_GROUPS, read_checkpoint
from metalab.data.image_cache import MODES, decode_image, image_to_array
from metalab.errors import ConfigError, DataError, check_positive

Item = Any  # str | Path | PIL.Image.Image | np.ndarray | Tensor


class Prediction(NamedTuple):
    """One item's prediction: the most probable label, its probability, and every label's."""

    label: Hashable
    probability: float
    probabilities: dict


class ImageTransform:
    """The checkpoint's training transform for one raw image -> float [C, H, W] in [0, 1].

    The very function that filled the training image cache (`image_to_array`), with the
    size and channels of the model's input and the dataset's ink polarity (`invert`).
    """

    def __init__(self, input_shape: Sequence[int], invert: bool, resample: str = "lanczos"):
        self.channels, self.image_size = int(input_shape[0]), int(input_shape[-1])
        self.input_shape = tuple(int(s) for s in input_shape)
        self.invert, self.resample = bool(invert), resample

    def __call__(self, item: Item, name: str | None = None) -> Tensor:
        name = name or _describe(item)
        if isinstance(item, Tensor):
            return self._model_ready(item, name)
        if isinstance(item, (str, Path)):
            path = Path(item).expanduser()
            if not path.is_file():
                raise DataError(f"image {name} does not exist or is not a file; give the path of an image file")
            array = decode_image(path, str(item), self.image_size, self.channels, self.invert, self.resample)
        elif isinstance(item, Image.Image):
            array = self._convert(item, name)
        elif isinstance(item, np.ndarray):
            try:
                image = Image.fromarray(item)
            except (TypeError, ValueError) as error:
                raise DataError(
                    f"{name} (a numpy array of shape {item.shape}, {item.dtype}) is not an image "
                    f"({error}); give uint8 [H, W] or [H, W, 3] arrays"
                ) from None
            array = self._convert(image, name)
        else:
            raise DataError(
                f"{name} is a {type(item).__name__}; give an image file path, a PIL image, "
                f"a numpy image array or a model-ready tensor of shape {list(self.input_shape)}"
            )
        return torch.from_numpy(np.ascontiguousarray(array)).float() / 255  # as the episode sampler scales

    def _convert(self, image: Image.Image, name: str) -> np.ndarray:
        try:
            return image_to_array(image, self.image_size, self.channels, self.invert, self.resample)
        except (OSError, ValueError) as error:
            raise DataError(f"cannot convert image {name}: {error}") from None

    def _model_ready(self, tensor: Tensor, name: str) -> Tensor:
        if tuple(tensor.shape) != self.input_shape or not tensor.is_floating_point():
            raise DataError(
                f"{name} is a tensor of shape {list(tensor.shape)} ({tensor.dtype}); tensors are taken as "
                f"model-ready input, float of shape {list(self.input_shape)} in [0, 1] with the training ink "
                "polarity; pass the raw image as a file path, PIL image or numpy array to have it transformed"
            )
        return tensor.detach().float().cpu()

    def __repr__(self) -> str:
        mode = MODES.get(self.channels, self.channels)
        return f"ImageTransform(mode={mode}, size={self.image_size}, invert={self.invert}, resample={self.resample})"


class Learner:
    """A meta-trained learner ready to adapt to new classes (`load_learner` gives one)."""

    def __init__(self, model, transform: ImageTransform, checkpoint_path: str):
        self.model = model
        self.transform = transform
        self.checkpoint_path = checkpoint_path
        self.algorithm = model.algorithm_name
        self.training_ways = model.ways
        # True when some BatchNorm normalizes with the statistics of each forward pass (the
        # MAML family's conv4); the metric learners' keep running statistics.
        self.transductive = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats for m in model.modules()
        )
        # The gradient learners run their network through torch.func.functional_call, which puts
        # the fast weights into the module itself for the length of each call: two threads in one
        # model at once see each other's weights (measured: a MAML learner predicting from 4
        # threads answered 6 of 200 wrong and was left holding a vmapped tensor). Every call
        # into the model takes this lock; decoding and checking the images do not.
        self._model_lock = threading.Lock()

    @contextmanager
    def using_model(self) -> Iterator[None]:
        """The model to this thread alone, in meta-test's evaluation mode: around every call of
        the model's `adapt` and `predict`, so one Learner can serve many threads."""
        with self._model_lock, evaluation_mode():
            yield

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def adapt(self, support, labels: Sequence[Hashable] | None = None) -> AdaptedTask:
        """Adapt to labelled examples; returns the task to predict with.

        `support` is {label: [items]}, or a sequence of (item, label) pairs, or a sequence
        of items with `labels` beside it. Labels may be any hashable values (class names,
        ids); the order in which labels first appear is the order of `task.labels`.
        """
        items, item_labels = _pairs(support, labels)
        classes = list(dict.fromkeys(item_labels))
        if self.model.reads_sequences:
            # Sequence learners were meta-trained on shuffled sequences; a support set grouped by
            # class reads worse (MANN: 52.8% vs 62.1% on Omniglot queries). A fixed seed keeps
            # adaptation reproducible.
            order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
            items, item_labels = [items[i] for i in order], [item_labels[i] for i in order]
        self._check_classes(classes)
        index = {label: i for i, label in enumerate(classes)}
        support_x = self.prepare_inputs(items, "support example")  # every image decoded and checked before any work
        support_y = torch.tensor([index[label] for label in item_labels], dtype=torch.long)
        with self.using_model():  # as meta-test: no meta-graph, an inner loop turns gradients on itself
            state = self.model.adapt(support_x.unsqueeze(0).to(self.device), support_y.unsqueeze(0).to(self.device))
        # The task is kept for many predictions: let go of any graph an inner loop left on the state.
        state = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, state)
        return AdaptedTask(self, state, tuple(classes), support_x)

    def _check_classes(self, classes: list) -> None:
        if len(classes) < 2:
            found = f"only the label {classes[0]!r}" if classes else "no examples"
            raise DataError(f"the support set has {found}; give labelled examples of at least 2 classes")
        if self.model.fixed_ways and len(classes) != self.training_ways:
            raise ConfigError(
                f"algorithm={self.algorithm} has one output per training way, so it adapts to exactly "
                f"ways={self.training_ways} classes, but the support set has {len(classes)} "
                f"({', '.join(map(repr, classes))}); give {self.training_ways} classes, use a checkpoint "
                f"meta-trained with ways={len(classes)}, or a learner without a fixed head such as protonet"
            )

    def prepare_inputs(self, items: Sequence[Item], role: str) -> Tensor:
        """[items, *input_shape]: images (paths, arrays, tensors) decoded, transformed and checked
        as the learner's training data was; `role` names them in errors ("support example 3")."""
        if isinstance(items, Tensor):
            items = list(items)
        tensors = [self.transform(item, _describe(item, f"{role} {i}")) for i, item in enumerate(items)]
        return torch.stack(tensors)

    def __repr__(self) -> str:
        return (
            f"Learner({self.algorithm}, input={list(self.transform.input_shape)}, "
            f"training_ways={self.training_ways}, {self.transform}, device={self.device})"
        )


class AdaptedTask:
    """A learner adapted to one support set: predict as often as needed, no re-adaptation."""

    def __init__(self, learner: Learner, state, labels: tuple, support_x: Tensor):
        self.learner, self.state, self.labels = learner, state, labels
        self.support_x = support_x  # model-ready support images, for independent predictions

    def predict_logits(self, items, batch_size: int | None = None, independent: bool = False) -> Tensor:
        """[items, labels] raw outputs of the learner's `predict`, columns in `self.labels` order.

        Default: all items in one pass, as meta-test evaluation passes an episode's queries.
        `batch_size=k`: passes of k items. `independent=True`: each item in its own pass
        beside the support examples, its output then depends on the support set and itself only.
        """
        batch = self._as_batch(items)
        if batch_size is not None:
            check_positive("batch_size", batch_size, 32, otherwise="None to predict all items in one pass")
        if independent and batch_size is not None:
            raise ConfigError(
                f"batch_size={batch_size} and independent=True both given; independent "
                "predicts every item in its own pass, so leave batch_size out"
            )
        query = self.learner.prepare_inputs(batch, "query item")
        if independent:
            return self._predict_independent(query)
        step = batch_size or len(query)
        chunks = [query[start : start + step] for start in range(0, len(query), step)]
        self._warn_if_unmixed(min(len(chunk) for chunk in chunks))
        with self.learner.using_model():
            return torch.cat([self._predict_tasks(self.state, chunk.unsqueeze(0))[0] for chunk in chunks])

    def _predict_tasks(self, state, query_x: Tensor) -> Tensor:
        return self.learner.model.predict(state, query_x.to(self.learner.device)).float().cpu()

    def _predict_independent(self, query: Tensor, group: int = 64) -> Tensor:
        """Each item in a pass of [support examples, item]: normalization statistics as in a
        mixed episode, none from the other items; the item's row is kept. (A model without
        batch statistics gets each item alone.)

        Up to `group` such passes run at once as separate tasks (the learners batch tasks
        with their own statistics each) when every tensor of the adapted state has the
        leading task dimension of the interface; otherwise one pass at a time.
        """
        # Without batch-statistics layers an item alone is already independent of the others.
        context = self.support_x if self.learner.transductive else self.support_x[:0]
        leaves = [t for t in tree_flatten(self.state)[0] if isinstance(t, Tensor)]
        if not leaves or any(t.dim() == 0 or t.shape[0] != 1 for t in leaves):
            group = 1
        outputs = []
        with self.learner.using_model():
            for start in range(0, len(query), group):
                items = query[start : start + group]
                passes = torch.cat([context.expand(len(items), *context.shape), items[:, None]], 1)
                state = self.state if len(items) == 1 else _repeat_task(self.state, len(items))
                outputs.append(self._predict_tasks(state, passes)[:, -1])
        return torch.cat(outputs)

    def predict_proba(self, items, batch_size: int | None = None, independent: bool = False) -> Tensor:
        """[items, labels] probabilities (softmax of the outputs), columns in `self.labels` order."""
        return self.predict_logits(items, batch_size, independent).softmax(-1)

    def predict(self, items, batch_size: int | None = None, independent: bool = False):
        """A Prediction per item (a single item gives a single Prediction).

        Passes as in `predict_logits`; see the module docstring on batch statistics.
        """
        single = self._is_single(items)
        proba = self.predict_proba([items] if single else items, batch_size, independent)
        best = proba.argmax(-1).tolist()
        predictions = [
            Prediction(self.labels[k], float(row[k]), dict(zip(self.labels, row.tolist())))
            for k, row in zip(best, proba)
        ]
        return predictions[0] if single else predictions

    def _warn_if_unmixed(self, smallest_pass: int) -> None:
        if self.learner.transductive and smallest_pass < len(self.labels):
            warnings.warn(
                f"predicting in a pass of {smallest_pass} item(s), fewer than the {len(self.labels)} classes, "
                "through BatchNorm that normalizes with each pass's statistics: predictions are then much "
                "less accurate than in evaluation; pass independent=True to predict each item beside the "
                "support examples",
                UserWarning,
                stacklevel=4,
            )

    def _is_single(self, items) -> bool:
        if isinstance(items, Tensor):
            return items.dim() == len(self.learner.transform.input_shape)
        return isinstance(items, (str, Path, Image.Image, np.ndarray))

    def _as_batch(self, items) -> Sequence:
        if self._is_single(items):
            return [items]
        if isinstance(items, Tensor):
            return items
        items = list(items)
        if not items:
            raise DataError("no query items given; pass at least one image to predict")
        return items

    def __repr__(self) -> str:
        return f"AdaptedTask({self.learner.algorithm}, labels={list(self.labels)})"


def load_learner(path, device: str | torch.device = "cpu") -> Learner:
    """The learner stored in a metalab checkpoint, on `device`, ready to `adapt`.

    Needs no Hydra config directory: the checkpoint holds the resolved run config.
    """
    device = _device(device)
    checkpoint = read_checkpoint(path, groups=RUN_GROUPS)
    hyper = checkpoint["hyper_parameters"]
    config, input_shape, task_type = hyper["config"], list(hyper.get("input_shape", [])), hyper.get("task_type")
    if task_type != "classification" or len(input_shape) != 3:
        raise ConfigError(
            f"ckpt_path={path} is a {task_type} model on inputs of shape {input_shape} "
            f"(dataset={config.get('dataset', {}).get('name')}); load_learner serves image "
            "classification checkpoints"
        )
    model = MetaLearner.from_checkpoint(path, checkpoint)
    model.eval().to(device)  # as Lightning sets it for meta-test
    dataset = config["dataset"]
    transform = ImageTransform(input_shape, bool(dataset.get("invert", False)), dataset.get("resample", "lanczos"))
    return Learner(model, transform, str(path))


# ---------------------------------------------------------------------- helpers
def _repeat_task(state, tasks: int):
    """The adapted state of one task, seen as `tasks` identical tasks (no copy)."""
    return tree_map(lambda t: t.expand(tasks, *t.shape[1:]) if isinstance(t, Tensor) else t, state)


def _device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but no CUDA GPU is visible here; use device=cpu")
    return device


def _describe(item, role: str | None = None) -> str:
    if isinstance(item, (str, Path)):
        return str(item)
    kind = type(item).__name__
    return f"{role} ({kind})" if role else kind


def _pairs(support, labels) -> tuple[list, list]:
    """(items, labels) from any of the accepted support forms, with every label checked."""
    if isinstance(support, Mapping):
        if labels is not None:
            raise DataError(
                "labels= is given but the support set is already a {label: [items]} mapping; give one or the other"
            )
        items, item_labels = [], []
        for label, examples in support.items():
            examples = [examples] if isinstance(examples, (str, Path, Image.Image)) else list(examples)
            if not examples:
                raise DataError(f"class {label!r} has no examples; give at least one, or leave the class out")
            items += examples
            item_labels += [label] * len(examples)
    elif labels is None:
        pairs = list(support)
        bad = next((i for i, p in enumerate(pairs) if not (isinstance(p, tuple) and len(p) == 2)), None)
        if bad is not None:
            raise DataError(
                f"support example {bad} is not an (item, label) pair and no labels= were given; "
                "give {label: [items]}, [(item, label), ...], or items with labels=[...]"
            )
        items, item_labels = [p[0] for p in pairs], [p[1] for p in pairs]
    else:
        items = list(support)
        item_labels = labels.tolist() if isinstance(labels, (Tensor, np.ndarray)) else list(labels)
        if len(item_labels) != len(items):
            raise DataError(f"{len(items)} support examples but {len(item_labels)} labels; give one label per example")
    for i, label in enumerate(item_labels):
        if label is None or (isinstance(label, float) and math.isnan(label)):
            raise DataError(
                f"support example {i} ({_describe(items[i], 'item')}) has no label; give every example a label"
            )
        if not isinstance(label, Hashable):
            raise DataError(
                f"support example {i} has the label {label!r}, a {type(label).__name__}, which "
                "cannot name a class; use a hashable label such as a string or an int"
            )
    return items, item_labels
