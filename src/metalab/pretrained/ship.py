"""`ship`: copy the loadable part of a finished run's checkpoint into the package, as
`pretrained:<name>` (`python -m metalab.pretrained`, see metalab/pretrained/__init__.py)."""

import argparse
import io
import json
from pathlib import Path

import torch

from metalab import pretrained
from metalab.checkpoint import MARKER, read_checkpoint
from metalab.errors import ConfigError
from metalab.files import write_atomic

# What a shipped checkpoint keeps: what read_checkpoint, load_learner and metalab-eval use.
KEPT = ("state_dict", "hyper_parameters", "pytorch-lightning_version", "epoch", "global_step")


def ship(
    name: str, checkpoint: Path, results: str, licence: str, metric: str | None = None, value: float | None = None
) -> Path:
    """Copy the loadable part of a metalab checkpoint into the package as `pretrained:<name>`."""
    if not name or any(c in name for c in "/\\:") or name.startswith("."):
        raise ConfigError(f"name={name!r} is not a valid checkpoint name; use letters, digits, '-' and '_'")
    saved = read_checkpoint(checkpoint)  # refused unless a safe, genuine metalab checkpoint
    slim = {key: saved[key] for key in (*KEPT, MARKER) if key in saved}
    buffer = io.BytesIO()
    torch.save(slim, buffer)
    folder = pretrained.registry_dir()
    file = folder / f"{name}.ckpt"
    write_atomic(file, buffer.getbuffer())
    index = {
        "checkpoints": {
            **pretrained.entries(),
            name: {"file": file.name, "results": results, "metric": metric, "value": value, "data_licence": licence},
        }
    }
    write_atomic(folder / pretrained.INDEX, json.dumps(index, indent=1, sort_keys=True) + "\n")
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
    print(f"{pretrained.PREFIX}{args.name}: {file} ({file.stat().st_size / 1e6:.2f} MB)")
