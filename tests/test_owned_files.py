"""Nothing outside a run is touched: paths read from a checkpoint, and files in a shared cache.

A checkpoint is a file from anywhere. Its callback state names the earlier best and last
checkpoints, which Lightning deletes when a better one is saved; those paths must stay inside
the run's checkpoint folder, links resolved. The image cache is written where other users may
plant links (a shared METALAB_CACHE_DIR); its writes never follow them.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from preloaded_cli import resumed, trained_briefly

from metalab.callbacks import ResumableCheckpoint
from metalab.checkpoint import AtomicCheckpointIO
from metalab.data.image_cache import load_or_build

SHORT = [
    "trainer.val_check_interval=10",
    "val_episodes=4",
    "test_episodes=4",
    "meta_batch_size=2",
    "logger=none",
]


def victim_folder(root: Path) -> Path:
    victim = root / "victim"
    (victim / "inside").mkdir(parents=True)
    (victim / "inside" / "precious.txt").write_text("not metalab's")
    return victim


def craft(checkpoint: Path, out: Path, **record) -> None:
    """A copy of `checkpoint` whose ResumableCheckpoint state says `record` (tensors and strings only:
    it passes the weights_only load)."""
    state = torch.load(checkpoint, weights_only=True)
    (key,) = [k for k in state["callbacks"] if k.startswith("ResumableCheckpoint")]
    state["callbacks"][key].update(record)
    torch.save(state, out)


@pytest.mark.parametrize("via", ["dot-dot", "symlink"])
def test_a_crafted_checkpoint_cannot_make_a_resumed_run_delete_outside_it(tmp_path, cache_dir, data_dir, via):
    first, resumed_dir = tmp_path / "first", tmp_path / "resumed"
    trained_briefly(first, 10, *SHORT, data_dir=data_dir, cache_dir=cache_dir)
    victim = victim_folder(tmp_path)
    if via == "dot-dot":  # Lightning's guard compares path text: <run>/checkpoints/../.. passes it
        named = f"{resumed_dir}/checkpoints/../../victim"
    else:  # a link planted in the resumed run's folder, next to its checkpoints
        planted = first / "checkpoints" / "best-step0.ckpt"
        planted.symlink_to(victim, target_is_directory=True)
        named = str(planted)
    crafted = tmp_path / "crafted.ckpt"
    worst = torch.tensor(1e9)  # val/mse: any validation of the resumed run is "better", so the old best goes
    craft(
        first / "checkpoints" / "last.ckpt",
        crafted,
        dirpath=str(resumed_dir / "checkpoints"),  # what Lightning compares before it restores the whole record
        best_model_path=named,
        kth_best_model_path=named,
        best_k_models={named: worst},
        best_model_score=worst,
        kth_value=worst,
        last_model_path=named,
    )
    run = resumed(resumed_dir, crafted, 30, *SHORT, data_dir=data_dir, cache_dir=cache_dir)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (victim / "inside" / "precious.txt").read_text() == "not metalab's"
    assert "the record is ignored" in run.stderr
    # The resumed run kept its own best and meta-tested it, not the named file.
    tested = json.loads((resumed_dir / "results.json").read_text())["tested_checkpoint"]
    assert Path(tested).parent == resumed_dir / "checkpoints", tested


def test_a_genuine_record_survives_the_resume_and_its_best_is_meta_tested(tmp_path, cache_dir, data_dir):
    first, resumed_dir = tmp_path / "first", tmp_path / "resumed"
    trained_briefly(first, 10, *SHORT, data_dir=data_dir, cache_dir=cache_dir)
    # Resumed to step 15: no validation after the resume, so the best is still the first run's.
    run = resumed(resumed_dir, first / "checkpoints" / "last.ckpt", 15, *SHORT, data_dir=data_dir, cache_dir=cache_dir)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "record is ignored" not in run.stderr
    tested = json.loads((resumed_dir / "results.json").read_text())["tested_checkpoint"]
    assert tested == str(first / "checkpoints" / "best-step10.ckpt")
    assert (first / "checkpoints" / "best-step10.ckpt").is_file()  # another run's file: never removed


def test_only_files_this_run_wrote_are_removed(tmp_path):
    callback = ResumableCheckpoint(dirpath=str(tmp_path / "checkpoints"))
    (tmp_path / "checkpoints").mkdir()
    other = tmp_path / "checkpoints" / "someone-elses.ckpt"
    other.write_bytes(b"x")
    removed = []

    class Strategy:
        def remove_checkpoint(self, path):
            removed.append(path)
            AtomicCheckpointIO().remove_checkpoint(path)

    trainer = type("T", (), {"strategy": Strategy()})()
    callback._remove_checkpoint(trainer, str(other))
    assert other.exists() and removed == []
    mine = tmp_path / "checkpoints" / "mine.ckpt"
    mine.write_bytes(b"y")
    callback._owned.add(str(mine.resolve()))
    callback._remove_checkpoint(trainer, str(mine))
    assert not mine.exists() and removed == [str(mine)]


def test_the_checkpoint_io_removes_one_regular_file_never_a_folder_or_a_links_target(tmp_path):
    victim = victim_folder(tmp_path)
    io = AtomicCheckpointIO()
    io.remove_checkpoint(victim)  # a folder: Lightning's own removes it recursively
    link = tmp_path / "link.ckpt"
    link.symlink_to(victim / "inside" / "precious.txt")
    io.remove_checkpoint(link)
    assert (victim / "inside" / "precious.txt").read_text() == "not metalab's"
    file = tmp_path / "last.ckpt"
    file.write_bytes(b"z")
    io.remove_checkpoint(file)
    assert not file.exists()


# ---------------------------------------------------------------- the image cache
def small_images(root: Path, count: int = 6) -> dict:
    from PIL import Image

    folder = root / "images"
    folder.mkdir()
    for i in range(count):
        Image.fromarray(np.full((8, 8), i * 40, dtype=np.uint8)).save(folder / f"{i}.png")
    return {"group": [(None, str(folder / f"{i}.png")) for i in range(count)]}


def test_links_planted_in_a_shared_cache_are_never_followed(tmp_path):
    groups = small_images(tmp_path)
    cache = tmp_path / "cache"
    target = tmp_path / "target.txt"
    target.write_text("untouched")
    path, _ = load_or_build(cache, "imgs", {"v": 1}, groups, image_size=8, channels=1, invert=False)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    path.unlink()  # the next run rebuilds it: a link waits at the temporary name a build once used
    planted = cache / f".{path.name}.{os.getpid()}.tmp"
    planted.symlink_to(target)
    path, index = load_or_build(cache, "imgs", {"v": 1}, groups, image_size=8, channels=1, invert=False)
    assert target.read_text() == "untouched" and planted.is_symlink()
    assert not path.is_symlink()
    array = np.load(path, mmap_mode="r")
    assert array.shape == (6, 1, 8, 8) and index == {"group": (0, 6)}
    assert [int(array[i].max()) for i in range(6)] == [i * 40 for i in range(6)]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def object_array(path: Path) -> None:
    np.save(path, np.array([{"a": 1}] * 6, dtype=object), allow_pickle=True)


def wrong_shape(path: Path) -> None:
    np.save(path, np.zeros((5, 1, 8, 8), dtype=np.uint8))


@pytest.mark.parametrize(
    "damage",
    [
        ("array", truncate),
        ("array", object_array),
        ("array", wrong_shape),
        ("array", lambda p: p.write_bytes(b"not numpy")),
        ("index", lambda p: p.write_bytes(b"\x93{not json")),
        ("index", lambda p: p.write_text('{"group": [0, 5]}')),
        ("index", lambda p: p.write_text("[1, 2]")),
    ],
    ids=["truncated", "object-array", "wrong-shape", "not-npy", "index-not-json", "index-wrong", "index-a-list"],
)
def test_a_damaged_image_cache_is_rebuilt_with_a_warning(tmp_path, damage, caplog):
    groups = small_images(tmp_path)
    cache = tmp_path / "cache"
    path, _ = load_or_build(cache, "imgs", {"v": 1}, groups, image_size=8, channels=1, invert=False)
    which, harm = damage
    harm(path if which == "array" else path.with_suffix(".json"))
    with caplog.at_level("WARNING", logger="metalab"):
        again, index = load_or_build(cache, "imgs", {"v": 1}, groups, image_size=8, channels=1, invert=False)
    assert again == path and index == {"group": (0, 6)}
    assert "is damaged" in caplog.text and "decoding the images again" in caplog.text
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    assert [int(array[i].max()) for i in range(6)] == [i * 40 for i in range(6)]


# ---------------------------------------------------------------- the archive checksums
def archive_and_sums(tmp_path: Path) -> tuple[Path, Path]:
    import hashlib

    archive = tmp_path / "images_background.zip"
    archive.write_bytes(b"an archive")
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{hashlib.sha256(archive.read_bytes()).hexdigest()}  {archive.name}\n")
    return archive, sums


@pytest.mark.parametrize(
    "content, message",
    [
        (b"deadbeef\n", "line 1 is not '<sha256> <file name>'"),
        (b"zz" * 32 + b"  images_background.zip\n", "line 1 is not '<sha256> <file name>'"),
        (b"\xff\xfe\x00garbage", "cannot read"),
    ],
    ids=["one-field", "not-hex", "not-utf8"],
)
def test_a_malformed_checksum_file_is_one_clear_error(tmp_path, content, message):
    from metalab.data.omniglot import _verified_checksums
    from metalab.errors import DataError

    archive, sums = archive_and_sums(tmp_path)
    sums.write_bytes(content)
    with pytest.raises(DataError, match=f"{sums}.*{message}|{message}.*{sums}"):
        _verified_checksums([archive], sums, tmp_path / "cache")


@pytest.mark.parametrize("memo", [b"\x93{", b"[1]", b'{"%s": "not a record"}'])
def test_a_damaged_checksum_memo_is_hashed_anew(tmp_path, memo):
    from metalab.data.omniglot import _verified_checksums

    archive, sums = archive_and_sums(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "checksums.json").write_bytes(memo.replace(b"%s", str(archive.resolve()).encode()))
    verified = _verified_checksums([archive], sums, cache)
    assert verified == {archive.name: sums.read_text().split()[0]}


# ---------------------------------------------------------------- readers of the data
def omniglot_copy(omniglot_dir: Path, root: Path) -> Path:
    """A data folder whose omniglot/ links to the real archives, with split files of its own."""
    (root / "omniglot").mkdir(parents=True)
    for archive in ("images_background.zip", "images_evaluation.zip"):
        (root / "omniglot" / archive).symlink_to(omniglot_dir / archive)
    shutil.copytree(omniglot_dir / "splits", root / "omniglot" / "splits")
    return root


@pytest.mark.data
def test_an_unreadable_archive_is_one_line_naming_it(omniglot_dir, tmp_path, monkeypatch):
    import zipfile

    import metalab.data.omniglot as omniglot
    from metalab.data import build_sources
    from metalab.errors import DataError

    data = omniglot_copy(omniglot_dir, tmp_path / "data")
    archive = data / "omniglot" / "images_background.zip"

    class Refused(zipfile.ZipFile):  # what open() raises for a file this user may not read
        def __init__(self, file, *args, **kwargs):
            if str(file) == str(archive):
                raise PermissionError(13, "Permission denied", str(file))
            super().__init__(file, *args, **kwargs)

    monkeypatch.setattr(omniglot.zipfile, "ZipFile", Refused)
    monkeypatch.setattr(omniglot, "_verified_checksums", lambda *args: {})
    with pytest.raises(DataError, match=f"cannot read {archive} \\(dataset=omniglot\\): Permission denied"):
        build_sources({"name": "omniglot", "protocol": "vinyals"}, data, tmp_path / "cache")


@pytest.mark.data
def test_a_split_file_that_is_not_utf8_is_one_line_naming_it(omniglot_dir, tmp_path):
    from metalab.data import build_sources
    from metalab.errors import DataError

    data = omniglot_copy(omniglot_dir, tmp_path / "data")
    split = data / "omniglot" / "splits" / "vinyals" / "test.txt"
    split.write_bytes(b"\xff\xfe" + split.read_bytes()[:100])
    with pytest.raises(DataError, match=f"{split} is not UTF-8 text"):
        build_sources({"name": "omniglot", "protocol": "vinyals"}, data, tmp_path / "cache")


def test_a_split_csv_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    from metalab.data import build_sources
    from metalab.errors import DataError

    root, splits = tmp_path / "images", tmp_path / "splits"
    root.mkdir()
    splits.mkdir()
    for split in ("train", "val", "test"):
        (splits / f"{split}.csv").write_bytes(b"filename,label\n\xe9t\xe9.jpg,n01\n")
    cfg = {"name": "mini_imagenet", "root": str(root), "split_dir": str(splits), "image_size": 8, "channels": 3}
    with pytest.raises(DataError, match=f"{splits / 'train.csv'} is not UTF-8 text"):
        build_sources(cfg, tmp_path, tmp_path / "cache")
