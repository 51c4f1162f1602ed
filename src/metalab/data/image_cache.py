"""Decode image files once into a uint8 [N, C, H, W] array cached on disk; later runs memory-map it.

Images come in named groups (one per class or character); the json index beside the array records
each group's row range. Both files are named by a fingerprint of everything that shapes the array,
so a changed setting or input file gets a new cache instead of a stale one.
"""

import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import os
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image

from metalab.errors import DataError, StorageError
from metalab.files import atomic_file, free_space, megabytes, storage_error, write_json_atomic
from metalab.hardware import usable_cores

log = logging.getLogger("metalab")
MODES = {1: "L", 3: "RGB"}
# How an image is brought to its size. lanczos: metalab's. binary_nearest: Finn et al.'s Omniglot
# (cbfinn/maml data/omniglot_resized/resize_images.py asks for LANCZOS, but Omniglot's PNGs are
# 1-bit, which Pillow resizes by nearest neighbour whatever filter is asked): pixels are made black
# or white at the middle grey, then sampled, so the image stays black and white. On the archives'
# 1-bit images this gives exactly the images of Finn's resize script.
RESAMPLES = ("lanczos", "binary_nearest")
CHUNK = 2048  # images per decode task: large enough that each task opens its zip archive once
PARALLEL_MIN = 4096  # below this a process pool costs more than it saves

# (archive path or None, member name or file path)
ImageRef = tuple[str | None, str]


def decode_image(
    data, name: str, image_size: int, channels: int, invert: bool, resample: str = "lanczos"
) -> np.ndarray:
    """Decode one image (a path or a file object) to uint8 [C, image_size, image_size]."""
    try:
        with Image.open(data) as image:
            return image_to_array(image, image_size, channels, invert, resample)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {name}: {error}; replace or remove this file") from None


def image_to_array(
    image: Image.Image, image_size: int, channels: int, invert: bool, resample: str = "lanczos"
) -> np.ndarray:
    """The training transform of one opened image: mode, size (RESAMPLES), [C, H, W] layout, ink polarity."""
    image = image.convert(MODES[channels])
    if resample == "binary_nearest":
        image = image.point(lambda value: 255 if value >= 128 else 0).resize(
            (image_size, image_size), Image.Resampling.NEAREST
        )
    else:
        image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    return 255 - array if invert else array


def _decode_chunk(refs: list[ImageRef], image_size: int, channels: int, invert: bool, resample: str) -> np.ndarray:
    """Decode refs that all share one archive (or none); runs in pool workers."""
    out = np.empty((len(refs), channels, image_size, image_size), dtype=np.uint8)
    archive_path = refs[0][0]
    with zipfile.ZipFile(archive_path) if archive_path else contextlib.nullcontext() as archive:
        for i, (_, name) in enumerate(refs):
            data = io.BytesIO(read_member(archive, archive_path, name)) if archive_path else name
            out[i] = decode_image(
                data, f"{archive_path}:{name}" if archive_path else name, image_size, channels, invert, resample
            )
    return out


def read_member(archive: zipfile.ZipFile, archive_path: str, name: str) -> bytes:
    """One member's bytes; damage inside the archive (a bad CRC, undecompressable data) is a DataError,
    as a truncated archive is when it is opened."""
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
        raise DataError(
            f"{archive_path} is not a valid zip archive: its member {name} is damaged ({error}); download it again"
        ) from None


def _chunks(refs: list[ImageRef]) -> list[list[ImageRef]]:
    chunks: list[list[ImageRef]] = []
    for ref in refs:
        if not chunks or len(chunks[-1]) == CHUNK or chunks[-1][0][0] != ref[0]:
            chunks.append([])
        chunks[-1].append(ref)
    return chunks


def decode_all(
    refs: list[ImageRef], out: np.ndarray, image_size: int, channels: int, invert: bool, resample: str = "lanczos"
) -> None:
    """Decode every ref into `out` in order, on all cores when there are enough images."""
    chunks = _chunks(refs)
    workers = min(usable_cores(), len(chunks))
    args = (repeat(image_size), repeat(channels), repeat(invert), repeat(resample))
    if len(refs) < PARALLEL_MIN or workers < 2:
        _fill(out, map(_decode_chunk, chunks, *args))
    else:
        with ProcessPoolExecutor(workers) as pool:
            try:
                _fill(out, pool.map(_decode_chunk, chunks, *args))
            except BaseException:
                # A bad image, a full disk or Ctrl-C: drop the chunks not yet started, so the
                # workers end now rather than decode the rest (the `with` then waits for them).
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def _fill(out: np.ndarray, blocks) -> None:
    row = 0
    for block in blocks:
        out[row : row + len(block)] = block
        row += len(block)


