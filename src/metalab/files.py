"""Every file metalab writes, written whole or not at all.

`write_atomic` writes to a new temporary file beside the target (created exclusively, so a
name planted there cannot redirect it), flushes it to disk, and renames it over the target:
a reader sees the old file or the complete new one, a failed write leaves the old one as it
was, and a symbolic link planted at the target is replaced, never followed. A failure (disk
full, read-only file system, no permission) is a StorageError naming the path and, where
known, the space needed and free.
"""

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from metalab.errors import StorageError


def _process_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; done once, at import
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; written files get the permissions a plain
# open() would give them (0666 less the umask), as before they were written by rename.
FILE_MODE = 0o666 & ~_process_umask()


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def free_space(folder: Path) -> int | None:
    """Bytes free to an unprivileged writer on the file system holding `folder` (None: unknown)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def storage_error(path: Path, error: OSError, needed: int | None = None) -> StorageError:
    """A one-line StorageError for a failed write of `path`, with the space figures for a full disk."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_space(Path(path).parent)
        space = f"{megabytes(needed)} needed" if needed is not None else "more space needed"
        if free is not None:
            space += f", {megabytes(free)} free"
        return StorageError(
            f"cannot write {path}: {reason} ({space}); free some space there or write "
            "elsewhere (paths.log_dir, paths.cache_dir, output=)"
        )
    if error.errno == errno.EFBIG:
        size = f"{megabytes(needed)} " if needed is not None else ""
        return StorageError(
            f"cannot write {path}: {reason} ({size}over this process's file-size limit, "
            "ulimit -f); raise the limit or write smaller files"
        )
    return StorageError(
        f"cannot write {path}: {reason}; choose a writable location (paths.log_dir, paths.cache_dir, output=)"
    )


def sync_directory(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform allows opening a directory)."""
    try:
        directory = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


@contextmanager
def atomic_file(path, size: int | None = None, durable: bool = True) -> Iterator[BinaryIO]:
    """A new temporary file beside `path`, open for reading and writing, that replaces `path` in one
    rename when the block ends without an error (flushed to disk first) and is removed when it
    does not. `size`: the bytes it will hold, for the message when the disk is full.
    `durable=False` skips the two fsyncs (of the file, then of its folder after the rename): the
    rename still shows readers the old file or the whole new one, and a process that crashes
    leaves one or the other, but after a power loss the file may be missing or empty. For data
    that can be made again (a cache), where the fsyncs would be most of the write's cost."""
    target = Path(path)
    temporary = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        temporary = Path(name)
        with open(descriptor, "w+b") as file:
            if hasattr(os, "fchmod"):
                os.fchmod(file.fileno(), FILE_MODE)
            yield file
            file.flush()
            if durable:
                os.fsync(file.fileno())
        os.replace(temporary, target)
        temporary = None
    except OSError as error:
        raise storage_error(target, error, size) from None
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
    if durable:
        sync_directory(target.parent)


def write_atomic(path, data: bytes | str | memoryview, encoding: str = "utf-8", errors: str = "strict") -> None:
    """Replace `path` by `data` (text is encoded with `encoding` and `errors`) in one rename."""
    payload = data.encode(encoding, errors) if isinstance(data, str) else data
    with atomic_file(path, len(payload)) as file:
        file.write(payload)


def write_json_atomic(path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1) + "\n")
