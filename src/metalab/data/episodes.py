"""Episodes (few-shot tasks), their seeding, and the sampler for image-classification sources."""

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from metalab.errors import ConfigError, DataError, check_positive


class Episode(NamedTuple):
    """One task, or a meta-batch of tasks when stacked (meta-batch dimension first)."""

    support_x: Tensor  # classification: [ways*shots, C, H, W] float32 in [0, 1]; regression: [shots, 1]
    support_y: Tensor  # classification: [ways*shots] int64 in 0..ways-1; regression: [shots, 1] float32
    query_x: Tensor  # [ways*queries, C, H, W] / [queries, 1]
    query_y: Tensor  # [ways*queries] / [queries, 1]


def episode_generator(seed: int, split: str, index: int) -> torch.Generator:
    """The generator for item `index` of the `split` stream.

    A keyed hash (not Python's salted `hash()`) so that the same (seed, split, index) gives the same
    episodes in every process, run and worker, and different splits get unrelated streams.
    """
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def sample_meta_batch(source, ways: int, shots: int, queries: int, count: int, generator: torch.Generator) -> Episode:
    """`count` episodes drawn one after another from `generator`, stacked into one meta-batch Episode."""
    episodes = [source.sample(ways, shots, queries, generator) for _ in range(count)]
    return Episode(*(torch.stack(parts) for parts in zip(*episodes)))


def require_positive(split_name: str, **values: int) -> None:
    """Raise ConfigError unless every value is an integer >= 1."""
    for name, value in values.items():
        check_positive(name, value, 5, meaning=f"for the '{split_name}' split")


