"""Hostile files and bad input (issue 14), in-process: checkpoints that would run code, planted
symbolic links, full disks, damaged archives, non-finite settings, run directories made at once."""

import errno
import io
import multiprocessing
import os
import shlex
import zipfile
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import metalab
import metalab.data.image_cache as image_cache
import metalab.files as files
from metalab import run_dirs
from metalab.algorithms import ALGORITHMS
from metalab.checkpoint import AtomicCheckpointIO, read_checkpoint, trusted_target
from metalab.data import build_sources
from metalab.errors import ConfigError, DataError, StorageError, TrainingDiverged
from metalab.eval import evaluation_config
from metalab.runner import hydra_error_message, report_error, save_config
from metalab.settings import CONFIG_DIR
from metalab.validation import check_learner_fits_data, check_train_config, resolve


def train_config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return resolve(compose("train", overrides=["paths.run_dir=unused", *overrides]))


# ---------------------------------------------------------------- checkpoints that would run code
class Payload:
    """Unpickling this runs a shell command that creates `marker`: what an attacker's .ckpt holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a metalab checkpoint (it even carries a real run config) with a payload inside."""
    config = train_config("algorithm=protonet", "dataset=omniglot")
    torch.save(
        {
            "metalab_version": metalab.__version__,
            "state_dict": {},
            "payload": Payload(marker),
            "hyper_parameters": {"config": config, "input_shape": [1, 28, 28], "task_type": "classification"},
        },
        path,
    )
    return path


