"""Checkpoints that ship inside the package, by name: `pretrained:<name>` wherever a checkpoint
path is taken (`metalab.load_learner`, `metalab-predict ckpt_path=`, `metalab-eval ckpt_path=`).

    learner = metalab.load_learner("pretrained:protonet-omniglot")

The files lie in this folder, package data of an installed metalab (pyproject.toml), with
`index.json` listing each one: its file, the `results/` entry of the run that trained it, its
meta-test figure, and the licence of the data it was trained on. A named checkpoint is read
as any other (checkpoint.read_checkpoint): `torch.load(weights_only=True)` and only trusted
classes to build, so shipping a file never means unpickling arbitrary objects.

`ship` adds a checkpoint of a finished run to the folder, keeping only what loading needs
(weights, run config, metalab version), not the optimizer state that resuming would need:

    python -m metalab.pretrained protonet-omniglot runs/x/checkpoints/best.ckpt \
        --results results/protonet_omniglot_5w1s.json --licence "Omniglot: MIT"
"""

import argparse
import io
import json
from importlib.resources import files
from pathlib import Path

from metalab.errors import ConfigError
from metalab.files import write_atomic

PREFIX = "pretrained:"
INDEX = "index.json"
# What a shipped checkpoint keeps: what read_checkpoint, load_learner and metalab-eval use.
KEPT = ("state_dict", "hyper_parameters", "pytorch-lightning_version", "epoch", "global_step")


def registry_dir() -> Path:
    """The folder of the shipped checkpoints (inside the installed package)."""
    return Path(str(files(__name__)))


def entries() -> dict[str, dict]:
    """{name: its index entry} of the shipped checkpoints."""
    index = registry_dir() / INDEX
    if not index.is_file():
        return {}
    return json.loads(index.read_text())["checkpoints"]


def is_named(path) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def resolve(path):
    """The file behind `pretrained:<name>`; any other path is returned unchanged."""
    if not is_named(path):
        return path
    name, known = path[len(PREFIX) :], entries()
    if name not in known:
        names = ", ".join(f"{PREFIX}{n}" for n in sorted(known)) or "none in this installation"
        raise ConfigError(f"ckpt_path={path}: no checkpoint named {name!r} ships with metalab; known: {names}")
    file = registry_dir() / known[name]["file"]
    if not file.is_file():
        raise ConfigError(f"ckpt_path={path} is listed in {INDEX} but its file {file} is missing; reinstall metalab")
    return file


def ship(
    name: str, checkpoint: Path, results: str, licence: str, metric: str | None = None, value: float | None = None
) -> Path:
    """Copy the loadable part of a metalab checkpoint into the package as `pretrained:<name>`."""
    import torch

    from metalab.checkpoint import MARKER, read_checkpoint  # here only: checkpoint imports this module

    if not name or any(c in name for c in "/\\:") or name.startswith("."):
        raise ConfigError(f"name={name!r} is not a valid checkpoint name; use letters, digits, '-' and '_'")
    saved = read_checkpoint(checkpoint)  # refused unless a safe, genuine metalab checkpoint
    slim = {key: saved[key] for key in (*KEPT, MARKER) if key in saved}
    buffer = io.BytesIO()
    torch.save(slim, buffer)
    folder = registry_dir()
    file = folder / f"{name}.ckpt"
    write_atomic(file, buffer.getbuffer())
    index = {
        "checkpoints": {
            **entries(),
            name: {"file": file.name, "results": results, "metric": metric, "value": value, "data_licence": licence},
        }
    }
    write_atomic(folder / INDEX, json.dumps(index, indent=1, sort_keys=True) + "\n")
    return file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metalab.pretrained", description=ship.__doc__)
    parser.add_argument("name")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--results", required=True, help="the results/ entry of the run that trained it")
    parser.add_argument("--licence", required=True, help="the licence of the data it was trained on")
    parser.add_argument("--metric", help="its meta-test metric, e.g. test/acc")
    parser.add_argument("--value", type=float, help="that metric's value")
    args = parser.parse_args(argv)
    file = ship(args.name, args.checkpoint, args.results, args.licence, args.metric, args.value)
    print(f"{PREFIX}{args.name}: {file} ({file.stat().st_size / 1e6:.2f} MB)")