class ImageClassSource:
    """Episodes over one split of a cached uint8 image array [N, C, H, W].

    Each class is a contiguous row range of the array, optionally shown rotated by k*90 degrees
    (Omniglot vinyals treats each rotation of a character as its own class, without storing copies).
    The array is memory-mapped and reopened lazily, so DataLoader workers never receive a copy.
    """

    task_type = "classification"

    def __init__(
        self,
        array_path: Path,
        class_names: Sequence[str],
        starts: Sequence[int],
        counts: Sequence[int],
        rotations: Sequence[int] | None = None,
        *,
        dataset: str,
        split: str,
        empty_hint: str = "",
    ):
        self.array_path = Path(array_path)
        self.class_names = list(class_names)
        self.dataset, self.split, self.empty_hint = dataset, split, empty_hint
        self._starts = np.asarray(starts, dtype=np.int64)
        self._counts = np.asarray(counts, dtype=np.int64)
        self._rotations = np.zeros(len(self.class_names), np.int64) if rotations is None else np.asarray(rotations)
        self._images = None
        self.input_shape = tuple(self.images.shape[1:])

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.array_path, mmap_mode="r")
        return self._images

    def __getstate__(self):
        return {**self.__dict__, "_images": None}  # pickle the path, not the array

    def joined(self, other: "ImageClassSource", split: str) -> "ImageClassSource":
        """One source dealing episodes over this split's classes and `other`'s (of the same image
        array), named `split`: e.g. training on the train and val classes together (trainval=true)."""
        if other.array_path != self.array_path:
            raise DataError(f"the '{self.split}' and '{other.split}' splits of {self.dataset} are in different arrays")
        return ImageClassSource(
            self.array_path,
            self.class_names + other.class_names,
            np.concatenate([self._starts, other._starts]),
            np.concatenate([self._counts, other._counts]),
            np.concatenate([self._rotations, other._rotations]),
            dataset=self.dataset,
            split=split,
            empty_hint=self.empty_hint,
        )

    def class_images(self, index: int) -> Tensor:
        """Every image of class `index` as uint8 [n, C, H, W], rotated as episodes show it."""
        start, n = self._starts[index], self._counts[index]
        images = torch.from_numpy(np.array(self.images[start : start + n]))
        return torch.rot90(images, int(self._rotations[index]), dims=(-2, -1))

    def image_rows(self) -> set[int]:
        """The rows of the image array this split's classes draw from."""
        return {int(row) for start, n in zip(self._starts, self._counts) for row in range(start, start + n)}

    def check(self, ways: int, shots: int, queries: int, split_name: str) -> None:
        require_positive(split_name, ways=ways, shots=shots, queries=queries)
        where = f"the '{split_name}' split of {self.dataset}"
        num_classes = len(self.class_names)
        if num_classes == 0:
            raise ConfigError(f"{where} has no classes; {self.empty_hint}".rstrip("; "))
        if ways > num_classes:
            raise ConfigError(f"ways={ways} but {where} has {num_classes} classes; choose ways <= {num_classes}")
        smallest = int(self._counts.argmin())
        fewest = int(self._counts[smallest])
        if shots + queries > fewest:
            shots_key, queries_key = ("shots", "queries") if split_name == "train" else ("test_shots", "test_queries")
            if fewest < 2:  # no setting can help: an episode takes at least 1 support and 1 query image
                allows = (
                    "an episode needs at least 2 images of every class (1 support, 1 query), so give "
                    "that class more images or remove it"
                )
            else:
                allows = (
                    f"choose {shots_key}+{queries_key} <= {fewest}, e.g. {shots_key}={min(shots, fewest - 1)} "
                    f"{queries_key}={fewest - min(shots, fewest - 1)}"
                )
            plural = "image" if fewest == 1 else "images"
            raise ConfigError(
                f"{shots_key}+{queries_key}={shots}+{queries}={shots + queries} but class "
                f"{self.class_names[smallest]!r} of {where} has only {fewest} {plural}; {allows}"
            )

    def sample(self, ways: int, shots: int, queries: int, generator: torch.Generator) -> Episode:
        return self.sample_with_classes(ways, shots, queries, generator)[0]

    def sample_with_classes(
        self, ways: int, shots: int, queries: int, generator: torch.Generator
    ) -> tuple[Episode, Tensor]:
        """The episode `sample` draws, and [ways] the index in this split of the class behind each label."""
        per_class = shots + queries
        # The random class order is the label assignment: label i is the i-th drawn class.
        classes = torch.randperm(len(self.class_names), generator=generator)[:ways].tolist()
        rows = np.empty((ways, per_class), dtype=np.int64)
        for label, c in enumerate(classes):
            picks = torch.randperm(int(self._counts[c]), generator=generator)[:per_class].numpy()
            rows[label] = self._starts[c] + picks
        # One fancy-index read of the memmap per episode, then convert only what was drawn.
        x = torch.from_numpy(self.images[rows.ravel()]).view(ways, per_class, *self.input_shape)
        for label, c in enumerate(classes):
            if self._rotations[c]:
                x[label] = torch.rot90(x[label], int(self._rotations[c]), dims=(-2, -1))
        x = x.float() / 255
        labels = torch.arange(ways).unsqueeze(1)
        episode = Episode(
            support_x=x[:, :shots].reshape(ways * shots, *self.input_shape),
            support_y=labels.expand(ways, shots).reshape(-1),
            query_x=x[:, shots:].reshape(ways * queries, *self.input_shape),
            query_y=labels.expand(ways, queries).reshape(-1),
        )
        return episode, torch.tensor(classes, dtype=torch.long)


class EpisodeDataset:
    """What a conf/dataset/<name>.yaml builds (the class its `_target_` names): the dataset's
    settings, the constructor's keyword arguments, checked when it is built, before any file is
    read; `sources` then gives its episode sources. A new dataset is a subclass in a module of
    metalab.data and a yaml file naming it."""

    def sources(self, data_dir: Path, cache_dir: Path) -> dict:
        """{"train", "val", "test"}: each a source that deals the split's episodes (ImageClassSource,
        SinusoidSource); `data_dir` holds the files, `cache_dir` what is decoded from them."""
        raise NotImplementedError