def reserve(file, array_path: Path) -> None:
    """Allocate the whole memory-mapped file on disk now. Left sparse, a disk that fills while the
    array is written kills the process with SIGBUS (no message, the file and pool workers left
    behind); allocated, a full disk is an error here, before any decoding."""
    if not hasattr(os, "posix_fallocate"):
        return
    size = os.fstat(file.fileno()).st_size
    try:
        os.posix_fallocate(file.fileno(), 0, size)
    except OSError as error:
        if error.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return  # a file system that cannot allocate ahead: written as before
        raise storage_error(array_path, error, size) from None


def cache_damage(array_path: Path, index_path: Path, shape: tuple, index: dict) -> str | None:
    """What is wrong with a cached array and its index (None: nothing). A cache folder may be shared,
    copied or cut short by a full disk, so neither file is trusted: the array must be a plain uint8
    array of the expected shape, whole on disk, and the index the one these groups give."""
    try:
        stored = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"its index {index_path.name} is unreadable: {type(error).__name__}"
    if not isinstance(stored, dict) or {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()} != index:
        return f"its index {index_path.name} does not match the images"
    try:
        array = np.load(array_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:  # truncated, not an .npy file, or an object array
        return f"{type(error).__name__}: {error}"
    if not isinstance(array, np.memmap):  # an .npz archive
        return f"it holds a {type(array).__name__}, not an array"
    if array.dtype != np.uint8 or array.shape != shape:
        return f"it holds {array.dtype} {array.shape}, not uint8 {shape}"
    return None


def load_or_build(
    cache_dir: Path,
    stem: str,
    fingerprint: dict,
    groups: dict[str, list[ImageRef]],
    image_size: int,
    channels: int,
    invert: bool,
    resample: str = "lanczos",
) -> tuple[Path, dict[str, tuple[int, int]]]:
    """Return (path of the cached .npy, {group: (first row, row count)}), decoding only on a cache miss."""
    layout = [[key, [ref[1] for ref in refs]] for key, refs in groups.items()]
    identity = {**fingerprint, "image_size": image_size, "channels": channels, "invert": invert, "layout": layout}
    if resample != "lanczos":  # the caches made before the setting existed keep their names
        identity["resample"] = resample
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    array_path = cache_dir / f"{stem}-{image_size}px-{key}.npy"
    index_path = array_path.with_suffix(".json")
    refs = [ref for group in groups.values() for ref in group]
    shape = (len(refs), channels, image_size, image_size)
    index, row = {}, 0
    for name, group in groups.items():
        index[name] = (row, len(group))
        row += len(group)
    if array_path.exists() and index_path.exists():  # the index is written last, so it marks a complete cache
        damage = cache_damage(array_path, index_path, shape, index)
        if damage is None:
            return array_path, index
        log.warning(f"the image cache {array_path} is damaged ({damage}); decoding the images again")

    needed = len(refs) * channels * image_size * image_size + 4096  # the pixels and the .npy header
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise storage_error(cache_dir, error) from None
    free = free_space(cache_dir)
    if free is not None and free < needed:  # refused before decoding anything
        raise StorageError(
            f"the image cache {array_path} needs {megabytes(needed)} but {cache_dir} has "
            f"{megabytes(free)} free; free some space or set METALAB_CACHE_DIR (paths.cache_dir) "
            "to a disk with room"
        )
    # Decoded straight into the new file through a memory map, so even large sets never sit whole
    # in RAM; files.atomic_file makes it (a link planted in a shared cache folder is never followed).
    with atomic_file(array_path, needed) as file:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(file, header)
        offset = file.tell()
        file.truncate(offset + math.prod(shape))
        reserve(file, array_path)
        out = np.memmap(file, dtype=np.uint8, mode="r+", offset=offset, shape=shape)
        decode_all(refs, out, image_size, channels, invert, resample)
        out.flush()
        del out
    write_json_atomic(index_path, index)
    return array_path, index
