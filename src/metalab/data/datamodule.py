"""Lightning data module: an endless, resumable training stream and fixed evaluation episodes."""

from collections.abc import Mapping
from itertools import count
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from metalab.data.episodes import Episode, EpisodeDataset, episode_generator, sample_meta_batch
from metalab.data.image_folder import ImageFolder, MiniImageNet
from metalab.data.omniglot import Omniglot
from metalab.data.sequences import episode_shaper
from metalab.data.sinusoid import Sinusoid
from metalab.errors import ConfigError, DataError, check_meta_batch_split, metalab_class
from metalab.settings import SHARED_DATASET_KEYS, check_group_keys, with_group_defaults

# dataset=<name> -> the class conf/dataset/<name>.yaml builds, for the lists in messages.
DATASETS = {"sinusoid": Sinusoid, "omniglot": Omniglot, "image_folder": ImageFolder, "mini_imagenet": MiniImageNet}
# Dataset settings that are the data module's or the checkpointing's, not the dataset's own.
NOT_THE_DATASETS = ("name", "_target_", "episodes", "metric", "metric_mode")
SPLITS_CHECKED = {
    None: ("train", "val", "test"),
    "fit": ("train", "val", "test"),  # a train run ends with a test
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}


def build_sources(dataset_cfg: Mapping, data_dir: Path, cache_dir: Path, trainval: bool = False) -> dict:
    """The episode sources {"train", "val", "test"} of the dataset `dataset_cfg` configures: the
    class its `_target_` names, built with
    its settings as keyword arguments. With `trainval` the train source deals episodes over the
    train and val classes together (check_trainval)."""
    cfg = with_group_defaults("dataset", dataset_cfg)  # conf/dataset/<name>.yaml: the one place of the defaults
    name = cfg.get("name")
    if cfg.get("_target_") is None:  # no conf/dataset/<name>.yaml gave it one
        raise ConfigError(
            f"dataset.name={name!r} has no conf/dataset/{name}.yaml to name its class; choose one with "
            f"dataset=<name> ({', '.join(DATASETS)}), or give dataset._target_"
        )
    check_group_keys("dataset", cfg, SHARED_DATASET_KEYS)  # a clear refusal, not a TypeError
    # dataset.episodes=sequence: the memory learners' episodes (sequences.py); checked before any loading
    shape_episodes = episode_shaper(cfg.get("episodes", "few_shot"), name)
    dataset = dataset_class(cfg.get("_target_"))(
        **{key: value for key, value in cfg.items() if key not in NOT_THE_DATASETS}
    )
    try:
        sources = dataset.sources(Path(data_dir), Path(cache_dir))
    except OSError as error:  # the data's files and folders, as the operating system refuses them
        where = error.filename or data_dir
        raise DataError(
            f"cannot read {where} (dataset={name}): {error.strerror or error}; check that it exists and that "
            "this user may read it, or set METALAB_DATA_DIR (paths.data_dir, dataset.root) to a readable copy"
        ) from None
    check_disjoint_splits(sources, name)
    if trainval:
        check_trainval(sources, name)
        sources = {**sources, "train": sources["train"].joined(sources["val"], "train+val")}
    return shape_episodes(sources)


def check_trainval(sources: Mapping, dataset: str) -> None:
    """trainval=true trains on the train and val classes together, as Snell et al. trained their
    final models (jakesnell/prototypical-networks scripts/train/few_shot/train.py:39-42, the
    `data.trainval` option scripts/train/few_shot/trainval.py:24 sets); it needs a dataset whose
    splits are classes."""
    if not all(hasattr(sources.get(split), "joined") for split in ("train", "val")):
        raise ConfigError(
            f"trainval=true trains on the train and val classes together, but dataset={dataset} has no "
            f"class splits (every split draws from one task family); set trainval=false"
        )


