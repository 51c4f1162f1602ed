"""Image folders: class folders of images, split into train/val/test one of three ways.

1. `split_dir` set: it holds train.csv, val.csv, test.csv (`filename,label`); each image is at
   `root/<filename>` or `root/<label>/<filename>` (miniImageNet is this, with the Ravi splits).
2. `root/train`, `root/val`, `root/test` exist: each is a folder of class folders (a missing one is empty).
3. Otherwise the class folders of `root` are shuffled with `split_seed` and cut by `split_fractions`.
"""

import csv
import random
from collections.abc import Mapping
from itertools import accumulate
from pathlib import Path

from metalab.data.episodes import EpisodeDataset, ImageClassSource
from metalab.data.image_cache import MODES, load_or_build
from metalab.errors import ConfigError, DataError, check_positive

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}  # matched case-insensitively

# {split: ([(class name, group key), ...], hint shown when the split turns out empty)}
Splits = dict[str, tuple[list[tuple[str, str]], str]]


class ImageFolder(EpisodeDataset):
    """Any folder of class folders of images (conf/dataset/image_folder.yaml), split as the module
    docstring says."""

    name = "image_folder"  # in the cache's file names and in messages

    def __init__(
        self,
        *,
        image_size: int,
        channels: int,
        invert: bool,
        split_fractions: Mapping[str, float] | None,
        split_seed: int,
        # None: not given. The yaml's values (`???`, `${paths.data_dir}/...`) exist only once Hydra
        # composes a run, so a config written by hand may lack them.
        root: str | None = None,
        split_dir: str | None = None,
    ):
        """`root`: the folder of class folders; images resized to `image_size` pixels square with
        `channels` 1 (grayscale) or 3 (RGB), inverted if `invert`; the splits from `split_dir`'s
        csv files, else `root`'s train/val/test folders, else `split_fractions` of the classes
        shuffled with `split_seed`."""
        check_positive("dataset.image_size", image_size, 84)
        if channels not in MODES:
            raise ConfigError(f"dataset.channels={channels!r} is invalid; use 1 (grayscale) or 3 (RGB)")
        self.root, self.image_size, self.channels, self.invert = root, image_size, channels, invert
        self.split_dir, self.split_fractions, self.split_seed = split_dir, split_fractions, split_seed

    def locations(self, data_dir: Path) -> tuple[Path, Path | None]:
        """(the images' root, the split csv folder or None)."""
        if self.root is None:
            raise ConfigError("dataset.root is not set; point it at a directory of class directories of images")
        return Path(self.root).expanduser(), Path(self.split_dir).expanduser() if self.split_dir else None

    def sources(self, data_dir: Path, cache_dir: Path) -> dict[str, ImageClassSource]:
        root, split_dir = self.locations(Path(data_dir))
        if not root.is_dir():
            raise DataError(
                f"image folder root {root} does not exist; "
                "set dataset.root to a directory of class directories of images"
            )
        if split_dir is not None:
            groups, splits = _splits_from_csv(root, split_dir)
        elif any((root / split).is_dir() for split in SPLITS):
            groups, splits = _splits_from_folders(root)
        else:
            groups, splits = _splits_from_fractions(root, self.split_fractions, self.split_seed)

        files = [path for paths in groups.values() for path in paths]
        if not files:
            raise DataError(f"no images found under {root} (looked for files ending in {sorted(IMAGE_SUFFIXES)})")
        fingerprint = {"dataset": self.name, "files": [[p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
        refs = {key: [(None, str(path)) for path in paths] for key, paths in groups.items()}
        array_path, index = load_or_build(
            Path(cache_dir), self.name, fingerprint, refs, self.image_size, self.channels, bool(self.invert)
        )
        return {
            split: ImageClassSource(
                array_path,
                [name for name, _ in classes],
                [index[key][0] for _, key in classes],
                [index[key][1] for _, key in classes],
                dataset=self.name,
                split=split,
                empty_hint=hint,
            )
            for split, (classes, hint) in splits.items()
        }


class MiniImageNet(ImageFolder):
    """miniImageNet (conf/dataset/mini_imagenet.yaml): an image folder with the Ravi & Larochelle
    split CSVs, by default under <data_dir>/mini_imagenet/ (`root` and `split_dir` null)."""

    name = "mini_imagenet"

    def locations(self, data_dir: Path) -> tuple[Path, Path | None]:
        root = Path(self.root or data_dir / "mini_imagenet" / "images").expanduser()
        split_dir = Path(self.split_dir or data_dir / "mini_imagenet" / "splits" / "ravi").expanduser()
        if not root.is_dir():
            raise DataError(
                f"miniImageNet images not found at {root}; put the miniImageNet images there "
                "(flat, or in class folders) or set dataset.root"
            )
        return root, split_dir


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _splits_from_csv(root: Path, split_dir: Path) -> tuple[dict[str, list[Path]], Splits]:
    groups: dict[str, list[Path]] = {}
    splits: Splits = {}
    for split in SPLITS:
        csv_path = split_dir / f"{split}.csv"
        if not csv_path.is_file():
            raise DataError(
                f"split file {csv_path} not found; dataset.split_dir must hold "
                "train.csv, val.csv and test.csv with the header 'filename,label'"
            )
        by_label: dict[str, list[Path]] = {}
        try:
            rows = csv_path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise DataError(
                f"{csv_path} is not UTF-8 text (byte {error.start}); it should be a CSV with the header "
                "'filename,label': restore the split file"
            ) from None
        reader = csv.DictReader(rows)
        if not {"filename", "label"} <= set(reader.fieldnames or ()):
            raise DataError(f"{csv_path} must start with the header 'filename,label'")
        for row in reader:
            label, filename = row["label"], row["filename"]
            if label is None or filename is None:
                raise DataError(f"{csv_path}:{reader.line_num}: a row needs a filename and a label")
            by_label.setdefault(label, []).append(_locate(root, label, filename, csv_path))
        # Keyed by split too, so a label listed in two CSVs stays two separate classes.
        for label in sorted(by_label):
            groups[f"{split}/{label}"] = sorted(by_label[label])
        splits[split] = ([(label, f"{split}/{label}") for label in sorted(by_label)], f"{csv_path} lists no images")
    return groups, splits


def _locate(root: Path, label: str, filename: str, csv_path: Path) -> Path:
    for candidate in (root / filename, root / label / filename):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"image {filename!r} listed in {csv_path} is at neither {root / filename} nor {root / label / filename}"
    )


def _splits_from_folders(root: Path) -> tuple[dict[str, list[Path]], Splits]:
    groups: dict[str, list[Path]] = {}
    splits: Splits = {}
    for split in SPLITS:
        folder = root / split
        classes = _class_folders(folder) if folder.is_dir() else []
        for class_dir in classes:
            groups[f"{split}/{class_dir.name}"] = _images_in(class_dir)
        splits[split] = ([(d.name, f"{split}/{d.name}") for d in classes], f"add class folders under {folder}")
    return groups, splits


def _splits_from_fractions(root: Path, fractions: Mapping | None, seed: int) -> tuple[dict[str, list[Path]], Splits]:
    fractions = fractions or {}
    unknown = set(fractions) - set(SPLITS)
    values = [fractions.get(split, 0) for split in SPLITS]
    if unknown or any(not isinstance(v, (int, float)) or v < 0 for v in values) or sum(values) <= 0:
        raise ConfigError(
            f"dataset.split_fractions={dict(fractions)} is invalid for {root}; give train, val and "
            "test fractions >= 0 with a positive sum, e.g. {train: 0.64, val: 0.16, test: 0.2}"
        )
    class_dirs = _class_folders(root)
    if not class_dirs:
        raise DataError(f"{root} has no class folders; put each class's images in its own folder under it")
    groups = {d.name: _images_in(d) for d in class_dirs}
    names = [d.name for d in class_dirs]
    random.Random(seed).shuffle(names)
    # Cumulative rounding: every class lands in exactly one split, and a fraction of 0 gets none.
    bounds = [0] + [round(len(names) * c / sum(values)) for c in accumulate(values)]
    bounds[-1] = len(names)
    splits: Splits = {
        split: (
            [(name, name) for name in names[bounds[i] : bounds[i + 1]]],
            f"dataset.split_fractions.{split}={values[i]} gives it none of the {len(names)} classes "
            f"in {root}; raise it",
        )
        for i, split in enumerate(SPLITS)
    }
    return groups, splits
