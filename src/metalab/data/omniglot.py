"""Omniglot: 1623 handwritten characters of 50 alphabets, read from the two official zip archives.

Protocols:
- vinyals: class lists from `<data_dir>/omniglot/splits/vinyals/{train,val,test}.txt`; a class is a
  character at a rotation of k*90 degrees, applied at sample time.
- finn, sung: the shuffled character split of Finn et al. (2017) and Sung et al. (2018), from
  `metalab/data/splits/omniglot/finn/{train,val,test}.txt` (made by scripts/make_omniglot_splits.py):
  1,100 / 100 / 423 characters pooled from both archives, every rotation of a character on its
  side, rotations as classes as in vinyals. Sung's code cuts the same shuffle, training on the
  first 1,200 characters (Finn's train and val) and testing on the last 423; `sung` holds out
  Finn's 100 for validation, so a checkpoint is chosen without the test characters (the authors
  chose theirs on them).
- lake: train = the characters of the 30 background alphabets but the last `lake_val_alphabets`
  (by name), val = the characters of those held-out background alphabets, test = the 659
  characters of the 20 evaluation alphabets; unrotated. Validation never sees a test class, so
  the checkpoint validation picks was not selected on the test set.
"""

import hashlib
import json
import logging
import os
import re
import tempfile
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path

from metalab.data.episodes import EpisodeDataset, ImageClassSource
from metalab.data.image_cache import RESAMPLES, ImageRef, load_or_build, write_json_atomic
from metalab.errors import ConfigError, DataError, check_positive

log = logging.getLogger("metalab")

ARCHIVES = ("images_background.zip", "images_evaluation.zip")  # background alphabets first
DOWNLOAD_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{}"
# The MD5 digests published for the official archives (the copies under shared/ are re-zipped,
# so they are checked against their own SHA256SUMS instead).
OFFICIAL_MD5 = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
ROTATIONS = {"rot000": 0, "rot090": 1, "rot180": 2, "rot270": 3}
# The split files of each protocol read from a folder: vinyals ships with the data, the
# others with metalab (both papers cut one shuffle, so sung reads finn's files).
SPLIT_FOLDERS = {"finn": "finn", "sung": "finn"}
PACKAGED_SPLITS = Path(__file__).resolve().parent / "splits" / "omniglot"
PROTOCOLS = ("vinyals", "finn", "sung", "lake")
SPLIT_PROTOCOLS = ("vinyals", "finn", "sung")  # those read from split files
SPLITS = ("train", "val", "test")


