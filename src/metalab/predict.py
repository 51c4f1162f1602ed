"""metalab-predict: adapt a meta-trained checkpoint to your labelled images and predict new ones.

    metalab-predict ckpt_path=run/checkpoints/last.ckpt support=my_classes/ query=new_images/
    metalab-predict ckpt_path=... support=my_classes/ query=a.png query=b.png output=predictions.csv

  ckpt_path=FILE    a checkpoint written by metalab-train, or pretrained:<name>, one shipped with metalab
  support=DIR       one folder per class, named after it, holding that class's example images
  query=PATH        an image, or a folder of images (searched recursively); may be repeated
  output=FILE       also write the predictions to FILE.csv or FILE.json
  device=cpu        or cuda, cuda:N
  batch_size=N      predict in passes of N items (default: all items in one pass)
  independent=true  predict each item in its own pass beside the support examples

Images are brought to the model's input (size, channels, ink polarity) by the transform
the checkpoint was trained with. With a conv4 backbone, BatchNorm normalizes over the
items of each pass, so by default a query's prediction depends on the others predicted
with it, as in meta-test evaluation (best when the queries are a mix of the classes).
independent=true makes each prediction depend only on the support set and the item.

Arguments are key=value pairs read literally (no Hydra), so any file name works.
"""

import csv
import io
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from metalab.allocator import keep_freed_memory
from metalab.errors import ConfigError, DataError, MetalabError
from metalab.files import write_atomic
from metalab.pretrained import resolve as resolve_named

KEYS = ("ckpt_path", "support", "query", "output", "device", "batch_size", "independent")
BOOLEANS = {"true": True, "false": False}
REQUIRED = ("ckpt_path", "support", "query")
FORMATS = (".csv", ".json")
USAGE = "metalab-predict ckpt_path=<file> support=<dir of class dirs> query=<dir or file> [output=<file.csv|json>]"


def key_values(argv: list[str], keys: tuple, required: tuple, usage: str, examples: dict, repeated=()) -> dict:
    """{key: value} of key=value arguments (a key in `repeated`: the list of its values): every key one
    of `keys`, every value given, every `required` key present; a message names the argument and the fix."""
    command = usage.split()[0]
    args: dict = {key: [] for key in repeated}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in keys:
            raise ConfigError(
                f"argument {arg!r} is not one of {', '.join(k + '=...' for k in keys)}; see {command} --help"
            )
        if not value:
            raise ConfigError(f"{key}= is empty; give a value, e.g. {key}={examples.get(key, '<path>')}")
        if key in repeated:
            args[key].append(value)
        else:
            args[key] = value
    missing = [key for key in required if not args.get(key)]
    if missing:
        raise ConfigError(f"{', '.join(k + '=' for k in missing)} missing; usage: {usage}")
    return args


def parse(argv: list[str]) -> dict:
    """{key: value} (query: a list) from key=value arguments, every key known and required one given."""
    args = {"device": "cpu", "batch_size": None, "output": None, "independent": "false"}
    args.update(key_values(argv, KEYS, REQUIRED, USAGE, {"batch_size": "5"}, repeated=("query",)))
    if args["batch_size"] is not None:
        value = args["batch_size"]
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(
                f"batch_size={value} is invalid; use a positive integer, or leave it out to "
                "predict all items in one pass"
            )
        args["batch_size"] = int(value)
    if args["independent"].lower() not in BOOLEANS:
        raise ConfigError(f"independent={args['independent']} is invalid; use true or false")
    args["independent"] = BOOLEANS[args["independent"].lower()]
    if args["output"] and Path(args["output"]).suffix.lower() not in FORMATS:
        raise ConfigError(f"output={args['output']} must end in .csv or .json")
    resolve_named(args["ckpt_path"])  # an unknown pretrained:<name> fails before any file is read
    return args


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def support_files(root: Path) -> dict[str, list[Path]]:
    """{class name: image files} from a folder of class folders; refuses anything else in it."""
    if not root.is_dir():
        raise DataError(f"support={root} is not a directory; give a folder holding one folder of images per class")
    classes: dict[str, list[Path]] = {}
    for entry in _visible(root):
        if not entry.is_dir():
            raise DataError(
                f"support={root} holds the file {entry} beside the class folders; move it into "
                "the folder of its class (one folder per class, named after it) or remove it"
            )
        files = _visible(entry)
        nested = [p for p in files if p.is_dir()]
        if nested:
            raise DataError(f"class folder {entry} holds the folder {nested[0]}; a class folder holds only its images")
        if not files:
            raise DataError(
                f"class folder {entry} is empty; put at least one image of class {entry.name!r} in it, or remove it"
            )
        classes[entry.name] = files
    if len(classes) < 2:
        found = f"only the class folder {next(iter(classes))!r}" if classes else "no class folders"
        raise DataError(f"support={root} has {found}; give at least 2 classes, one folder of images each")
    return classes


