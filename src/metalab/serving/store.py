"""Adapted tasks, kept: a least-recently-used cache in memory with a byte budget, and files on disk.

Each task is one safetensors file, `<store_dir>/<task_id>.safetensors`: the state's tensors,
and in the file's metadata (strings only) the format, the labels, the state's layout (state.py)
and the checkpoint's SHA-256. The format holds tensors and strings, nothing that runs code
when read. A file is written whole under a temporary name and renamed into place
(files.atomic_file), so a reader, in this process or another worker, finds a complete task or
none. The folder is kept under `store_bytes`: after each write the least recently used files
(by modification time, which every read refreshes) are removed until the rest fit. A file that
cannot be read back (damaged, cut short, another format) counts as unknown: the client is told
to create the task again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from metalab.files import atomic_file
from metalab.serving.state import flatten_state, unflatten_state

log = logging.getLogger("metalab.serve")
FORMAT = "metalab-adapted-task-1"
SUFFIX = ".safetensors"


@dataclass(frozen=True)
class StoredTask:
    labels: tuple[str, ...]
    state: object
    size: int  # bytes of tensor data: what the memory budget counts


def tensor_bytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


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

    def path(self, task_id: str) -> Path:
        return self.folder / f"{task_id}{SUFFIX}"

    def get(self, task_id: str) -> StoredTask | None:
        """The task, from memory or disk; None when unknown, evicted or unreadable."""
        task = self.memory.get(task_id)
        if task is None:
            task = self._read(task_id)
            if task is not None:
                self.memory.put(task_id, task)
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
        with atomic_file(self.path(task_id), len(payload)) as file:
            file.write(payload)
        task = StoredTask(tuple(labels), state, tensor_bytes(tensors))
        self.memory.put(task_id, task)
        self.prune(keep=task_id)
        return task

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

    def prune(self, keep: str | None = None) -> None:
        """Remove the least recently used task files until the folder holds at most `store_bytes`."""
        files = []
        for path in self.folder.glob(f"*{SUFFIX}"):
            try:
                stat = path.stat()
            except OSError:  # removed meanwhile by another worker
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.store_bytes:
                break
            if path.name == f"{keep}{SUFFIX}":
                continue
            path.unlink(missing_ok=True)
            total -= size
