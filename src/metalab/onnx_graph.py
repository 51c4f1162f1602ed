"""The graphs metalab-export writes (the command: metalab/export.py; docs/export.md).

- `EpisodeGraph`: a metric learner's whole episode, (support, support_onehot, query) -> logits,
  through the learner's own `adapt_one_hot` and `predict`: the same code as `adapt`, which only
  turns the labels into the one-hot matrix first (algorithms/metric.py).
- `AdaptedGraph`: any learner adapted to one support set in PyTorch, query -> logits, its
  `predict` with the adapted state (weights, prototypes, a memory) as constants of the graph.

Both are traced by `torch.export` with the image counts (and ways) as free dimensions, turned
into ONNX by torch.onnx's exporter from that program (`dynamo=True`), checked with onnxruntime
against eager PyTorch on two sets of sizes, and only then written. torch.export, called here
directly, refuses a graph in which the code fixed a free size (vmap's batching rules did, see
inner_loop.map_tasks); torch.onnx.export given the module would instead fall back quietly to a
graph that accepts the traced sizes only, and the TorchScript exporter (deprecated since torch
2.9) runs the code once and keeps any size it read in Python as a constant (a warning at most).
"""

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from metalab import __version__
from metalab.algorithms.base import evaluation_mode
from metalab.algorithms.metric import MetricLearner
from metalab.api import Learner
from metalab.data.image_cache import MODES
from metalab.errors import ConfigError
from metalab.files import write_atomic
from metalab.pretrained import is_named

# The written graph's outputs must match eager PyTorch's to this, relative to the largest output
# (float32 kernels that sum in another order differ by far less).
TOLERANCE = 1e-4
# (support images, ways, queries) of the episodes the graph is traced and then checked with. All
# above 1 and different, so torch.export takes none of them for a constant or for another.
TRACED_EPISODE, CHECKED_EPISODE = (6, 3, 4), (10, 5, 7)
CHECKED_QUERIES = 3


class EpisodeGraph(nn.Module):
    """support [S, C, H, W], support_onehot [S, N], query [Q, C, H, W] -> logits [Q, N]: one task
    through the learner's `adapt_one_hot` and `predict`."""

    def __init__(self, model: MetricLearner):
        super().__init__()
        self.model = model

    def forward(self, support: Tensor, support_onehot: Tensor, query: Tensor) -> Tensor:
        state = self.model.adapt_one_hot(support.unsqueeze(0), support_onehot.unsqueeze(0))
        return self.model.predict(state, query.unsqueeze(0))[0]


class AdaptedGraph(nn.Module):
    """query [Q, C, H, W] -> logits [Q, N]: the learner's `predict` with one task's adapted state."""

    def __init__(self, model: nn.Module, state):
        super().__init__()
        self.model = model
        leaves, self.spec = tree_flatten(state)
        self.tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
        # The state's tensors as buffers, the graph's constants; others (the LSTM baseline's None
        # memory) stay as they are. Copies: some adapted tensors are views of the model's own
        # parameters (MAML's unadapted normalization), which the exporter cannot take twice.
        self.leaves = [None if i in self.tensors else leaf for i, leaf in enumerate(leaves)]
        for i in self.tensors:
            self.register_buffer(f"state_{i}", leaves[i].detach().clone())

    def forward(self, query: Tensor) -> Tensor:
        leaves = list(self.leaves)
        for i in self.tensors:
            leaves[i] = getattr(self, f"state_{i}")
        return self.model.predict(tree_unflatten(leaves, self.spec), query.unsqueeze(0))[0]


def adapts_from_one_hot(model) -> bool:
    """Whether the learner's `adapt` is its `adapt_one_hot` on the labels' one-hot matrix: then the
    episode graph computes exactly what `adapt` and `predict` do."""
    cls = type(model)
    return (
        isinstance(model, MetricLearner)
        and cls.adapt is MetricLearner.adapt
        and cls.adapt_one_hot is not MetricLearner.adapt_one_hot
    )


