"""Decode image files once into a uint8 [N, C, H, W] array cached on disk; later runs memory-map it.

Images come in named groups (one per class or character); the json index beside the array records
each group's row range. Both files are named by a fingerprint of everything that shapes the array,
so a changed setting or input file gets a new cache instead of a stale one.
"""

import contextlib
import hashlib
import io
import json
import os
import zipfile
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image

from metalab.errors import DataError

MODES = {1: "L", 3: "RGB"}
CHUNK = 2048  # images per decode task: large enough that each task opens its zip archive once
PARALLEL_MIN = 4096  # below this a process pool costs more than it saves

# (archive path or None, member name or file path)
ImageRef = tuple[str | None, str]


def decode_image(data, name: str, image_size: int, channels: int, invert: bool) -> np.ndarray:
    """Decode one image (a path or a file object) to uint8 [C, image_size, image_size]."""
    try:
        with Image.open(data) as image:
            return image_to_array(image, image_size, channels, invert)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {name}: {error}; replace or remove this file") from None


def image_to_array(image: Image.Image, image_size: int, channels: int, invert: bool) -> np.ndarray:
    """The training transform of one opened image: mode, size, [C, H, W] layout, ink polarity."""
    image = image.convert(MODES[channels]).resize((image_size, image_size), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    return 255 - array if invert else array


def _decode_chunk(refs: list[ImageRef], image_size: int, channels: int, invert: bool) -> np.ndarray:
    """Decode refs that all share one archive (or none); runs in pool workers."""
    out = np.empty((len(refs), channels, image_size, image_size), dtype=np.uint8)
    archive_path = refs[0][0]
    with zipfile.ZipFile(archive_path) if archive_path else contextlib.nullcontext() as archive:
        for i, (_, name) in enumerate(refs):
            data = io.BytesIO(archive.read(name)) if archive_path else name
            out[i] = decode_image(data, f"{archive_path}:{name}" if archive_path else name,
                                  image_size, channels, invert)
    return out


def _chunks(refs: list[ImageRef]) -> list[list[ImageRef]]:
    chunks: list[list[ImageRef]] = []
    for ref in refs:
        if not chunks or len(chunks[-1]) == CHUNK or chunks[-1][0][0] != ref[0]:
            chunks.append([])
        chunks[-1].append(ref)
    return chunks


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_all(refs: list[ImageRef], out: np.ndarray, image_size: int, channels: int, invert: bool) -> None:
    """Decode every ref into `out` in order, on all cores when there are enough images."""
    chunks = _chunks(refs)
    workers = min(_cpu_count(), len(chunks))
    args = (repeat(image_size), repeat(channels), repeat(invert))
    if len(refs) < PARALLEL_MIN or workers < 2:
        _fill(out, map(_decode_chunk, chunks, *args))
    else:
        with ProcessPoolExecutor(workers) as pool:
            _fill(out, pool.map(_decode_chunk, chunks, *args))


def _fill(out: np.ndarray, blocks) -> None:
    row = 0
    for block in blocks:
        out[row:row + len(block)] = block
        row += len(block)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def load_or_build(cache_dir: Path, stem: str, fingerprint: dict, groups: dict[str, list[ImageRef]],
                  image_size: int, channels: int, invert: bool) -> tuple[Path, dict[str, tuple[int, int]]]:
    """Return (path of the cached .npy, {group: (first row, row count)}), decoding only on a cache miss."""
    layout = [[key, [ref[1] for ref in refs]] for key, refs in groups.items()]
    identity = {**fingerprint, "image_size": image_size, "channels": channels, "invert": invert, "layout": layout}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    array_path = cache_dir / f"{stem}-{image_size}px-{key}.npy"
    index_path = array_path.with_suffix(".json")
    if array_path.exists() and index_path.exists():  # the index is written last, so it marks a complete cache
        return array_path, {k: tuple(v) for k, v in json.loads(index_path.read_text()).items()}

    refs = [ref for group in groups.values() for ref in group]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = array_path.with_name(f".{array_path.name}.{os.getpid()}.tmp")
    try:
        # Decode straight into a file-backed array so even large sets never sit whole in RAM.
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(len(refs), channels, image_size, image_size))
        decode_all(refs, out, image_size, channels, invert)
        out.flush()
        del out
        os.replace(tmp, array_path)
    finally:
        tmp.unlink(missing_ok=True)
    index, row = {}, 0
    for name, group in groups.items():
        index[name] = (row, len(group))
        row += len(group)
    write_json_atomic(index_path, index)
    return array_path, index