def dataset_class(target) -> type[EpisodeDataset]:
    """The class `dataset._target_` names (metalab's own datasets only: a checkpoint's stored config
    can build nothing else)."""
    return metalab_class(
        "dataset._target_",
        target,
        "metalab.data",
        EpisodeDataset,
        f"choose one with dataset=<name> ({', '.join(DATASETS)})",
    )


def check_disjoint_splits(sources: Mapping, dataset: str) -> None:
    """No class, and no image, may be in two of train/val/test: validation on test classes
    would select the checkpoint on the test set. Sources without classes (sinusoid: one task
    family, episodes that differ only by seed) have nothing to check."""
    splits = [split for split in ("train", "val", "test") if hasattr(sources.get(split), "class_names")]
    for i, first in enumerate(splits):
        for second in splits[i + 1 :]:
            a, b = sources[first], sources[second]
            shared = sorted(set(a.class_names) & set(b.class_names))
            rows = a.image_rows() & b.image_rows()
            if shared or rows:
                what = f"classes such as {shared[0]!r}" if shared else f"{len(rows)} images"
                raise DataError(
                    f"the '{first}' and '{second}' splits of {dataset} share {what}; "
                    f"make the splits disjoint (check dataset.split_dir or the split files)"
                )


class TrainStream(IterableDataset):
    """Meta-batch i comes from its own generator, so the stream is the same for any worker count.

    Worker w of W yields meta-batches start+w, start+w+W, ...; the DataLoader takes one from each
    worker in turn, which restores the order start, start+1, ...

    Under DDP, process `rank` of `world` keeps its equal share (a contiguous slice) of each
    meta-batch: together the processes see exactly the meta-batch one process would, so the
    averaged meta-gradient is the same. Every process draws the whole meta-batch to stay in
    step with the generator; sampling is cheap next to a meta-step.
    """

    def __init__(
        self,
        source,
        ways: int,
        shots: int,
        queries: int,
        meta_batch_size: int,
        seed: int,
        start: int,
        rank: int = 0,
        world: int = 1,
    ):
        check_meta_batch_split(meta_batch_size, world)
        self.source, self.shape, self.meta_batch_size = source, (ways, shots, queries), meta_batch_size
        self.seed, self.start = seed, start
        share = meta_batch_size // world
        self.tasks = slice(rank * share, (rank + 1) * share)

    def __iter__(self):
        worker = get_worker_info()
        first, step = (self.start, 1) if worker is None else (self.start + worker.id, worker.num_workers)
        for i in count(first, step):
            batch = sample_meta_batch(
                self.source, *self.shape, self.meta_batch_size, episode_generator(self.seed, "train", i)
            )
            yield Episode(*(part[self.tasks] for part in batch))


class FixedEpisodes(Dataset):
    """`length` evaluation episodes, episode j always drawn from the (seed, split, j) generator."""

    def __init__(self, source, ways: int, shots: int, queries: int, length: int, seed: int, split: str):
        self.source, self.shape, self.length = source, (ways, shots, queries), length
        self.seed, self.split = seed, split

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, j: int) -> Episode:
        return self.source.sample(*self.shape, episode_generator(self.seed, self.split, j))


