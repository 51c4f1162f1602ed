"""Small genuine checkpoints for the application API tests: a few real Omniglot steps in a Trainer.

Each learner is trained once per test session (the file is kept under pytest's session
temp dir) so test_api.py and test_predict_cli.py share it.
"""

import random
import zipfile
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from lightning import Trainer

from metalab.algorithms import ALGORITHMS
from metalab.runner import build_datamodule
from metalab.settings import CONFIG_DIR
from metalab.validation import resolve

EVAL = ["test_shots=1", "test_queries=5", "test_episodes=20", "eval_batch_size=10"]
# The shortest Omniglot run that trains, validates and tests: for sweeps of several learners.
TINY_OMNIGLOT = [
    "dataset=omniglot",
    "meta_batch_size=2",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "val_episodes=4",
    "test_episodes=8",
]
# Classification learners the application API is tested with: name -> (overrides, outer steps).
# The metric learners take 30 steps: BatchNorm's running averages (momentum 0.1), used at
# meta-test, need a few tens of updates to forget their start.
# Other learners join by adding a line here.
SETTINGS = {
    "protonet": (
        [
            "algorithm=protonet",
            "dataset=omniglot",
            "ways=5",
            "shots=1",
            "queries=5",
            "meta_batch_size=1",
            "test_ways=5",
            *EVAL,
        ],
        30,
    ),
    "maml": (
        [
            "experiment=maml_omniglot_5w1s",
            "meta_batch_size=1",
            "queries=5",
            "algorithm.first_order=true",
            "algorithm.eval_inner_steps=5",
            "test_ways=5",
            *EVAL,
        ],
        10,
    ),
    "matchingnet": (
        [
            "algorithm=matchingnet",
            "algorithm.fce=false",
            "dataset=omniglot",
            "ways=5",
            "shots=1",
            "queries=5",
            "meta_batch_size=1",
            "test_ways=5",
            *EVAL,
        ],
        30,
    ),
    "relationnet": (
        [
            "algorithm=relationnet",
            "dataset=omniglot",
            # The authors' initialisation (the paper setting's) starts slowly: its relation scores
            # begin near-constant, and 30 steps left it at chance. PyTorch's learns within them.
            "algorithm.init=default",
            "ways=5",
            "shots=1",
            "queries=5",
            "meta_batch_size=1",
            "test_ways=5",
            *EVAL,
        ],
        30,
    ),
    # The transfer baselines: 100 steps of 16 images labelled among all training classes.
    "baseline": (["experiment=baseline_omniglot_5w1s", *EVAL], 100),
    "baselinepp": (["experiment=baselinepp_omniglot_5w1s", *EVAL], 100),
    # The memory learner: sequences of 5 classes shown twice, the paper's raw 20x20 pixels.
    "mann": (["experiment=mann_omniglot_5w10i", "instances=2", "meta_batch_size=2", *EVAL], 10),
}


def run_config(name: str, data_dir: Path, cache_dir: Path, run_dir: Path) -> dict:
    overrides, _ = SETTINGS[name]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.run_dir={run_dir}",
                f"paths.data_dir={data_dir}",
                f"paths.cache_dir={cache_dir}",
                *overrides,
            ],
        )
    return resolve(cfg)


def trained_checkpoint(name: str, tmp_path_factory, data_dir: Path, cache_dir: Path) -> Path:
    """A checkpoint of `name` after a few outer steps on Omniglot, written by a Lightning Trainer."""
    folder = tmp_path_factory.getbasetemp() / "api_checkpoints"
    path = folder / f"{name}.ckpt"
    if path.is_file():
        return path
    config = run_config(name, data_dir, cache_dir, folder / name)
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    ALGORITHMS[name].settings_from_data(config, datamodule)  # as metalab-train: e.g. the classifier's size
    L.seed_everything(0, verbose=False)
    model = ALGORITHMS[name].from_config(config, list(datamodule.input_shape), datamodule.task_type)
    trainer = quiet_trainer(max_steps=SETTINGS[name][1], limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=datamodule)
    folder.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return path


def quiet_trainer(**kwargs) -> Trainer:
    return Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        **kwargs,
    )


def omniglot_folders(
    omniglot_dir: Path, root: Path, classes: int, shots: int, queries: int, seed: int = 0
) -> tuple[dict[str, list[Path]], dict[Path, str]]:
    """Raw Omniglot PNGs of unseen (vinyals test split) characters laid out as a user would:
    root/support/<class>/*.png and root/query/*.png. Returns ({class: support files}, {query file: class})."""
    split = (omniglot_dir / "splits" / "vinyals" / "test.txt").read_text().split()
    characters = random.Random(seed).sample([c.removesuffix("/rot000") for c in split if c.endswith("rot000")], classes)
    support: dict[str, list[Path]] = {}
    query: dict[Path, str] = {}
    for archive in sorted(omniglot_dir.glob("images_*.zip")):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            for character in characters:
                members = sorted(n for n in names if f"/{character}/" in n and n.endswith(".png"))
                label = character.replace("/", "-")
                for i, member in enumerate(members[: shots + queries]):
                    folder = root / "support" / label if i < shots else root / "query"
                    folder.mkdir(parents=True, exist_ok=True)
                    file = folder / Path(member).name
                    file.write_bytes(zf.read(member))
                    if i < shots:
                        support.setdefault(label, []).append(file)
                    else:
                        query[file] = label
    return support, query