def check_episode_export(learner: Learner) -> None:
    """Refuse, naming the reason and the way out, a learner whose adaptation does not trace."""
    model, name = learner.model, learner.algorithm
    adapted = "give support=<folder of class folders> to export it adapted to those classes (a graph query -> logits)"
    if getattr(model, "fce", False):
        raise ConfigError(
            f"algorithm={name} with algorithm.fce=true reads the support set with an LSTM, whose steps "
            f"torch.export unrolls to the traced support size, so its episode graph would take that size "
            f"only; {adapted}"
        )
    if model.reads_sequences:
        raise ConfigError(
            f"algorithm={name} reads the support set as a sequence, one recurrent step per example, which "
            f"torch.export unrolls to the traced length; {adapted}"
        )
    if not adapts_from_one_hot(model):
        raise ConfigError(
            f"algorithm={name} adapts by gradient steps on the support set (torch.autograd.grad), which an "
            f"ONNX graph cannot express; {adapted}"
        )


def episode(shape: Sequence[int], sizes: tuple[int, int, int], seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Random model-ready (support, support_onehot, query) of `sizes` (support, ways, queries)."""
    support, ways, queries = sizes
    generator = torch.Generator().manual_seed(seed)
    onehot = nn.functional.one_hot(torch.arange(support) % ways, ways).float()
    return torch.rand(support, *shape, generator=generator), onehot, torch.rand(queries, *shape, generator=generator)


def transform_metadata(learner: Learner) -> dict[str, str]:
    """How a raw image becomes the model's input (api.ImageTransform), as metadata entries."""
    transform = learner.transform
    channels, size, invert = transform.channels, transform.image_size, transform.invert
    mode = MODES[channels]
    steps = (
        f"open the image with PIL and convert it to mode {mode} ({'greyscale' if channels == 1 else 'RGB'}), "
        f"resize it to {size}x{size} with the Lanczos filter (Image.Resampling.LANCZOS), take its uint8 values"
        f"{', invert them (255 - value)' if invert else ''}, divide by 255 to float32 in [0, 1] and lay them out "
        f"as [C, H, W] = {list(transform.input_shape)}; stack images along a first, batch axis"
    )
    return {
        "input_shape": json.dumps(list(transform.input_shape)),
        "layout": "NCHW",
        "channels": str(channels),
        "image_mode": mode,
        "image_size": str(size),
        "resize_filter": "lanczos",
        "invert": json.dumps(invert),
        "value_range": "[0, 1]",
        "preprocess": steps[0].upper() + steps[1:] + ".",
    }


def graph_metadata(learner: Learner, kind: str, labels: list | None, checkpoint_sha256: str) -> dict[str, str]:
    checkpoint = learner.checkpoint_path
    batch = (
        "each call's own: BatchNorm normalizes with the statistics of the images passed together, so a "
        "query's logits depend on the other queries of the call (pass a mix of the classes, as in evaluation; "
        "or the support images followed by one query, keeping the last row: metalab's independent=True)"
        if learner.transductive
        else "running: a query's logits depend on the support set and itself only"
    )
    inputs = (
        "support [S, C, H, W], support_onehot [S, N] (row i: the one-hot class of support image i), "
        "query [Q, C, H, W], all float32"
        if kind == "episode"
        else "query [Q, C, H, W] float32"
    )
    metadata = {
        "metalab_version": __version__,
        "learner": learner.algorithm,
        "graph": kind,
        "checkpoint": checkpoint if is_named(checkpoint) else Path(checkpoint).name,
        "checkpoint_sha256": checkpoint_sha256,
        "inputs": inputs,
        "outputs": (
            "logits [Q, N]: the learner's outputs, column k for class k; argmax is the predicted class, "
            "softmax the probabilities metalab's predict_proba gives"
        ),
        "batch_statistics": batch,
        **transform_metadata(learner),
    }
    if labels is not None:
        metadata["labels"] = json.dumps([str(label) for label in labels])
    return metadata


def trace(graph: nn.Module, example: tuple, dynamic: dict, name: str):
    """torch.export's program of `graph` with the `dynamic` dimensions left free."""
    try:
        return torch.export.export(graph, example, dynamic_shapes=dynamic, strict=False)
    except Exception as error:  # the reason's first line: the refusal stays one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fix = "report it as a bug"
        if not isinstance(graph, AdaptedGraph):
            fix = f"give support=<folder of class folders> to export it adapted to one support set, or {fix}"
        raise ConfigError(f"algorithm={name} does not trace with free image counts ({reason}); {fix}") from None


def onnx_bytes(program, input_names: list[str], dynamic: dict, metadata: dict[str, str]) -> bytes:
    """The program as an ONNX model, its free dimensions named as in `dynamic` and `metadata` in its
    metadata_props, serialized."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    try:
        with warnings.catch_warnings():  # the exporter's notes on torch's own deprecations, not the user's concern
            warnings.simplefilter("ignore")
            exporter_log.setLevel(logging.ERROR)  # notes on torchvision's operators, absent and unused here
            onnx_program = torch.onnx.export(
                program, dynamo=True, input_names=input_names, output_names=["logits"], optimize=True, verbose=False
            )
    finally:
        exporter_log.setLevel(level)
    inputs = onnx_program.model.graph.inputs
    onnx_program.rename_axes(
        {
            inputs[input_names.index(name)].shape[axis]: dim.__name__
            for name, axes in dynamic.items()
            for axis, dim in axes.items()
        }
    )
    model = onnx_program.model_proto
    model.doc_string = metadata["preprocess"]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


def largest_difference(data: bytes, graph: nn.Module, inputs: list[tuple], names: list[str]) -> float:
    """The largest |onnxruntime - PyTorch| over `inputs`, relative to the largest output (at least 1)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    worst = 0.0
    for example in inputs:
        with evaluation_mode():
            expected = graph(*example).numpy()
        try:
            got = session.run(["logits"], {name: t.numpy() for name, t in zip(names, example)})[0]
        except Exception:  # onnxruntime refuses the sizes (a graph fixed to other ones): no match
            return float("inf")
        if got.shape != expected.shape:
            return float("inf")
        worst = max(worst, float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max()))))
    return worst


