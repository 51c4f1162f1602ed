"""Episodic data: shapes, label semantics, splits, determinism, caching and every error path."""

import csv
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import metalab.data.image_cache as image_cache
from metalab.data import Episode, EpisodicDataModule, build_sources, episode_generator, sample_meta_batch
from metalab.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- synthetic image folders
# Every image is one flat colour: red encodes its class, green its number within the class,
# so pixel values alone say where an image came from (robust to JPEG and resizing).
RED_STEP, GREEN_STEP = 30, 20


def write_image(path: Path, class_id: int, number: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), (15 + RED_STEP * class_id, 10 + GREEN_STEP * number, 128)).save(path)


def identities(x: torch.Tensor) -> list[tuple[int, int]]:
    """(class id, image number) of each image in [N, 3, H, W]."""
    means = x.mean(dim=(2, 3)) * 255
    classes = torch.round((means[:, 0] - 15) / RED_STEP).long().tolist()
    numbers = torch.round((means[:, 1] - 10) / GREEN_STEP).long().tolist()
    return list(zip(classes, numbers))


def class_folders(root: Path, classes: range, per_class: int = 6) -> None:
    for c in classes:
        for i in range(per_class):
            write_image(root / f"class{c}" / (f"img{i}.JPG" if i == 0 else f"img{i}.png"), c, i)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    class_folders(root, range(8))
    return root


def folder_cfg(root: Path, **overrides) -> dict:
    return {
        "name": "image_folder",
        "root": str(root),
        "image_size": 8,
        "channels": 3,
        "invert": False,
        "split_dir": None,
        "split_fractions": {"train": 0.5, "val": 0.25, "test": 0.25},
        "split_seed": 0,
        **overrides,
    }


def assert_classification_episode(episode: Episode, ways: int, shots: int, queries: int, shape: tuple) -> None:
    assert episode.support_x.shape == (ways * shots, *shape) and episode.support_x.dtype == torch.float32
    assert episode.query_x.shape == (ways * queries, *shape) and episode.query_x.dtype == torch.float32
    assert episode.support_y.dtype == episode.query_y.dtype == torch.int64
    assert torch.equal(episode.support_y, torch.arange(ways).repeat_interleave(shots))
    assert torch.equal(episode.query_y, torch.arange(ways).repeat_interleave(queries))
    for x in (episode.support_x, episode.query_x):
        assert 0.0 <= x.min() and x.max() <= 1.0


def assert_labels_follow_classes(episode: Episode) -> None:
    """Each label's support and query images come from one class, a different one per label, none twice."""
    support, query = identities(episode.support_x), identities(episode.query_x)
    assert len(set(support + query)) == len(support + query)
    class_of_label = {}
    for (class_id, _), label in zip(support + query, torch.cat([episode.support_y, episode.query_y]).tolist()):
        assert class_of_label.setdefault(label, class_id) == class_id
    assert len(set(class_of_label.values())) == len(class_of_label)