def test_the_proof_of_concept_is_live(tmp_path):
    # The file is dangerous: a plain torch.load runs its payload. (So the tests below can fail.)
    marker = tmp_path / "ran"
    torch.load(hostile_checkpoint(tmp_path / "evil.ckpt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "load",
    [
        read_checkpoint,
        lambda path: AtomicCheckpointIO().load_checkpoint(path),  # Lightning's resume and test loads
        metalab.load_learner,
    ],
    ids=["read_checkpoint", "lightning_checkpoint_io", "load_learner"],
)
def test_a_checkpoint_holding_code_is_refused_unrun(load, tmp_path):
    marker = tmp_path / "ran"
    path = hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(ConfigError, match=f"ckpt_path={path} holds pickled Python objects"):
        load(path)
    assert not marker.exists()


def test_resume_through_lightning_uses_the_safe_load(tmp_path):
    from metalab.runner import build_trainer

    config = train_config("logger=none")
    trainer = build_trainer(config, tmp_path)
    marker = tmp_path / "ran"
    with pytest.raises(ConfigError, match="holds pickled Python objects"):
        trainer.strategy.load_checkpoint(hostile_checkpoint(tmp_path / "evil.ckpt", marker))
    assert not marker.exists()


def genuine_format_checkpoint(path: Path, **algorithm) -> Path:
    """Plain data only (loads with weights_only=True), with a stored config to tamper with."""
    config = train_config("algorithm=protonet", "dataset=omniglot")
    config["algorithm"].update(algorithm)
    model = ALGORITHMS["protonet"].from_config(config, [1, 28, 28], "classification")
    torch.save(
        {
            "metalab_version": metalab.__version__,
            "state_dict": model.state_dict(),
            "hyper_parameters": {"config": config, "input_shape": [1, 28, 28], "task_type": "classification"},
        },
        path,
    )
    return path


@pytest.mark.parametrize(
    "target",
    [
        "os.system",
        "builtins.exec",
        "metalab.settings.os.system",
        "metalab.algorithms.compile_passes.shutil.rmtree",
        "subprocess.Popen",
        "torch.load",
    ],
)
def test_a_stored_config_may_build_only_trusted_classes(target, tmp_path):
    path = genuine_format_checkpoint(tmp_path / "tampered.ckpt", optimizer={"_target_": target, "lr": 0.001})
    for load in (read_checkpoint, metalab.load_learner):
        with pytest.raises(ConfigError, match=rf"names '{target}' at algorithm\.optimizer\._target_"):
            load(path)


@pytest.mark.parametrize(
    "target",
    [
        "metalab.callbacks.ResumableCheckpoint",
        "metalab.backbones.conv4.Conv4",
        "metalab.algorithms.base.torch.nn.Module",
    ],
)
def test_a_stored_algorithm_target_may_build_only_a_metalab_learner(target, tmp_path):
    """A class metalab may build elsewhere (a callback, a backbone) is still no learner: the
    checkpoint is refused, naming what it asked for, and nothing is built (an attribute path out
    of metalab is already refused as no metalab class at all)."""
    path = genuine_format_checkpoint(tmp_path / "other.ckpt", _target_=target)
    with pytest.raises(ConfigError, match=rf"(algorithm\._target_='{target}' is not|names '{target}' at algorithm)"):
        metalab.load_learner(path)
    good = genuine_format_checkpoint(tmp_path / "good.ckpt", _target_="metalab.algorithms.protonet.ProtoNet")
    assert metalab.load_learner(good).algorithm == "protonet"


def test_metalab_configs_name_only_trusted_classes(tmp_path):
    assert all(
        trusted_target(t)
        for t in (
            "torch.optim.Adam",
            "torch.optim.lr_scheduler.StepLR",
            "metalab.callbacks.ResumableCheckpoint",
            "lightning.pytorch.loggers.TensorBoardLogger",
        )
    )
    path = genuine_format_checkpoint(tmp_path / "fine.ckpt")
    assert metalab.load_learner(path).algorithm == "protonet"


# ---------------------------------------------------------------- files written whole, by rename
def test_writes_replace_a_planted_symlink_instead_of_following_it(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("config.yaml", "error.txt", "results.json"):
        (run_dir / name).symlink_to(outside)
    save_config({"seed": 1}, run_dir)
    report_error(ConfigError("bad value"), run_dir)
    files.write_json_atomic(run_dir / "results.json", {"test/acc": 0.5})
    assert outside.read_text() == "keep me"
    assert not any(p.is_symlink() for p in run_dir.iterdir())
    assert (run_dir / "error.txt").read_text() == "metalab: error: bad value\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "error.txt", "results.json"]


def no_space(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_old_file_and_names_the_space(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")
    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(
        StorageError,
        match=r"cannot write .*results.json: No space left on device "
        r"\(0.0 MB needed, [0-9.]+ MB free\)",
    ):
        files.write_json_atomic(path, {"x": 1})
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_checkpoint_save_on_a_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"step": 1, "weights": torch.arange(10.0)}, path)
    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(StorageError, match=r"last.ckpt: No space left on device \(8.[0-9] MB needed"):
        io_.save_checkpoint({"step": 2, "weights": torch.zeros(2 * 10**6)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_config_error_is_reported_even_where_error_txt_cannot_be_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(files.os, "fsync", no_space)
    assert report_error(ConfigError("bad value"), tmp_path / "run") is None
    err = capsys.readouterr().err
    assert err.startswith("metalab: error: bad value (and error.txt could not be kept: cannot write")
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- image cache on a full disk
def image_refs(folder: Path, count: int = 6) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for i in range(count):
        Image.new("L", (10, 10), 20 * i).save(folder / f"{i}.png")
        refs.append((None, str(folder / f"{i}.png")))
    return {"class": refs}


def test_the_image_cache_is_refused_up_front_without_the_space(tmp_path, monkeypatch):
    refs = image_refs(tmp_path / "images")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    cache = tmp_path / "cache"
    with pytest.raises(StorageError, match=r"image cache .*\.npy needs 0.0 MB but .* has 0.0 MB free"):
        image_cache.load_or_build(cache, "x", {}, refs, 8, 1, False)
    assert list(cache.iterdir()) == []


def test_a_disk_that_fills_while_the_cache_is_built_is_an_error_not_sigbus(tmp_path, monkeypatch):
    # The array is memory-mapped: left sparse, a full disk is a SIGBUS mid-write. Its blocks are
    # allocated first, so the shortage is an OSError there, before any decoding.
    refs = image_refs(tmp_path / "images")
    monkeypatch.setattr(image_cache.os, "posix_fallocate", no_space, raising=False)
    monkeypatch.setattr(image_cache, "decode_all", lambda *a: pytest.fail("decoded into an unallocated file"))
    cache = tmp_path / "cache"
    with pytest.raises(StorageError, match=r"cannot write .*x-8px-.*\.npy: No space left on device"):
        image_cache.load_or_build(cache, "x", {}, refs, 8, 1, False)
    assert list(cache.iterdir()) == []  # no .npy.tmp left


# ---------------------------------------------------------------- damaged archives
def small_omniglot(root: Path) -> None:
    """Two Omniglot-shaped archives of a few noisy drawings each (noise: incompressible, so the
    members fill the file and a damaged middle hits image data)."""
    rng = np.random.default_rng(0)
    for archive, alphabet in (("images_background.zip", "Latin"), ("images_evaluation.zip", "Greek")):
        root.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(root / archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for character in range(3):
                for drawing in range(4):
                    image = io.BytesIO()
                    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(image, "PNG")
                    zf.writestr(f"{archive[:-4]}/{alphabet}/character{character:02d}/{drawing}.png", image.getvalue())


def test_an_omniglot_zip_damaged_in_the_middle_is_a_data_error(tmp_path):
    small_omniglot(tmp_path / "omniglot")  # no SHA256SUMS beside it: nothing checks the sums first
    archive = tmp_path / "omniglot" / "images_background.zip"
    data = bytearray(archive.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    archive.write_bytes(bytes(data))
    cfg = {"name": "omniglot", "protocol": "lake", "image_size": 8, "invert": True, "verify_checksums": True}
    with pytest.raises(
        DataError,
        match=rf"{archive} is not a valid zip archive: its member .* is damaged .*"
        "download it again",
    ):
        build_sources(cfg, tmp_path, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix == ".tmp"]


# ---------------------------------------------------------------- bad settings refused up front
@pytest.mark.parametrize(
    "override,key",
    [
        ("algorithm.optimizer.lr=inf", "algorithm.optimizer.lr=inf"),
        ("algorithm.optimizer.lr=nan", "algorithm.optimizer.lr=nan"),
        ("algorithm.inner_lr=-inf", "algorithm.inner_lr=-inf"),
        ("algorithm.grad_clip=inf", "algorithm.grad_clip=inf"),
    ],
)
def test_non_finite_settings_are_refused(override, key):
    with pytest.raises(ConfigError, match=f"{key}.* finite"):
        check_train_config(train_config(override))


@pytest.mark.parametrize("override", ["ways=1", "test_ways=1"])
def test_one_way_classification_is_refused(override):
    cfg = train_config("algorithm=protonet", "dataset=omniglot", override)
    with pytest.raises(ConfigError, match=f"{override} is too few for classification"):
        check_learner_fits_data(cfg, ALGORITHMS["protonet"], "classification")


def test_trainer_given_a_word_names_the_hardware_setting():
    with pytest.raises(ConfigError, match="trainer='gpu' is not a setting.*hardware=gpu"):
        check_train_config(train_config("trainer=gpu"))


def test_a_class_with_one_image_says_what_the_data_allows(tmp_path):
    root = tmp_path / "images"
    for c, count in enumerate((1, 4, 4)):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (40 * c, 10 * i, 0)).save(root / f"class{c}" / f"{i}.png")
    cfg = {
        "name": "image_folder",
        "root": str(root),
        "image_size": 8,
        "channels": 3,
        "split_fractions": {"train": 0.0, "val": 0.0, "test": 1.0},
    }
    test = build_sources(cfg, tmp_path, tmp_path / "cache")["test"]
    with pytest.raises(ConfigError, match="only 1 image; an episode needs at least 2 images of every class") as error:
        test.check(2, 1, 1, "test")
    assert "<= 1" not in str(error.value)  # no setting satisfies that
    # Where a setting fits, the message gives one, named as the split's settings are.
    (root / "class0" / "0.png").unlink()
    (root / "class0").rmdir()
    fits = build_sources(cfg, tmp_path, tmp_path / "cache2")["test"]
    with pytest.raises(ConfigError, match=r"choose test_shots\+test_queries <= 4, e.g. test_shots=3 test_queries=1"):
        fits.check(2, 3, 5, "test")
    fits.check(2, 3, 1, "test")


# ---------------------------------------------------------------- cross-domain: the checkpoint's transform
def folder_dataset(**given) -> dict:
    return {
        "name": "image_folder",
        "root": "/x",
        "image_size": 84,
        "channels": 3,
        "invert": False,
        "split_fractions": {"train": 0.64, "val": 0.16, "test": 0.2},
        **given,
    }


def test_cross_domain_eval_defaults_to_the_checkpoints_transform(caplog):
    trained = train_config("algorithm=protonet", "dataset=omniglot")
    command = {"ckpt_path": "x.ckpt", "dataset": folder_dataset(), "paths": {}, "trainer": {}, "logger": None}
    run = evaluation_config(command, trained, [1, 28, 28], ["dataset=image_folder", "dataset.root=/x"])
    assert (run["dataset"]["image_size"], run["dataset"]["channels"], run["dataset"]["invert"]) == (28, 1, True)
    assert "invert=True (the checkpoint's)" in caplog.text  # logged as a warning: stderr and eval.log
    caplog.clear()
    # Given on the command line, the choice stands, and is printed as given.
    command["dataset"] = folder_dataset(invert=False)
    run = evaluation_config(command, trained, [1, 28, 28], ["dataset=image_folder", "dataset.invert=false"])
    assert run["dataset"]["invert"] is False and "invert=False (given)" in caplog.text


# ---------------------------------------------------------------- a diverged state is never saved as good
def test_non_finite_weights_are_never_written_over_a_good_checkpoint(tmp_path):
    from lightning import Trainer

    from metalab.callbacks import ResumableCheckpoint

    config = train_config("trainer.max_steps=2", "meta_batch_size=2", "val_episodes=2", "test_episodes=2")
    model = ALGORITHMS["maml"].from_config(config, [1], "regression")
    callback = ResumableCheckpoint(dirpath=tmp_path, save_last=True, monitor=None, every_n_train_steps=1)
    trainer = Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        max_steps=1,
        limit_val_batches=0,
        plugins=[AtomicCheckpointIO()],
    )
    from metalab.runner import build_datamodule

    trainer.fit(model, datamodule=build_datamodule(config))
    good = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    with torch.no_grad():
        next(model.parameters()).fill_(float("inf"))
    with pytest.raises(
        TrainingDiverged,
        match=r"is no longer finite, so .*last.ckpt was not written.*"
        r"The last good checkpoint is .*last.ckpt",
    ):
        callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
    kept = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(good[k], kept[k]) for k in good)


# ---------------------------------------------------------------- run directories
def make_dir(args) -> str:
    return str(run_dirs._make(Path(args[0]), args[1], per_job=False))  # what each starting process does


def test_runs_started_at_once_get_directories_of_their_own(tmp_path):
    # Separate processes racing for one name (fork: cheap to start; spawn where there is no fork).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(4) as pool:
        made = pool.map(make_dir, [(str(tmp_path / "runs"), "2026-01-01_00-00-00")] * 8)
    assert len(set(made)) == 8 and all(Path(d).is_dir() for d in made)
    assert sorted(Path(d).name for d in made)[:2] == ["2026-01-01_00-00-00", "2026-01-01_00-00-00_1"]


def test_a_slurm_job_keeps_one_directory_across_requeues(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    first = run_dirs._make(tmp_path, "stamp", per_job=True)
    assert first == tmp_path / "slurm-4242" and run_dirs._make(tmp_path, "later", per_job=True) == first
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive allocation is no job: its own dirs
    assert run_dirs._make(tmp_path, "stamp", per_job=True) == tmp_path / "stamp"
    # torchrun's processes each resolve the directory themselves: they share one.
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    shared = [run_dirs._make(tmp_path, "t0", per_job=True) for rank in range(2)]
    assert shared == [tmp_path / "t0_torchrun-abc"] * 2


def test_a_log_dir_that_cannot_be_written_is_one_clear_error(tmp_path, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(
        StorageError,
        match=r"cannot create a run directory in .*: Read-only file system; "
        "set paths.log_dir to a writable directory",
    ):
        run_dirs._make(tmp_path / "logs", "stamp", per_job=False)


def test_hydra_errors_become_one_line():
    from hydra.errors import MissingConfigException

    error = MissingConfigException(
        "In 'train': Could not find 'algorithm/foo'\n\nAvailable options ...",
        missing_cfg_file="algorithm/foo",
        options=["maml", "protonet"],
    )
    assert hydra_error_message(error) == (
        "algorithm=foo is unknown (no conf/algorithm/foo.yaml); choose one of maml, protonet"
    )


def test_a_diverged_loss_says_when_the_weights_are_already_not_finite():
    config = train_config()
    model = ALGORITHMS["maml"].from_config(config, [1], "regression")
    with pytest.raises(TrainingDiverged, match="The parameters were not updated with it"):
        model.check_finite(torch.tensor(float("nan")), None)
    with torch.no_grad():
        next(model.parameters()).fill_(float("inf"))  # an earlier update blew them up
    with pytest.raises(TrainingDiverged, match="The parameters were already non-finite after the previous update"):
        model.check_finite(torch.tensor(float("nan")), None)