class Omniglot(EpisodeDataset):
    """Omniglot from the official archives under <data_dir>/omniglot/ (conf/dataset/omniglot.yaml)."""

    def __init__(
        self,
        *,
        protocol: str,
        lake_val_alphabets: int,
        image_size: int,
        invert: bool,
        resample: str,
        verify_checksums: bool,
        download: bool,
        test_unseen_by: str | None = None,
    ):
        """`protocol`: vinyals, finn, sung or lake (the module docstring), `lake_val_alphabets` the background
        alphabets lake holds out to validate; images `image_size` pixels square, ink bright on
        dark if `invert`, resized as `resample` says (data/image_cache.py RESAMPLES: lanczos,
        or binary_nearest for Finn et al.'s images); `verify_checksums` against
        <data_dir>/omniglot/SHA256SUMS; `download` the archives when they are missing;
        `test_unseen_by` another protocol whose test classes the test classes are cut to."""
        if protocol not in PROTOCOLS:
            raise ConfigError(
                f"dataset.protocol={protocol!r} is unknown for omniglot; choose one of {', '.join(PROTOCOLS)}"
            )
        held_out = lake_val_alphabets
        if protocol == "lake" and (
            isinstance(held_out, bool) or not isinstance(held_out, int) or not 1 <= held_out < 30
        ):
            raise ConfigError(
                f"dataset.lake_val_alphabets={held_out!r} must be a count of background alphabets from "
                f"1 to 29 (held out of the 30 for validation); set e.g. dataset.lake_val_alphabets=5"
            )
        check_positive("dataset.image_size", image_size, 28)
        if resample not in RESAMPLES:
            raise ConfigError(
                f"dataset.resample={resample!r} is unknown; use lanczos (metalab's) or binary_nearest "
                "(Finn et al.'s black-and-white images)"
            )
        if test_unseen_by is not None and (test_unseen_by not in SPLIT_PROTOCOLS or test_unseen_by == protocol):
            raise ConfigError(
                f"dataset.test_unseen_by={test_unseen_by!r} must be another of {', '.join(SPLIT_PROTOCOLS)} than "
                f"dataset.protocol={protocol}, e.g. dataset.protocol=finn dataset.test_unseen_by=vinyals; "
                "or null for the protocol's whole test split"
            )
        if test_unseen_by is not None and protocol == "lake":
            raise ConfigError(
                "dataset.test_unseen_by works with the rotated protocols (vinyals, finn, sung), not "
                "dataset.protocol=lake; set it to null"
            )
        self.resample, self.test_unseen_by = resample, test_unseen_by
        self.protocol, self.lake_val_alphabets, self.image_size = protocol, lake_val_alphabets, image_size
        self.invert, self.verify_checksums, self.download = invert, verify_checksums, download

    def sources(self, data_dir: Path, cache_dir: Path) -> dict[str, ImageClassSource]:
        protocol, image_size = self.protocol, self.image_size
        root = Path(data_dir) / "omniglot"
        archives = _archives(root, self.download)
        checksums = {}
        if self.verify_checksums:
            checksums = _verified_checksums(archives, root / "SHA256SUMS", Path(cache_dir))

        characters = [_characters(path) for path in archives]
        groups = {key: refs for chars in characters for key, refs in chars.items()}
        if protocol == "lake":
            splits = _lake_splits(*(sorted(chars) for chars in characters), self.lake_val_alphabets)
        else:  # read before decoding, so a bad split file fails fast
            splits = {split: _split_file(_split_folder(protocol, root) / f"{split}.txt", groups) for split in SPLITS}
            if self.test_unseen_by:
                other = set(_split_file(_split_folder(self.test_unseen_by, root) / "test.txt", groups))
                splits["test"] = sorted(c for c in splits["test"] if c in other)

        fingerprint = {
            "dataset": "omniglot",
            "checksums": checksums,
            "archives": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in archives],
        }
        array_path, index = load_or_build(
            Path(cache_dir), "omniglot", fingerprint, groups, image_size, 1, bool(self.invert), self.resample
        )

        described = protocol + (f", test unseen by {self.test_unseen_by}" if self.test_unseen_by else "")
        sources = {}
        for split, classes in splits.items():
            names = [char if protocol == "lake" else f"{char}/rot{90 * k:03d}" for char, k in classes]
            sources[split] = ImageClassSource(
                array_path,
                names,
                [index[c][0] for c, _ in classes],
                [index[c][1] for c, _ in classes],
                [k for _, k in classes],
                dataset=f"omniglot ({described})",
                split=split,
            )
        return sources


def _split_folder(protocol: str, root: Path) -> Path:
    return PACKAGED_SPLITS / SPLIT_FOLDERS[protocol] if protocol in SPLIT_FOLDERS else root / "splits" / "vinyals"


def _archives(root: Path, download: bool) -> list[Path]:
    archives = [root / name for name in ARCHIVES]
    missing = [path for path in archives if not path.is_file()]
    if missing and download:
        root.mkdir(parents=True, exist_ok=True)
        for path in missing:
            _download(DOWNLOAD_URL.format(path.name), path, OFFICIAL_MD5[path.name])
    elif missing:
        raise DataError(
            f"Omniglot archives not found: expected {archives[0]} and {archives[1]}. "
            "Set METALAB_DATA_DIR (or paths.data_dir) to the folder that holds omniglot/, "
            "or set dataset.download=true to download them (needs internet)."
        )
    return archives


