"""Checkpoints that ship inside the package, by name: `pretrained:<name>` wherever a checkpoint
path is taken (`metalab.load_learner`, `metalab-predict ckpt_path=`, `metalab-eval ckpt_path=`).

    learner = metalab.load_learner("pretrained:protonet-omniglot")

The files lie in this folder, package data of an installed metalab (pyproject.toml), with
`index.json` listing each one: its file, the `results/` entry of the run that trained it, its
meta-test figure, and the licence of the data it was trained on. A named checkpoint is read
as any other (checkpoint.read_checkpoint): `torch.load(weights_only=True)` and only trusted
classes to build, so shipping a file never means unpickling arbitrary objects.

`ship` (pretrained/ship.py, above the checkpoint reader this module is below) adds a checkpoint
of a finished run to the folder, keeping only what loading needs (weights, run config, metalab
version), not the optimizer state that resuming would need:

    python -m metalab.pretrained protonet-omniglot runs/x/checkpoints/best.ckpt \
        --results results/protonet_omniglot_5w1s.json --licence "Omniglot: MIT"
"""

import json
from importlib.resources import files
from pathlib import Path

from metalab.errors import ConfigError

PREFIX = "pretrained:"
INDEX = "index.json"


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
