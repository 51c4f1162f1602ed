"""The learner behind the requests: adapt to a support set, keep the task, predict; no HTTP here.

A request's images form one pass through the network, exactly as
`metalab.load_learner(...).adapt(...).predict_proba(images)` passes them: for learners whose
BatchNorm normalizes with each pass's statistics (`Learner.transductive`: the MAML family's
conv4) a query's probabilities depend on the other images of the same request, as in meta-test
evaluation; for the others they do not. Requests never share a pass.

The task id is the SHA-256 of a canonical JSON encoding of the checkpoint's SHA-256 and the
support examples in request order, each as its label and the SHA-256 of its image bytes: the
same support set gives the same id on every worker and after every restart. Order counts (it
fixes the order of the labels, and the MAML family's and MANN's adaptation depend on it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils._pytree import tree_map

import metalab
from metalab.api import AdaptedTask, Learner, load_learner
from metalab.errors import MetalabError, StorageError
from metalab.pretrained import resolve as resolve_named
from metalab.serving.inputs import (
    ClientError,
    EncodedImage,
    Limits,
    check_count,
    decode,
    guard_pillow,
    query_items,
    support_items,
)
from metalab.serving.store import FORMAT, TaskStore

TASK_ID = re.compile(r"[0-9a-f]{64}")


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Service:
    def __init__(
        self,
        ckpt_path: str,
        device: str,
        limits: Limits,
        store_dir: Path,
        cache_bytes: int,
        store_bytes: int,
        threads: int,
    ):
        # The requests' work (decoding, the model, the store) runs on one thread of its own,
        # where torch's thread count is set and the model loaded: every torch operation of the
        # process then comes from that one thread. torch's OpenMP keeps a team of threads for
        # each thread that runs a parallel operation, and once the process has more such
        # threads than cores libgomp stops spinning between operations, so each operation
        # waits for its team to wake: MAML adapting with 2 torch threads took 38.9 ms on a
        # thread after another thread had computed, 15-16 ms when one thread did everything;
        # the server, with its work in two request threads, took 34 ms against the API's 16.
        self._work_thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="metalab-work", initializer=torch.set_num_threads, initargs=(threads,)
        )
        self.learner: Learner = self._work_thread.submit(load_learner, ckpt_path, device).result()
        self.checkpoint_sha256 = file_sha256(resolve_named(ckpt_path))
        self.limits = limits
        self.store = TaskStore(store_dir, self.checkpoint_sha256, cache_bytes, store_bytes)
        guard_pillow(limits)

    # ------------------------------------------------------------------ requests
    def submit(self, request_method, *args) -> Future:
        """Run one of the request methods below on the work thread (one request at a time)."""
        return self._work_thread.submit(request_method, *args)

    def create_task(self, request: dict) -> dict:
        """Adapt to `request["support"]` (or find the task kept from an earlier request)."""
        images, labels = support_items(request, self.limits)
        check_count(len(images), self.limits)
        task_id = self.task_id(images, labels)
        kept = self.store.get(task_id)
        if kept is not None:
            return self._task_answer(task_id, kept.labels, len(images), created=False)
        task = self._adapt(images, labels)
        self.store.put(task_id, task.labels, task.state)
        return self._task_answer(task_id, task.labels, len(images), created=True)

    def predict_task(self, task_id: str, request: dict) -> dict:
        task = self.store.get(task_id) if TASK_ID.fullmatch(task_id) else None
        if task is None:
            raise ClientError(
                404,
                f"no task {task_id[:80]!r} here: unknown, or evicted from the store; create it again with "
                "POST /v1/tasks and its support set (the same set gives the same task_id)",
            )
        images = query_items(request, self.limits)
        check_count(len(images), self.limits)
        adapted = AdaptedTask(self.learner, task.state, task.labels, self._no_support())
        return self._predictions(adapted, images)

    def predict_once(self, request: dict) -> dict:
        """Adapt and predict in one request, keeping nothing: the answer of create + predict."""
        support, labels = support_items(request, self.limits)
        images = query_items(request, self.limits)
        check_count(len(support) + len(images), self.limits)
        return self._predictions(self._adapt(support, labels), images)

    def model_info(self) -> dict:
        learner = self.learner
        config = getattr(learner.model, "run_config", None) or {}
        fixed = bool(learner.model.fixed_ways)
        return {
            "learner": learner.algorithm,
            "training_dataset": config.get("dataset", {}).get("name"),
            "training_ways": learner.training_ways,
            "transform": {
                "size": learner.transform.image_size,
                "channels": learner.transform.channels,
                "invert": learner.transform.invert,
                "input_shape": list(learner.transform.input_shape),
            },
            "classes": {
                "min": learner.training_ways if fixed else 2,
                "max": learner.training_ways if fixed else None,
                "why": (
                    f"{learner.algorithm} has one output per training way, so a support set has exactly "
                    f"{learner.training_ways} classes"
                    if fixed
                    else f"{learner.algorithm} compares queries with the support examples: any number of classes from 2"
                ),
            },
            "transductive": learner.transductive,
            "checkpoint_sha256": self.checkpoint_sha256,
            "metalab_version": metalab.__version__,
            "task_format": FORMAT,
            "limits": asdict(self.limits),
            "kept": self.kept(),
        }

    def kept(self) -> dict:
        """The adapted tasks kept: in this worker's memory (each worker has its own) and in the
        store every worker shares, with their budgets."""
        memory = self.store.memory
        try:
            stored = self.store.used_bytes()
        except StorageError:  # the folder is gone or unwritable: the model is still described
            stored = None
        return {
            "worker": os.getpid(),
            "memory": {"tasks": len(memory), "bytes": memory.used, "budget": memory.budget},
            "store": {"bytes": stored, "budget": self.store.store_bytes},
        }

    def ready(self) -> bool:
        return os.access(self.store.folder, os.W_OK | os.X_OK)

    # ------------------------------------------------------------------ the steps
    def task_id(self, images: list[EncodedImage], labels: list[str]) -> str:
        canonical = {
            "format": FORMAT,
            "checkpoint_sha256": self.checkpoint_sha256,
            "support": [[label, image.sha256] for label, image in zip(labels, images)],
        }
        text = json.dumps(canonical, ensure_ascii=True, separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(text.encode("ascii")).hexdigest()

    def _inputs(self, images: list[EncodedImage]) -> torch.Tensor:
        return torch.stack([decode(image, self.limits, self.learner.transform) for image in images])

    def _adapt(self, images: list[EncodedImage], labels: list[str]) -> AdaptedTask:
        support = self._inputs(images)  # every image decoded and checked before the model runs
        try:
            return self.learner.adapt(list(zip(support, labels)))
        except MetalabError as error:  # one class, a class count a fixed head cannot take
            raise ClientError(400, str(error)) from None

    def _predictions(self, task: AdaptedTask, images: list[EncodedImage]) -> dict:
        query = self._inputs(images)
        device = self.learner.device
        task.state = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, task.state)
        probabilities = task.predict_proba(query)  # the request's images in one pass
        predictions = []
        for row in probabilities.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            predictions.append(
                {"label": task.labels[best], "probability": row[best], "probabilities": dict(zip(task.labels, row))}
            )
        return {"labels": list(task.labels), "predictions": predictions}

    def _no_support(self) -> torch.Tensor:
        # A kept task predicts in passes of the request's images; the support images are needed
        # only for `independent` predictions, which the service does not offer.
        return torch.empty(0, *self.learner.transform.input_shape)

    @staticmethod
    def _task_answer(task_id: str, labels, examples: int, created: bool) -> dict:
        return {"task_id": task_id, "labels": list(labels), "support_examples": examples, "created": created}
