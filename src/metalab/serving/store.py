"""Adapted tasks, kept: a least-recently-used cache in memory with a byte budget, and files on disk.

Each task is one safetensors file, `<store_dir>/<task_id>.safetensors`: the state's tensors,
and in the file's metadata (strings only) the format, the labels, the state's layout (state.py)
and the checkpoint's SHA-256. The format holds tensors and strings, nothing that runs code
when read. A file that cannot be read back (damaged, cut short, another format) counts as
unknown: the client is told to create the task again.

The store is a cache of what can be made again from a support set, so a file is written under
a temporary name and renamed into place (files.atomic_file) without fsync: a reader, in this
process or another worker, and a server that crashed mid-write find a complete task or none;
only a power loss can lose a task that was answered, and that is a 404 telling the client to
create it again. The two fsyncs took most of a create request's time.

The task files are kept under `store_bytes` without listing the folder on every write: the
folder's total sits in `<store_dir>/usage`, shared by every worker process and changed under an
exclusive lock (flock) together with the rename that changes the folder. The folder is listed
at start-up (the count is set from the files there), and when a write takes the count over the
budget: then the least recently used files (by modification time, which every read refreshes)
are removed until the rest take at most PRUNE_TO of the budget, so that the next writes, up to
a tenth of the budget, need no listing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from metalab.allocator import release_free_memory
from metalab.files import FILE_MODE, atomic_file, storage_error
from metalab.serving.state import flatten_state, unflatten_state

log = logging.getLogger("metalab.serve")
FORMAT = "metalab-adapted-task-1"
SUFFIX = ".safetensors"
USAGE = "usage"  # the task files' total bytes, as COUNT_WIDTH digits; not a task file (no SUFFIX)
COUNT_WIDTH = 20  # fixed, so one write replaces the whole count (no truncation a crash could leave)
PRUNE_TO = 0.9  # of store_bytes, what a prune leaves
# The free heap pages are handed back after this many tasks are put in memory: each kept task's
# small tensors, allocated among a request's large temporaries, otherwise pin whole pages. With
# 3,000 ProtoNet tasks the server grew 20 kB a task without it, 3.7 kB with it, no slower.
TRIM_EVERY = 100


@dataclass(frozen=True)
class StoredTask:
    labels: tuple[str, ...]
    state: object
    size: int  # bytes the memory budget counts (tensor_bytes)


# What a kept tensor costs the process beyond its data: the Python object, the tensor and storage
# structures, the cache's entry. Measured: 10,000 ProtoNet tasks (one tensor of 1,280 bytes each)
# grew the server by 3,941 bytes a task (scripts/bench_serve.py --memory-tasks). Counted per tensor,
# so a state of many tensors (MAML's fast weights) is counted high rather than low.
TENSOR_OVERHEAD = 2700


def tensor_bytes(tensors: dict[str, Tensor]) -> int:
    """The memory a task's tensors take, as the cache's budget counts it: data and overhead."""
    return sum(t.numel() * t.element_size() + TENSOR_OVERHEAD for t in tensors.values())


class MemoryCache:
    """Tasks by id, least recently used first out, their tensors within `budget` bytes in all."""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self._tasks: OrderedDict[str, StoredTask] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, task_id: str) -> StoredTask | None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None:
                self._tasks.move_to_end(task_id)
            return task

    def put(self, task_id: str, task: StoredTask) -> None:
        if task.size > self.budget:
            return  # larger than the whole budget: served from disk only
        with self._lock:
            if task_id in self._tasks:
                self.used -= self._tasks.pop(task_id).size
            self._tasks[task_id] = task
            self.used += task.size
            while self.used > self.budget:
                self.used -= self._tasks.popitem(last=False)[1].size

    def __contains__(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)


class TaskStore:
    """The memory cache in front of the folder of task files."""

    def __init__(self, folder: Path, checkpoint_sha256: str, cache_bytes: int, store_bytes: int):
        self.folder = Path(folder)
        self.checkpoint_sha256 = checkpoint_sha256
        self.memory = MemoryCache(cache_bytes)
        self.store_bytes = store_bytes
        self._remembered = 0  # tasks put in memory: every TRIM_EVERY, free memory goes back
        self._lock = threading.Lock()
        with self._locked() as descriptor:  # the files there now, whatever the count said
            write_count(descriptor, self._prune(keep=None, target=store_bytes))

    def path(self, task_id: str) -> Path:
        return self.folder / f"{task_id}{SUFFIX}"

    def get(self, task_id: str) -> StoredTask | None:
        """The task, from memory or disk; None when unknown, evicted or unreadable."""
        task = self.memory.get(task_id)
        if task is None:
            task = self._read(task_id)
            if task is not None:
                self._remember(task_id, task)
        return task

    def put(self, task_id: str, labels: tuple[str, ...], state) -> StoredTask:
        from safetensors.torch import save

        tensors, layout = flatten_state(state)
        metadata = {
            "format": FORMAT,
            "labels": json.dumps(list(labels)),
            "layout": json.dumps(layout),
            "checkpoint_sha256": self.checkpoint_sha256,
        }
        payload = save(tensors, metadata=metadata)
        path = self.path(task_id)
        with self._locked() as descriptor:
            try:
                replaced = path.stat().st_size  # another worker wrote the same task meanwhile
            except OSError:
                replaced = 0
            total = self._count(descriptor) + len(payload) - replaced
            # Counted before the file lands: a write that fails leaves the count too high, which
            # costs at most an early listing of the folder; too low would let the folder grow.
            write_count(descriptor, total)
            with atomic_file(path, len(payload), durable=False) as file:
                file.write(payload)
            if total > self.store_bytes:
                write_count(descriptor, self._prune(keep=task_id, target=int(PRUNE_TO * self.store_bytes)))
        task = StoredTask(tuple(labels), state, tensor_bytes(tensors))
        self._remember(task_id, task)
        return task

    def _remember(self, task_id: str, task: StoredTask) -> None:
        self.memory.put(task_id, task)
        with self._lock:
            self._remembered += 1
            trim = self._remembered % TRIM_EVERY == 0
        if trim:
            release_free_memory()

    def used_bytes(self) -> int:
        """The task files' total bytes, as the shared count has it."""
        with self._locked() as descriptor:
            return self._count(descriptor)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        """The usage file's descriptor, locked against every other writer of this folder (threads
        too: each call opens the file anew, and flock locks on separate opens exclude each other)."""
        path = self.folder / USAGE
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a link planted in the folder is refused, never written through.
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
        except OSError as error:
            raise storage_error(path, error) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield descriptor
        finally:
            os.close(descriptor)  # releases the lock

    def _count(self, descriptor: int) -> int:
        total = read_count(descriptor)
        if total is None:  # no count yet, or not ours (emptied, edited): count the files again
            total = self._prune(keep=None, target=self.store_bytes)
            write_count(descriptor, total)
        return total

    def _read(self, task_id: str) -> StoredTask | None:
        from safetensors import safe_open

        path = self.path(task_id)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as file:
                metadata = file.metadata() or {}
                tensors: dict[str, Tensor] = {name: file.get_tensor(name) for name in file.keys()}
            if metadata.get("format") != FORMAT or metadata.get("checkpoint_sha256") != self.checkpoint_sha256:
                raise ValueError(
                    f"format {metadata.get('format')!r} for checkpoint {metadata.get('checkpoint_sha256')}"
                )
            labels = json.loads(metadata["labels"])
            if not (isinstance(labels, list) and all(isinstance(label, str) for label in labels)):
                raise ValueError("its labels are not a list of strings")
            state = unflatten_state(tensors, json.loads(metadata["layout"]))
        except Exception as error:  # any unreadable file is an unknown task, never a failed worker
            log.warning("task file %s cannot be read (%s: %s); treated as unknown", path, type(error).__name__, error)
            return None
        try:
            os.utime(path)  # read now: the last to go when the folder is pruned
        except OSError:
            pass
        return StoredTask(tuple(labels), state, tensor_bytes(tensors))

    def _prune(self, keep: str | None, target: int) -> int:
        """Under the lock: remove the least recently used task files (never `keep`) until the folder's
        take at most `target` bytes, and the temporary files of writes that never finished; the
        bytes left. No write is under way meanwhile (every write holds the lock)."""
        files, total = [], 0
        for path in self.folder.iterdir():
            name = path.name
            try:
                if name.startswith(".") and name.endswith(".tmp") and SUFFIX in name:  # files.atomic_file's
                    path.unlink(missing_ok=True)
                    continue
                if path.suffix != SUFFIX:
                    continue
                stat = path.stat()
            except OSError:  # gone meanwhile (removed by hand), or not ours to remove
                continue
            files.append((stat.st_mtime, stat.st_size, path))
            total += stat.st_size
        for _, size, path in sorted(files):
            if total <= target:
                break
            if path.stem == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
        return total


def read_count(descriptor: int) -> int | None:
    text = os.pread(descriptor, COUNT_WIDTH + 1, 0)
    return int(text[:COUNT_WIDTH]) if len(text) == COUNT_WIDTH + 1 and text[:COUNT_WIDTH].isdigit() else None


def write_count(descriptor: int, total: int) -> None:
    # One write of the whole fixed-width count at the file's start: a crash cannot leave half of it.
    os.pwrite(descriptor, f"{max(0, total):0{COUNT_WIDTH}d}\n".encode(), 0)