class EpisodicDataModule(L.LightningDataModule):
    def __init__(
        self,
        dataset: Mapping,
        data_dir: str | Path,
        cache_dir: str | Path,
        ways: int,
        shots: int,
        queries: int,
        meta_batch_size: int,
        test_ways: int,
        test_shots: int,
        test_queries: int,
        val_episodes: int,
        test_episodes: int,
        seed: int,
        eval_seed: int,
        eval_batch_size: int,
        num_workers: int = 0,
        trainval: bool = False,
    ):
        super().__init__()
        for name, value, least in (
            ("meta_batch_size", meta_batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("val_episodes", val_episodes, 0),
            ("test_episodes", test_episodes, 0),
            ("num_workers", num_workers, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{name}={value!r} is invalid; use an integer >= {least}")
        if not isinstance(trainval, bool):
            raise ConfigError(f"trainval={trainval!r} is invalid; use true or false")
        self.dataset_cfg = dict(dataset)
        self.data_dir, self.cache_dir = Path(data_dir), Path(cache_dir)
        self.ways, self.shots, self.queries, self.meta_batch_size = ways, shots, queries, meta_batch_size
        self.test_ways, self.test_shots, self.test_queries = test_ways, test_shots, test_queries
        self.val_episodes, self.test_episodes, self.eval_batch_size = val_episodes, test_episodes, eval_batch_size
        self.seed, self.eval_seed, self.num_workers = seed, eval_seed, num_workers
        # Training on the val classes leaves nothing to validate on: no validation runs.
        self.trainval = trainval
        self._sources = None

    @property
    def sources(self) -> dict:
        if self._sources is None:  # built once, on first use
            self._sources = build_sources(self.dataset_cfg, self.data_dir, self.cache_dir, self.trainval)
        return self._sources

    def setup(self, stage: str | None = None) -> None:
        """Build the sources and check the splits that `stage` uses, so bad settings fail before training."""
        for split in SPLITS_CHECKED[stage]:
            if self._length(split) != 0:  # a split with 0 evaluation episodes is never sampled
                self.sources[split].check(*self._shape(split), split)

    @property
    def task_type(self) -> str:
        return self.sources["train"].task_type

    @property
    def input_shape(self) -> tuple:
        # Every split of a dataset shares one image array, so even an empty train split knows the shape.
        return self.sources["train"].input_shape

    def train_dataloader(self) -> DataLoader:
        # Resuming from a checkpoint continues the stream: in manual optimization global_step
        # counts outer steps, i.e. meta-batches consumed.
        start = self.trainer.global_step if self.trainer is not None else 0
        stream = TrainStream(
            self.sources["train"],
            *self._shape("train"),
            self.meta_batch_size,
            self.seed,
            start,
            *self._rank_and_world(),
        )
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test", self.num_workers)

    def example_batch(self, split: str = "train", tasks: int | None = None) -> Episode:
        """One meta-batch of `split` (the first the loaders give), e.g. to log an image grid;
        `tasks`: only that many of the training batch's tasks (to measure one before a large batch)."""
        if split == "train":
            return sample_meta_batch(
                self.sources["train"],
                *self._shape("train"),
                self.meta_batch_size if tasks is None else tasks,
                episode_generator(self.seed, "train", 0),
            )
        return next(iter(self._eval_loader(split, num_workers=0)))

    def _eval_loader(self, split: str, num_workers: int) -> DataLoader:
        episodes = FixedEpisodes(self.sources[split], *self._shape(split), self._length(split), self.eval_seed, split)
        return DataLoader(
            episodes,
            batch_sampler=self.eval_batches(split),
            num_workers=num_workers,
            persistent_workers=False,
            pin_memory=False,
        )

    def eval_batches(self, split: str) -> list[list[int]]:
        """The indices of the fixed `split` episodes this process evaluates, batch by batch.

        Under DDP each process evaluates every world-th batch, with no padding or repeats: the
        learner gathers the per-episode values, so each episode counts exactly once (Lightning's
        distributed sampler would pad with repeated episodes), and puts them back in episode
        order by these indices.
        """
        length = self._length(split) or 0
        rank, world = self._rank_and_world()
        batches = [
            list(range(b, min(b + self.eval_batch_size, length))) for b in range(0, length, self.eval_batch_size)
        ]
        return batches[rank::world]

    def _rank_and_world(self) -> tuple[int, int]:
        """This process's DDP rank and the process count; (0, 1) outside a distributed Trainer."""
        return getattr(self.trainer, "global_rank", 0), getattr(self.trainer, "world_size", 1)

    def _shape(self, split: str) -> tuple[int, int, int]:
        if split == "train":
            return self.ways, self.shots, self.queries
        return self.test_ways, self.test_shots, self.test_queries  # val episodes are shaped like the test's

    def _length(self, split: str) -> int | None:
        return {"val": 0 if self.trainval else self.val_episodes, "test": self.test_episodes}.get(split)
