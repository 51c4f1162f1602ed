"""An adapted state (what a learner's `adapt` returns) as flat named tensors plus a JSON layout, and back.

The states are small trees: a tensor (ProtoNet's prototypes), a tuple (Matching Networks'
embeddings and labels), a dict of tensors (the MAML family's fast weights, the baselines'
heads), a NamedTuple with None parts (MANN's controller state). The store keeps the tensors in
a safetensors file and the layout as JSON in its metadata, so a stored task is data only:
reading one builds tensors, containers and plain values, and a NamedTuple only of a class that
metalab's already imported modules define.
"""

from __future__ import annotations

import sys

from torch import Tensor

PLAIN = (type(None), bool, int, float, str)


def flatten_state(state) -> tuple[dict[str, Tensor], dict]:
    """({name: tensor}, layout): every tensor leaf named by its position, contiguous and on the CPU."""
    tensors: dict[str, Tensor] = {}

    def encode(node):
        if isinstance(node, Tensor):
            name = str(len(tensors))
            # A copy of its own: the file format refuses tensors that share memory (views of one weight).
            tensors[name] = node.detach().cpu().contiguous().clone()
            return {"tensor": name}
        if isinstance(node, PLAIN):
            return {"value": node}
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            cls = type(node)
            return {"namedtuple": f"{cls.__module__}:{cls.__qualname__}", "items": [encode(x) for x in node]}
        if isinstance(node, (tuple, list)):
            return {type(node).__name__: [encode(x) for x in node]}
        if isinstance(node, dict) and all(isinstance(k, (str, int)) for k in node):
            return {"dict": [[key, encode(value)] for key, value in node.items()]}
        raise TypeError(f"an adapted state holds a {type(node).__name__}, which a stored task cannot keep")

    return tensors, encode(state)


def unflatten_state(tensors: dict[str, Tensor], layout: dict):
    """The state `flatten_state` took apart; ValueError for a layout it could not have written."""

    def decode(node):
        if not isinstance(node, dict) or len(node) not in (1, 2):
            raise ValueError(f"unknown layout node {node!r}")
        if "tensor" in node:
            if node["tensor"] not in tensors:
                raise ValueError(f"the layout names a tensor {node['tensor']!r} the file lacks")
            return tensors[node["tensor"]]
        if "value" in node:
            if not isinstance(node["value"], PLAIN):
                raise ValueError(f"a plain value is a {type(node['value']).__name__}")
            return node["value"]
        if "namedtuple" in node:
            return namedtuple_class(node["namedtuple"])(*map(decode, node["items"]))
        if "tuple" in node:
            return tuple(map(decode, node["tuple"]))
        if "list" in node:
            return list(map(decode, node["list"]))
        if "dict" in node:
            return {key: decode(value) for key, value in node["dict"]}
        raise ValueError(f"unknown layout node {sorted(node)}")

    return decode(layout)


def namedtuple_class(name: str) -> type:
    """The NamedTuple class `module:qualname`, only from a metalab module already imported (the
    learner's own): a stored file never makes the server import or call anything else."""
    module_name, _, qualname = str(name).partition(":")
    module = sys.modules.get(module_name) if module_name.startswith("metalab.") else None
    found = module
    for part in qualname.split("."):
        found = getattr(found, part, None) if part.isidentifier() else None
    if module is None or not (isinstance(found, type) and issubclass(found, tuple) and hasattr(found, "_fields")):
        raise ValueError(f"{name!r} is not a NamedTuple class of a loaded metalab module")
    return found