def _download(url: str, path: Path, md5: str) -> None:
    """Fetch `url` to `path`, keeping it only if its MD5 is the published one."""
    # A new file of an unpredictable name, created exclusively: a link planted in a shared data
    # folder is never written through.
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    tmp = Path(name)
    try:
        urllib.request.urlretrieve(url, tmp)
        digest = hashlib.md5(tmp.read_bytes()).hexdigest()
        if digest != md5:
            raise DataError(
                f"downloaded {url} has MD5 {digest}, not the published {md5}; try again, "
                f"or download it by hand to {path}"
            )
        os.replace(tmp, path)
    except OSError as error:
        raise DataError(f"could not download {url} ({error}); download it by hand to {path}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _verified_checksums(archives: list[Path], sums_file: Path, cache_dir: Path) -> dict[str, str]:
    """Check each archive against SHA256SUMS (when present); return {archive name: sha256}.

    A verified sum is remembered in the cache dir with the file's size and mtime, so the archives are
    hashed once, not on every run.
    """
    if not sums_file.is_file():
        return {}
    try:
        lines = sums_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {sums_file}: {error}; fix its permissions or download it again") from None
    expected = {}
    for number, line in enumerate(lines, 1):
        if line.strip():
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
                raise DataError(
                    f"{sums_file} line {number} is not '<sha256> <file name>' ({line[:80]!r}); "
                    "correct it or download the file again"
                )
            expected[parts[1].strip().lstrip("*")] = parts[0].lower()
    memo_path = cache_dir / "checksums.json"
    memo = _checksum_memo(memo_path)
    verified = {}
    for path in archives:
        if path.name not in expected:
            continue
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = memo.get(str(path.resolve()))
        remembered = isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str)
        actual = entry["sha256"] if remembered else _sha256(path)
        if actual != expected[path.name]:
            raise DataError(
                f"checksum mismatch for {path}: expected sha256 {expected[path.name]} "
                f"(from {sums_file}), got {actual}; download the archive again"
            )
        memo[str(path.resolve())] = {"stamp": stamp, "sha256": actual}
        verified[path.name] = actual
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(memo_path, memo)
    return verified


def _checksum_memo(path: Path) -> dict:
    """The remembered archive checksums; a damaged memo is only a cache: warned about and hashed anew."""
    if not path.is_file():
        return {}
    try:
        memo = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        memo = error
    if isinstance(memo, dict):
        return memo
    log.warning(f"the checksum memo {path} is damaged ({type(memo).__name__}); hashing the archives again")
    return {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _characters(archive: Path) -> dict[str, list[ImageRef]]:
    """{'Alphabet/characterNN': [(archive, member), ...]} with drawings in sorted order."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = sorted(name for name in zf.namelist() if name.lower().endswith(".png"))
    except zipfile.BadZipFile:
        raise DataError(f"{archive} is not a valid zip archive; download it again") from None
    if not members:
        raise DataError(f"{archive} holds no .png images; download it again")
    characters: dict[str, list[ImageRef]] = {}
    for member in members:
        parts = member.split("/")  # images_background/Alphabet/characterNN/file.png
        characters.setdefault("/".join(parts[-3:-1]), []).append((str(archive), member))
    return characters


def _lake_splits(background: list[str], evaluation: list[str], val_alphabets: int) -> dict[str, list[tuple[str, int]]]:
    """Lake et al.'s background/evaluation protocol, validating on held-out background alphabets."""
    alphabets = sorted({char.split("/")[0] for char in background})
    held_out = set(alphabets[-val_alphabets:])
    return {
        "train": [(c, 0) for c in background if c.split("/")[0] not in held_out],
        "val": [(c, 0) for c in background if c.split("/")[0] in held_out],
        "test": [(c, 0) for c in evaluation],
    }


def _split_file(path: Path, characters: Mapping) -> list[tuple[str, int]]:
    """A split file's (character, quarter turns) classes: one 'Alphabet/characterNN/rotDDD' a line."""
    if not path.is_file():
        raise DataError(
            f"Omniglot split file not found: expected {path} (one 'Alphabet/characterNN/rotDDD' class per line)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not UTF-8 text (byte {error.start}); it should list one 'Alphabet/characterNN/rotDDD' "
            "class per line: restore the split file"
        ) from None
    classes = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        char, _, rotation = line.strip().rpartition("/")
        if char not in characters or rotation not in ROTATIONS:
            raise DataError(
                f"{path}:{number}: {line.strip()!r} is not a character of the archives "
                f"followed by one of {sorted(ROTATIONS)}"
            )
        classes.append((char, ROTATIONS[rotation]))
    return classes