def query_files(paths: list[str]) -> list[Path]:
    files = []
    for value in paths:
        path = Path(value).expanduser()
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"query={value} is an empty folder; put the images to predict in it")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"query={value} does not exist; give an image file or a folder of images")
    return files


def write(path: Path, rows: list[dict], labels: tuple) -> None:
    """The predictions as CSV or JSON, replacing `path` in one rename (a failure leaves it as it was).

    File and class names are written as the file system holds them: a name that is not valid
    UTF-8 keeps its original bytes in the CSV (surrogateescape) and is \\udcXX-escaped in the JSON.
    """
    if path.suffix.lower() == ".json":
        write_atomic(path, json.dumps(rows, indent=1) + "\n")
        return
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["item", "label", "probability", *(f"p:{label}" for label in labels)])
    for row in rows:
        writer.writerow(
            [
                row["item"],
                row["label"],
                f"{row['probability']:.6f}",
                *(f"{row['probabilities'][label]:.6f}" for label in labels),
            ]
        )
    write_atomic(path, text.getvalue(), errors="surrogateescape")


def printable(name: str) -> str:
    """A file name for the terminal: bytes that are not UTF-8 shown as \\xNN, not a UnicodeEncodeError."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def table(rows: list[dict]) -> str:
    items, labels = [printable(r["item"]) for r in rows], [printable(str(r["label"])) for r in rows]
    width = max(len("item"), *map(len, items))
    label_width = max(len("label"), *map(len, labels))
    lines = [f"{'item':<{width}}  {'label':<{label_width}}  probability"]
    lines += [
        f"{item:<{width}}  {label:<{label_width}}  {r['probability']:.4f}"
        for item, label, r in zip(items, labels, rows)
    ]
    return "\n".join(lines)


def predict(argv: list[str]) -> list[dict]:
    args = parse(argv)
    # Everything the user gave is checked (files listed, checkpoint read, every image decoded)
    # before the model adapts.
    classes = support_files(Path(args["support"]).expanduser())
    queries = query_files(args["query"])
    # Torch and the learners load only for a valid command line (and not for --help).
    from metalab.api import load_learner

    learner = load_learner(args["ckpt_path"], args["device"])
    support = {name: [learner.transform(path) for path in files] for name, files in classes.items()}
    query = [learner.transform(path) for path in queries]

    started = time.perf_counter()
    task = learner.adapt(support)
    adapted = time.perf_counter()
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always", UserWarning)
        predictions = task.predict(query, batch_size=args["batch_size"], independent=args["independent"])
    for note in notes:
        print(f"metalab: note: {note.message}", file=sys.stderr)
    done = time.perf_counter()

    rows = [
        {"item": str(path), "label": p.label, "probability": p.probability, "probabilities": p.probabilities}
        for path, p in zip(queries, predictions)
    ]
    print(table(rows))
    shots = sum(len(files) for files in classes.values())
    print(
        f"\n{learner.algorithm}: adapted to {len(classes)} classes ({shots} examples) in {adapted - started:.3f} s, "
        f"predicted {len(rows)} items in {done - adapted:.3f} s",
        file=sys.stderr,
    )
    if args["output"]:
        write(Path(args["output"]).expanduser(), rows, task.labels)
        print(f"predictions: {printable(args['output'])}", file=sys.stderr)
    return rows


def run_command(run: Callable[[list[str]], object], doc: str, argv: list[str] | None = None) -> None:
    """The main of a key=value command (metalab-predict, metalab-export): `doc` for -h or --help,
    otherwise `run(argv)`, a MetalabError printed as one line and exited with its status."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(doc.strip())
        return
    try:
        run(argv)
    except MetalabError as error:  # the message the other entry points print (runner.report_error)
        print(f"metalab: error: {printable(str(error))}", file=sys.stderr, flush=True)
        sys.exit(error.exit_status)


def main(argv: list[str] | None = None) -> None:
    keep_freed_memory()
    run_command(predict, __doc__, argv)


if __name__ == "__main__":
    main()
