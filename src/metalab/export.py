"""metalab-export: a meta-trained checkpoint as an ONNX graph that runs without Python metalab.

    metalab-export ckpt_path=pretrained:protonet-omniglot format=onnx output=protonet.onnx
    metalab-export ckpt_path=run/checkpoints/last.ckpt format=onnx output=maml.onnx support=my_classes/

  ckpt_path=FILE    a checkpoint written by metalab-train, or pretrained:<name>, one shipped with metalab
  format=onnx       the only format
  output=FILE.onnx  the file to write, in a folder that exists
  support=DIR       one folder per class, named after it, holding that class's example images:
                    export the learner adapted to these classes, a graph query -> logits
  overwrite=true    replace an existing output file (default: refuse)

Without support=, a metric learner (protonet, matchingnet without FCE, relationnet) exports
its whole episode: inputs support [S, C, H, W], support_onehot [S, N] and query [Q, C, H, W],
output logits [Q, N], any S, N and Q. The learners that adapt by gradient steps (the MAML
family, Reptile, the transfer baselines) or read the support set as a sequence (mann, lstm)
cannot trace their adaptation; they export adapted to a support= folder. The graph's metadata
holds how to prepare images (size, channels, ink polarity) and, adapted, the class names.
docs/export.md has the details and an onnxruntime example.

Arguments are key=value pairs read literally (no Hydra), so any file name works.
"""

import hashlib
import importlib.util
import sys
from pathlib import Path

from metalab.errors import ConfigError
from metalab.predict import BOOLEANS, key_values, printable, run_command, support_files
from metalab.pretrained import resolve as resolve_named

KEYS = ("ckpt_path", "format", "output", "support", "overwrite")
REQUIRED = ("ckpt_path", "format", "output")
FORMATS = ("onnx",)
# What torch.onnx's exporter needs (onnx, onnxscript), and what checks the graph it writes (onnxruntime).
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
USAGE = "metalab-export ckpt_path=<file> format=onnx output=<file.onnx> [support=<dir of class dirs>] [overwrite=true]"


def parse(argv: list[str]) -> dict:
    """{key: value} from key=value arguments; every setting checked before any work."""
    args = {"support": None, "overwrite": "false"}
    args.update(key_values(argv, KEYS, REQUIRED, USAGE, {"format": "onnx", "overwrite": "true"}))
    if args["format"] not in FORMATS:
        raise ConfigError(f"format={args['format']} is unknown; the one format is format=onnx")
    if args["overwrite"].lower() not in BOOLEANS:
        raise ConfigError(f"overwrite={args['overwrite']} is invalid; use true or false")
    args["overwrite"] = BOOLEANS[args["overwrite"].lower()]
    args["output"] = check_output(args["output"], args["overwrite"])
    resolve_named(args["ckpt_path"])  # an unknown pretrained:<name> fails before any file is read
    check_packages()
    return args


def check_output(value: str, overwrite: bool) -> Path:
    """The output path: a new .onnx file (or, with overwrite, an existing one) in a folder that exists."""
    path = Path(value).expanduser()
    if path.suffix.lower() != ".onnx":
        raise ConfigError(f"output={value} must end in .onnx")
    if not path.parent.is_dir():
        raise ConfigError(f"output={value}: the folder {path.parent} does not exist; create it or write elsewhere")
    if path.is_dir():
        raise ConfigError(f"output={value} is a folder; give a file name ending in .onnx")
    if path.exists() and not overwrite:
        raise ConfigError(f"output={value} exists; add overwrite=true to replace it, or choose another name")
    return path


def check_packages() -> None:
    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"format=onnx needs {', '.join(missing)}, not installed here; pip install 'metalab[export]'")


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(resolve_named(path), "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export(argv: list[str]) -> dict:
    """Run metalab-export's command line; returns the written graph's metadata."""
    args = parse(argv)
    # Everything the user gave is checked (files listed) before the checkpoint loads.
    classes = support_files(Path(args["support"]).expanduser()) if args["support"] else None
    # Torch and the learners load only for a valid command line (and not for --help).
    from metalab.api import load_learner
    from metalab.onnx_graph import export_learner

    learner = load_learner(args["ckpt_path"])
    metadata, difference = export_learner(
        learner, args["output"], classes, checkpoint_sha256=file_sha256(args["ckpt_path"])
    )
    inputs = "support, support_onehot, query" if metadata["graph"] == "episode" else "query"
    print(
        f"{learner.algorithm}: wrote {printable(str(args['output']))} (ONNX, inputs {inputs} -> logits); "
        f"onnxruntime matches PyTorch to {difference:.1e}",
        file=sys.stderr,
    )
    return metadata


def main(argv: list[str] | None = None) -> None:
    run_command(export, __doc__, argv)


if __name__ == "__main__":
    main()