def export_learner(
    learner: Learner, path, classes: dict[str, list] | None = None, checkpoint_sha256: str = ""
) -> tuple[dict[str, str], float]:
    """Write `learner` as ONNX to `path`: its episode graph, or, given `classes` ({name: images} as
    `Learner.adapt` takes them), the graph adapted to them. Returns (the metadata, the largest
    relative difference onnxruntime showed against PyTorch)."""
    model, shape = learner.model.eval(), learner.transform.input_shape
    free = torch.export.Dim("queries", min=1)
    if classes is None:
        check_episode_export(learner)
        graph, kind, labels = EpisodeGraph(model), "episode", None
        names = ["support", "support_onehot", "query"]
        support = torch.export.Dim("support", min=1)
        dynamic = {"support": {0: support}, "support_onehot": {0: support, 1: torch.export.Dim("ways", min=1)}}
        dynamic["query"] = {0: free}
        example, checked = episode(shape, TRACED_EPISODE, 0), episode(shape, CHECKED_EPISODE, 1)
    else:
        task = learner.adapt(classes)
        graph, kind, labels = AdaptedGraph(model, task.state), "adapted", list(task.labels)
        names, dynamic = ["query"], {"query": {0: free}}
        example = (task.support_x,)
        checked = (torch.rand(CHECKED_QUERIES, *shape, generator=torch.Generator().manual_seed(1)),)
    metadata = graph_metadata(learner, kind, labels, checkpoint_sha256)
    with evaluation_mode():
        program = trace(graph.eval(), example, dynamic, learner.algorithm)
    data = onnx_bytes(program, names, dynamic, metadata)
    difference = largest_difference(data, graph, [example, checked], names)
    if not difference <= TOLERANCE:
        raise ConfigError(
            f"algorithm={learner.algorithm}: the ONNX graph's outputs differ from PyTorch's by {difference:.2g} "
            f"(relative; more than {TOLERANCE}), so {path} was not written; report it as a bug"
        )
    write_atomic(path, data)
    return metadata, difference