def label_to_class(episode: Episode) -> tuple[int, ...]:
    ids = identities(episode.support_x)
    return tuple(ids[i][0] for i in range(0, len(ids), len(ids) // (int(episode.support_y.max()) + 1)))


# ---------------------------------------------------------------- image_folder
def test_image_folder_fraction_splits(folder, tmp_path):
    sources = build_sources(folder_cfg(folder), tmp_path, tmp_path / "cache")
    names = {split: set(source.class_names) for split, source in sources.items()}
    assert [len(names[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    assert names["train"] | names["val"] | names["test"] == {f"class{c}" for c in range(8)}
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])

    source = sources["train"]
    assert source.task_type == "classification" and source.input_shape == (3, 8, 8)
    generator = torch.Generator().manual_seed(0)
    assignments = set()
    for _ in range(10):
        episode = source.sample(3, 2, 4, generator)
        assert_classification_episode(episode, 3, 2, 4, (3, 8, 8))
        assert_labels_follow_classes(episode)
        assert {c for c, _ in identities(episode.query_x)} <= {int(n[5:]) for n in names["train"]}
        assignments.add(label_to_class(episode))
    assert len(assignments) > 1  # labels are assigned afresh per episode


def test_image_folder_grayscale_and_zero_fraction(folder, tmp_path):
    cfg = folder_cfg(folder, channels=1, split_fractions={"train": 0.75, "val": 0.0, "test": 0.25})
    sources = build_sources(cfg, tmp_path, tmp_path / "cache")
    assert len(sources["val"].class_names) == 0  # allowed until checked
    episode = sources["train"].sample(2, 1, 1, torch.Generator().manual_seed(0))
    assert episode.support_x.shape == (2, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"'val'.*split_fractions\.val"):
        sources["val"].check(2, 1, 1, "val")


def test_image_folder_split_subfolders(tmp_path):
    root = tmp_path / "images"
    class_folders(root / "train", range(0, 4))
    class_folders(root / "test", range(4, 7))
    sources = build_sources(folder_cfg(root), tmp_path, tmp_path / "cache")
    assert sorted(sources["train"].class_names) == ["class0", "class1", "class2", "class3"]
    assert sorted(sources["test"].class_names) == ["class4", "class5", "class6"]
    sources["test"].check(3, 1, 5, "test")
    episode = sources["test"].sample(3, 1, 5, torch.Generator().manual_seed(1))
    assert_classification_episode(episode, 3, 1, 5, (3, 8, 8))
    assert_labels_follow_classes(episode)
    with pytest.raises(ConfigError, match=r"'val' split of image_folder has no classes.*val"):
        sources["val"].check(2, 1, 1, "val")


def test_mini_imagenet_layout_with_split_csvs(tmp_path):
    root, split_dir = tmp_path / "mini" / "images", tmp_path / "mini" / "splits"
    split_dir.mkdir(parents=True)
    splits = {"train": range(0, 4), "val": range(4, 6), "test": range(6, 8)}
    for split, classes in splits.items():
        with (split_dir / f"{split}.csv").open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["filename", "label"])
            for c in classes:
                label = f"n{c:08d}"
                for i in range(6):
                    filename = f"{label}{i:08d}.jpg"
                    # Flat like miniImageNet, except one class kept in its own folder (also accepted).
                    write_image(root / label / filename if c == 5 else root / filename, c, i)
                    writer.writerow([filename, label])
    cfg = {"name": "mini_imagenet", "root": str(root), "split_dir": str(split_dir), "image_size": 8, "channels": 3}
    sources = build_sources(cfg, tmp_path, tmp_path / "cache")
    for split, classes in splits.items():
        assert sources[split].class_names == [f"n{c:08d}" for c in classes]
    episode = sources["val"].sample(2, 3, 3, torch.Generator().manual_seed(0))
    assert_classification_episode(episode, 2, 3, 3, (3, 8, 8))
    assert_labels_follow_classes(episode)
    assert {c for c, _ in identities(episode.support_x)} == {4, 5}


def test_image_folder_errors(folder, tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        build_sources(folder_cfg(tmp_path / "nowhere"), tmp_path, tmp_path / "cache")
    with pytest.raises(DataError, match=r"mini_imagenet[/\\]images.*dataset\.root"):
        build_sources({"name": "mini_imagenet", "image_size": 8, "channels": 3}, tmp_path, tmp_path / "cache")
    with pytest.raises(ConfigError, match="channels=2"):
        build_sources(folder_cfg(folder, channels=2), tmp_path, tmp_path / "cache")
    with pytest.raises(ConfigError, match="dataset.name='cifar'"):
        build_sources({"name": "cifar"}, tmp_path, tmp_path / "cache")

    train = build_sources(folder_cfg(folder), tmp_path, tmp_path / "cache")["train"]
    with pytest.raises(ConfigError, match=r"ways=5 but .* has 4 classes; choose ways <= 4"):
        train.check(5, 1, 1, "train")
    with pytest.raises(ConfigError, match=r"shots\+queries=4\+3=7 .* only 6 images"):
        train.check(2, 4, 3, "train")
    with pytest.raises(ConfigError, match="shots=0"):
        train.check(2, 0, 3, "train")

    empty = tmp_path / "empty"
    (empty / "class0").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images found under .*empty"):
        build_sources(folder_cfg(empty), tmp_path, tmp_path / "cache")

    (folder / "class3" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"broken\.png"):
        build_sources(folder_cfg(folder), tmp_path, tmp_path / "cache2")


def test_image_folder_cache(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = build_sources(folder_cfg(folder), tmp_path, cache)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(image_cache, "decode_all", no_decoding)
    second = build_sources(folder_cfg(folder), tmp_path, cache)
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert all(
        torch.equal(a, b)
        for a, b in zip(first["train"].sample(2, 2, 2, generator()), second["train"].sample(2, 2, 2, generator()))
    )
    with pytest.raises(AssertionError, match="decoded again"):  # a changed setting rebuilds
        build_sources(folder_cfg(folder, image_size=10), tmp_path, cache)
    write_image(folder / "class0" / "img1.png", 7, 7)  # so does a changed file
    with pytest.raises(AssertionError, match="decoded again"):
        build_sources(folder_cfg(folder), tmp_path, cache)


# ---------------------------------------------------------------- sinusoid
SINUSOID = {"name": "sinusoid", "amplitude": [0.1, 5.0], "phase": [0.0, math.pi], "x_range": [-5.0, 5.0]}


def test_sinusoid_tasks_lie_in_the_family(tmp_path):
    sources = build_sources(SINUSOID, tmp_path, tmp_path)
    source = sources["train"]
    assert source.task_type == "regression" and source.input_shape == (1,)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        episode = source.sample(1, 5, 10, generator)
        assert [tuple(t.shape) for t in episode] == [(5, 1), (5, 1), (10, 1), (10, 1)]
        assert all(t.dtype == torch.float32 for t in episode)
        x, y = torch.cat([episode.support_x, episode.query_x]), torch.cat([episode.support_y, episode.query_y])
        assert x.abs().max() <= 5.0 and y.abs().max() <= 5.0
        # y = A sin(x - p) = a sin x + b cos x with a = A cos p, b = -A sin p: recover A and p.
        a, b = torch.linalg.lstsq(torch.cat([x.sin(), x.cos()], 1).double(), y.double()).solution.flatten()
        amplitude, phase = math.hypot(a, b), math.atan2(-b, a)
        assert 0.1 - 1e-4 <= amplitude <= 5.0 + 1e-4 and -1e-4 <= phase <= math.pi + 1e-4
    with pytest.raises(ConfigError, match="queries=0"):
        source.check(1, 5, 0, "train")
    with pytest.raises(ConfigError, match="amplitude"):
        build_sources({**SINUSOID, "amplitude": [5.0, 0.1]}, tmp_path, tmp_path)


# ---------------------------------------------------------------- data module
def datamodule(cfg: dict, tmp_path: Path, **overrides) -> EpisodicDataModule:
    args = dict(
        dataset=cfg,
        data_dir=tmp_path,
        cache_dir=tmp_path / "cache",
        ways=3,
        shots=1,
        queries=2,
        meta_batch_size=2,
        test_ways=2,
        test_shots=1,
        test_queries=3,
        val_episodes=6,
        test_episodes=5,
        seed=0,
        eval_seed=7,
        eval_batch_size=4,
        num_workers=0,
    )
    dm = EpisodicDataModule(**{**args, **overrides})
    dm.setup("fit")
    return dm


def batches(loader, limit: int | None = None) -> list[Episode]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == limit:
            break
    return out


def same(a: list[Episode], b: list[Episode]) -> bool:
    return len(a) == len(b) and all(torch.equal(s, t) for x, y in zip(a, b) for s, t in zip(x, y))


def test_eval_episodes_are_fixed(folder, tmp_path):
    cfg = folder_cfg(folder)
    dm = datamodule(cfg, tmp_path)
    val, test = batches(dm.val_dataloader()), batches(dm.test_dataloader())
    assert [len(b.support_y) for b in val] == [4, 2] and [len(b.support_y) for b in test] == [4, 1]
    assert isinstance(val[0], Episode) and val[0].support_x.shape == (4, 2, 3, 8, 8)
    assert val[0].query_y.shape == (4, 6)
    assert same(val, batches(datamodule(cfg, tmp_path).val_dataloader()))
    assert same(val, batches(datamodule(cfg, tmp_path, num_workers=2).val_dataloader()))
    assert same(test, batches(datamodule(cfg, tmp_path, num_workers=2).test_dataloader()))
    assert not same(val, batches(datamodule(cfg, tmp_path, eval_seed=8).val_dataloader()))
    assert not torch.equal(val[0].support_x, test[0].support_x)  # val and test are different streams
    for episode in val:
        assert_labels_follow_classes(Episode(*(t[0] for t in episode)))


def test_train_stream_is_resumable_and_worker_independent(folder, tmp_path):
    cfg = folder_cfg(folder)
    dm = datamodule(cfg, tmp_path)
    stream = batches(dm.train_dataloader(), 6)
    assert stream[0].support_x.shape == (2, 3, 3, 8, 8) and stream[0].query_y.shape == (2, 6)
    assert not torch.equal(stream[0].support_x, stream[1].support_x)
    assert same(stream, batches(datamodule(cfg, tmp_path, num_workers=2).train_dataloader(), 6))
    resumed = datamodule(cfg, tmp_path)
    resumed.trainer = SimpleNamespace(global_step=4)
    assert same(stream[4:], batches(resumed.train_dataloader(), 2))
    # The shared helper gives the same meta-batch as the stream.
    expected = sample_meta_batch(dm.sources["train"], 3, 1, 2, 2, episode_generator(0, "train", 1))
    assert same([expected], stream[1:2])
    assert same([dm.example_batch()], stream[:1])
    assert dm.example_batch("test").support_x.shape == (4, 2, 3, 8, 8)


def test_setup_checks_only_the_splits_a_stage_uses(folder, tmp_path):
    cfg = folder_cfg(folder)
    dm = EpisodicDataModule(
        cfg,
        tmp_path,
        tmp_path / "cache",
        ways=10,
        shots=1,
        queries=1,
        meta_batch_size=2,
        test_ways=2,
        test_shots=1,
        test_queries=1,
        val_episodes=2,
        test_episodes=2,
        seed=0,
        eval_seed=0,
        eval_batch_size=2,
    )
    dm.setup("test")  # an evaluation-only run ignores the impossible train setting
    with pytest.raises(ConfigError, match=r"ways=10 .*'train'.* has 4 classes"):
        dm.setup("fit")
    with pytest.raises(ConfigError, match="meta_batch_size=0"):
        datamodule(cfg, tmp_path, meta_batch_size=0)


def test_sinusoid_datamodule(tmp_path):
    dm = datamodule(SINUSOID, tmp_path, shots=5, queries=7, test_shots=10, test_queries=3)
    assert dm.task_type == "regression" and dm.input_shape == (1,)
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (2, 5, 1) and batch.query_y.shape == (2, 7, 1)
    assert next(iter(dm.val_dataloader())).support_y.shape == (4, 10, 1)


def test_trainval_trains_on_train_and_val_classes_and_skips_validation(folder, tmp_path):
    plain, joined = datamodule(folder_cfg(folder), tmp_path), datamodule(folder_cfg(folder), tmp_path, trainval=True)
    train, val = plain.sources["train"], plain.sources["val"]
    assert joined.sources["train"].class_names == train.class_names + val.class_names
    assert joined.sources["train"].image_rows() == train.image_rows() | val.image_rows()
    assert joined.sources["val"].class_names == val.class_names  # test and val splits unchanged
    assert joined.sources["test"].class_names == plain.sources["test"].class_names
    assert len(joined.val_dataloader()) == 0 and len(plain.val_dataloader()) > 0  # no validation
    assert len(joined.test_dataloader()) == len(plain.test_dataloader())
    with pytest.raises(ConfigError, match=r"trainval=true .*dataset=sinusoid has no class splits"):
        datamodule(SINUSOID, tmp_path, trainval=True)
    with pytest.raises(ConfigError, match=r"trainval='yes' is invalid"):
        datamodule(folder_cfg(folder), tmp_path, trainval="yes")


# ---------------------------------------------------------------- Omniglot (real data)
def test_missing_omniglot_archives(tmp_path):
    with pytest.raises(DataError, match=r"images_background\.zip.*images_evaluation\.zip.*METALAB_DATA_DIR"):
        build_sources({"name": "omniglot", "protocol": "vinyals"}, tmp_path, tmp_path / "cache")


def fake_urlretrieve(sources: dict[str, Path]):
    """Stands in for the network: 'downloads' a local file by its archive name."""

    def urlretrieve(url, target):
        Path(target).write_bytes(sources[url.rsplit("/", 1)[-1]].read_bytes())

    return urlretrieve


def test_download_keeps_only_archives_with_the_published_checksum(tmp_path, monkeypatch):
    import metalab.data.omniglot as omniglot

    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"not the archive")
    monkeypatch.setattr(
        omniglot.urllib.request,
        "urlretrieve",
        fake_urlretrieve({"images_background.zip": fake, "images_evaluation.zip": fake}),
    )
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="not the published 68d2efa1b9178cc56df9314c21c6e718"):
        build_sources({"name": "omniglot", "protocol": "lake", "download": True}, data_dir, tmp_path / "cache")
    assert list((data_dir / "omniglot").iterdir()) == []  # nothing half-written is left behind

    def offline(url, target):
        raise omniglot.urllib.error.URLError("no network")

    monkeypatch.setattr(omniglot.urllib.request, "urlretrieve", offline)
    with pytest.raises(DataError, match="could not download .*images_background.zip.*by hand"):
        build_sources({"name": "omniglot", "protocol": "lake", "download": True}, data_dir, tmp_path / "cache")


@pytest.mark.data
def test_download_then_load(omniglot_dir, tmp_path, monkeypatch):
    import hashlib

    import metalab.data.omniglot as omniglot

    archives = {name: omniglot_dir / name for name in omniglot.ARCHIVES}
    # The shared archives are re-zipped copies: accept their digests in place of the official ones.
    monkeypatch.setattr(
        omniglot, "OFFICIAL_MD5", {n: hashlib.md5(p.read_bytes()).hexdigest() for n, p in archives.items()}
    )
    monkeypatch.setattr(omniglot.urllib.request, "urlretrieve", fake_urlretrieve(archives))
    sources = build_sources(
        {"name": "omniglot", "protocol": "lake", "download": True, "image_size": 28},
        tmp_path / "data",
        tmp_path / "cache",
    )
    assert (len(sources["train"].class_names), len(sources["test"].class_names)) == (813, 659)


@pytest.fixture(scope="module")
def vinyals(omniglot_dir, cache_dir):
    return build_sources(
        {"name": "omniglot", "protocol": "vinyals"},  # the rest from conf/dataset/omniglot.yaml
        omniglot_dir.parent,
        cache_dir,
    )


@pytest.mark.data
def test_omniglot_vinyals(vinyals):
    names = {split: set(source.class_names) for split, source in vinyals.items()}
    assert [len(vinyals[s].class_names) for s in ("train", "val", "test")] == [4112, 688, 1692]
    assert [len(names[s]) for s in ("train", "val", "test")] == [4112, 688, 1692]
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    assert "Angelic/character01/rot090" in names["train"]

    train = vinyals["train"]
    assert train.task_type == "classification" and train.input_shape == (1, 28, 28)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        episode = train.sample(5, 1, 15, generator)
        assert_classification_episode(episode, 5, 1, 15, (1, 28, 28))
        images = torch.cat([episode.support_x, episode.query_x]).flatten(1)
        assert len(torch.unique(images, dim=0)) == len(images)  # no drawing twice
        assert episode.support_x.mean() < 0.5  # inverted: bright ink on a dark background


@pytest.mark.data
def test_omniglot_trainval_is_the_authors_trainval_list(omniglot_dir, cache_dir, vinyals):
    joined = build_sources({"name": "omniglot", "protocol": "vinyals"}, omniglot_dir.parent, cache_dir, trainval=True)
    listed = (omniglot_dir / "splits" / "vinyals" / "trainval.txt").read_text().split()
    assert sorted(joined["train"].class_names) == sorted(listed) and len(listed) == 4800
    # A val class is shown as the val split shows it: the same images at the same rotation.
    name = vinyals["val"].class_names[5]
    index = joined["train"].class_names.index(name)
    assert torch.equal(joined["train"].class_images(index), vinyals["val"].class_images(5))


@pytest.mark.data
def test_omniglot_vinyals_rotations(vinyals):
    train = vinyals["train"]
    index = {name: i for i, name in enumerate(train.class_names)}
    upright = train.class_images(index["Angelic/character01/rot000"])
    for k, name in enumerate(("rot090", "rot180", "rot270"), start=1):
        rotated = train.class_images(index[f"Angelic/character01/{name}"])
        assert torch.equal(rotated, torch.rot90(upright, k, dims=(-2, -1)))
    # A one-way episode holding all 20 drawings shows exactly its class's (rotated) images.
    for seed in range(4):
        episode = train.sample(1, 19, 1, torch.Generator().manual_seed(seed))
        drawn = torch.cat([episode.support_x, episode.query_x]).mul(255).round().to(torch.uint8)
        chosen = int(torch.randperm(len(train.class_names), generator=torch.Generator().manual_seed(seed))[0])
        expected = train.class_images(chosen)
        key = lambda images: sorted(bytes(image.flatten().tolist()) for image in images)  # noqa: E731
        assert key(drawn) == key(expected)


@pytest.mark.data
def test_omniglot_lake(data_dir, cache_dir):
    sources = build_sources(
        {"name": "omniglot", "protocol": "lake", "image_size": 28, "invert": True, "verify_checksums": True},
        data_dir,
        cache_dir,
    )
    names = {split: set(source.class_names) for split, source in sources.items()}
    # 964 background characters, of which the last 5 alphabets (151 characters) validate.
    assert [len(names[s]) for s in ("train", "val", "test")] == [813, 151, 659]
    alphabets = {split: {name.split("/")[0] for name in names[split]} for split in names}
    assert alphabets["val"] == {
        "Ojibwe_(Canadian_Aboriginal_Syllabics)",
        "Sanskrit",
        "Syriac_(Estrangelo)",
        "Tagalog",
        "Tifinagh",
    }
    assert not (alphabets["train"] & alphabets["val"] or alphabets["val"] & alphabets["test"])
    assert all(name.count("/") == 1 for name in names["train"])  # characters, no rotations
    episode = sources["test"].sample(20, 1, 5, torch.Generator().manual_seed(0))
    assert_classification_episode(episode, 20, 1, 5, (1, 28, 28))


@pytest.mark.data
def test_omniglot_check_errors(vinyals):
    with pytest.raises(ConfigError, match=r"ways=5000 .*'train'.* 4112 classes; choose ways <= 4112"):
        vinyals["train"].check(5000, 1, 1, "train")
    limit = r"test_shots\+test_queries=15\+6=21 .* only 20 images; choose test_shots\+test_queries <= 20"
    with pytest.raises(ConfigError, match=limit):
        vinyals["test"].check(5, 15, 6, "test")
    with pytest.raises(ConfigError, match=r"shots\+queries=15\+6=21 .*; choose shots\+queries <= 20, e.g. shots=15"):
        vinyals["train"].check(5, 15, 6, "train")


@pytest.mark.data
def test_omniglot_bad_checksum_and_missing_splits(omniglot_dir, cache_dir, tmp_path):
    fake = tmp_path / "data" / "omniglot"
    fake.mkdir(parents=True)
    for name in ("images_background.zip", "images_evaluation.zip"):
        (fake / name).symlink_to(omniglot_dir / name)
    (fake / "SHA256SUMS").write_text(f"{'0' * 64}  images_background.zip\n")
    with pytest.raises(DataError, match=rf"images_background\.zip.*{'0' * 64}.*got [0-9a-f]{{64}}"):
        build_sources({"name": "omniglot", "protocol": "vinyals"}, fake.parent, cache_dir)
    (fake / "SHA256SUMS").unlink()
    with pytest.raises(DataError, match=r"splits[/\\]vinyals[/\\]train\.txt"):
        build_sources({"name": "omniglot", "protocol": "vinyals"}, fake.parent, cache_dir)


@pytest.mark.data
def test_omniglot_cache_is_reused(vinyals, data_dir, cache_dir, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(image_cache, "decode_all", no_decoding)
    cfg = {"name": "omniglot", "protocol": "vinyals", "image_size": 28, "invert": True, "verify_checksums": True}
    again = build_sources(cfg, data_dir, cache_dir)  # no_decoding fails the test if the cache is not used
    generator = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert all(
        torch.equal(a, b)
        for a, b in zip(vinyals["val"].sample(5, 1, 1, generator()), again["val"].sample(5, 1, 1, generator()))
    )
    with pytest.raises(AssertionError, match="decoded again"):
        build_sources({**cfg, "image_size": 14}, data_dir, cache_dir)


@pytest.mark.data
def test_omniglot_datamodule_matches_across_workers(data_dir, cache_dir):
    cfg = {"name": "omniglot", "protocol": "vinyals", "image_size": 28, "invert": True, "verify_checksums": True}
    dm, dm2 = (
        datamodule(
            cfg,
            data_dir,
            cache_dir=cache_dir,
            num_workers=w,
            ways=20,
            shots=5,
            queries=15,
            test_ways=5,
            test_shots=1,
            test_queries=15,
        )
        for w in (0, 2)
    )
    assert dm.input_shape == (1, 28, 28) and dm.task_type == "classification"
    assert same(batches(dm.train_dataloader(), 3), batches(dm2.train_dataloader(), 3))
    assert same(batches(dm.val_dataloader()), batches(dm2.val_dataloader()))
    with pytest.raises(ConfigError, match="ways=5000"):
        datamodule(cfg, data_dir, cache_dir=cache_dir, ways=5000)


def assert_pairwise_disjoint(sources: dict) -> None:
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        a, b = sources[first], sources[second]
        assert not set(a.class_names) & set(b.class_names), (first, second)
        assert not a.image_rows() & b.image_rows(), (first, second)


@pytest.mark.data
@pytest.mark.parametrize("protocol", ["vinyals", "finn", "sung", "lake"])
def test_omniglot_splits_are_pairwise_disjoint(protocol, data_dir, cache_dir):
    sources = build_sources({"name": "omniglot", "protocol": protocol, "image_size": 28}, data_dir, cache_dir)
    assert_pairwise_disjoint(sources)
    characters = {split: {name.rsplit("/rot", 1)[0] for name in s.class_names} for split, s in sources.items()}
    assert not (
        characters["train"] & characters["val"]
        or characters["train"] & characters["test"]
        or characters["val"] & characters["test"]
    )  # no character in two splits, at any rotation


@pytest.mark.data
@pytest.mark.parametrize("protocol", ["finn", "sung"])
def test_finn_and_sung_split_characters_pooled_from_both_archives(protocol, data_dir, cache_dir):
    """Finn's and Sung's code shuffle all 1,623 characters together: 1,100 / 100 / 423 with every
    rotation of a character on its side, and test characters from background alphabets too."""
    sources = build_sources({"name": "omniglot", "protocol": protocol, "image_size": 28}, data_dir, cache_dir)
    characters = {split: {name.rsplit("/rot", 1)[0] for name in s.class_names} for split, s in sources.items()}
    assert {split: len(chars) for split, chars in characters.items()} == {"train": 1100, "val": 100, "test": 423}
    assert {split: len(s.class_names) for split, s in sources.items()} == {"train": 4400, "val": 400, "test": 1692}
    background = {f"{a}/{c}" for a, c in (n.split("/")[:2] for n in sources["train"].class_names)}
    vinyals = build_sources({"name": "omniglot", "protocol": "vinyals", "image_size": 28}, data_dir, cache_dir)
    vinyals_train = {name.rsplit("/rot", 1)[0] for name in vinyals["train"].class_names}
    # Not the alphabet-disjoint split: test characters share alphabets with training ones.
    assert {c.split("/")[0] for c in characters["test"]} & {c.split("/")[0] for c in background}
    assert characters["test"] & vinyals_train


@pytest.mark.data
def test_test_unseen_by_tests_on_the_classes_both_protocols_hold_out(data_dir, cache_dir):
    """What the split alone is worth: a checkpoint trained on vinyals and one trained on finn
    meet the same test classes, in the same order (so the same seeded episodes), none of which
    either saw in training or validation."""
    sources = {
        (protocol, unseen_by): build_sources(
            {"name": "omniglot", "protocol": protocol, "test_unseen_by": unseen_by, "image_size": 28},
            data_dir,
            cache_dir,
        )
        for protocol, unseen_by in (("vinyals", None), ("finn", None), ("vinyals", "finn"), ("finn", "vinyals"))
    }
    vinyals, finn = sources["vinyals", None], sources["finn", None]
    common = sources["vinyals", "finn"]["test"]
    assert common.class_names == sources["finn", "vinyals"]["test"].class_names
    assert common.image_rows() == sources["finn", "vinyals"]["test"].image_rows()
    assert set(common.class_names) == set(vinyals["test"].class_names) & set(finn["test"].class_names)
    assert 200 < len(common.class_names) < len(vinyals["test"].class_names)
    seen = {name for s in (vinyals, finn) for split in ("train", "val") for name in s[split].class_names}
    assert not set(common.class_names) & seen
    assert sources["vinyals", "finn"]["train"].class_names == vinyals["train"].class_names  # only test is cut
    assert "test unseen by finn" in common.dataset
    for protocol, unseen_by, words in (("vinyals", "vinyals", "another of"), ("lake", "finn", "rotated protocols")):
        with pytest.raises(ConfigError, match=words):
            build_sources(
                {"name": "omniglot", "protocol": protocol, "test_unseen_by": unseen_by, "image_size": 28},
                data_dir,
                cache_dir,
            )


@pytest.mark.data
def test_binary_nearest_gives_finns_black_and_white_images(data_dir, tmp_path):
    """Finn's resize script asks Pillow for LANCZOS on the archives' 1-bit PNGs, and gets nearest
    neighbour: `dataset.resample=binary_nearest` gives those very pixels, from the cache as from
    load_learner's transform; the default stays greyscale LANCZOS."""
    import io
    import zipfile

    archive = data_dir / "omniglot" / "images_background.zip"
    with zipfile.ZipFile(archive) as zf:
        member = sorted(n for n in zf.namelist() if n.endswith(".png"))[0]
        raw = zf.read(member)
    with Image.open(io.BytesIO(raw)) as original:
        assert original.mode == "1"
        finn = np.asarray(original.resize((28, 28), Image.Resampling.LANCZOS), dtype=np.uint8) * 255
    ours = image_cache.decode_image(io.BytesIO(raw), member, 28, 1, False, "binary_nearest")[0]
    np.testing.assert_array_equal(ours, finn)
    lanczos = image_cache.decode_image(io.BytesIO(raw), member, 28, 1, False)[0]
    assert len(np.unique(lanczos)) > 2 and set(np.unique(ours)) == {0, 255}
    sources = build_sources(
        {"name": "omniglot", "protocol": "finn", "resample": "binary_nearest", "invert": False, "image_size": 28},
        data_dir,
        tmp_path / "cache",
    )
    character = member.split("/")[1] + "/" + member.split("/")[2]
    split = next(s for s in sources.values() if f"{character}/rot000" in s.class_names)
    first_drawing = split.images[split._starts[split.class_names.index(f"{character}/rot000")]]
    np.testing.assert_array_equal(first_drawing[0], finn)
    with pytest.raises(ConfigError, match="dataset.resample='bicubic'"):
        build_sources({"name": "omniglot", "resample": "bicubic"}, data_dir, tmp_path / "cache")


@pytest.mark.data
def test_committed_finn_split_is_what_its_script_writes(data_dir):
    script = REPO / "scripts" / "make_omniglot_splits.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check", "--data-dir", str(data_dir)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_folder_and_mini_imagenet_splits_are_pairwise_disjoint(folder, tmp_path, data_dir):
    assert_pairwise_disjoint(build_sources(folder_cfg(folder), tmp_path, tmp_path / "cache"))
    by_folders = tmp_path / "by_folders"
    for split, classes in {"train": range(0, 3), "val": range(3, 5), "test": range(5, 7)}.items():
        class_folders(by_folders / split, classes)
    assert_pairwise_disjoint(
        build_sources({"name": "image_folder", "root": str(by_folders), "image_size": 8}, tmp_path, tmp_path / "cache2")
    )
    ravi = data_dir / "mini_imagenet" / "splits" / "ravi"  # miniImageNet's own split files, when present
    if ravi.is_dir():
        labels = {
            split: {row["label"] for row in csv.DictReader((ravi / f"{split}.csv").open())}
            for split in ("train", "val", "test")
        }
        assert [len(labels[s]) for s in ("train", "val", "test")] == [64, 16, 20]
        assert not (
            labels["train"] & labels["val"] or labels["train"] & labels["test"] or labels["val"] & labels["test"]
        )


def test_splits_that_share_a_class_are_refused(tmp_path):
    root, split_dir = tmp_path / "images", tmp_path / "splits"
    split_dir.mkdir(parents=True)
    for split, classes in {"train": [0, 1], "val": [2, 3], "test": [3, 4]}.items():  # class 3 in val and test
        with (split_dir / f"{split}.csv").open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["filename", "label"])
            for c in classes:
                for i in range(4):
                    write_image(root / f"c{c}_{i}.png", c, i)
                    writer.writerow([f"c{c}_{i}.png", f"class{c}"])
    cfg = {"name": "image_folder", "root": str(root), "split_dir": str(split_dir), "image_size": 8}
    with pytest.raises(DataError, match=r"'val' and 'test' splits of image_folder share classes such as 'class3'"):
        build_sources(cfg, tmp_path, tmp_path / "cache")
