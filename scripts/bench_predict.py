"""Application speed: the time of one adaptation, and items predicted per second after it.

For ProtoNet and MAML (the 5-way 1-shot Omniglot experiment configs) through the public
API (`metalab.load_learner`, `adapt`, `predict_proba`), on real Omniglot test images:

- adapt: one `learner.adapt(support)` on 5-way 1-shot and 5-way 5-shot support sets
  (MAML: `eval_inner_steps` SGD steps; ProtoNet: embed and average);
- items/s: `task.predict_proba(query)` after that one adaptation, with 75 items in one
  pass (an evaluation episode's query set), 1,000 in one pass, 75 with
  `independent=True` (each beside the support set), 75 one at a time (`batch_size=1`),
  and 75 from PNG files, decoding included.

Printed as a table (median of repeats); nothing is asserted.

    python scripts/bench_predict.py                                   # fresh checkpoints (1 training step)
    python scripts/bench_predict.py --protonet a.ckpt --maml b.ckpt   # your trained checkpoints
    python scripts/bench_predict.py --protonet a.ckpt --episodes 200   # + accuracy, together vs alone
    python scripts/bench_predict.py --device cuda
"""

import argparse
import os
import statistics
import tempfile
import time
import warnings
import zipfile
from functools import partial
from pathlib import Path

import torch

import metalab
from metalab.allocator import keep_freed_memory
from metalab.errors import MetalabError

EXPERIMENTS = {"protonet": "protonet_omniglot_5w1s", "maml": "maml_omniglot_5w1s"}


def fresh_checkpoint(name: str, folder: Path, data_dir: Path, cache_dir: Path) -> Path:
    """A genuine checkpoint of the experiment config after one outer step (speed does not depend on training)."""
    import lightning as L
    from hydra import compose, initialize_config_dir

    from metalab.algorithms import ALGORITHMS
    from metalab.runner import build_datamodule
    from metalab.settings import CONFIG_DIR
    from metalab.validation import resolve

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"experiment={EXPERIMENTS[name]}",
                "meta_batch_size=1",
                f"paths.run_dir={folder}",
                f"paths.data_dir={data_dir}",
                f"paths.cache_dir={cache_dir}",
            ],
        )
    config = resolve(cfg)
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    L.seed_everything(0, verbose=False)
    model = ALGORITHMS[name].from_config(config, list(datamodule.input_shape), datamodule.task_type)
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=datamodule)
    path = folder / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return path


def omniglot_test_images(data_dir: Path, cache_dir: Path, classes: int, per_class: int) -> list:
    from metalab.data import build_sources

    source = build_sources(
        {"name": "omniglot", "protocol": "vinyals", "image_size": 28, "invert": True}, data_dir, cache_dir
    )["test"]
    return [source.class_images(i)[:per_class].float() / 255 for i in range(classes)]


def png_files(data_dir: Path, folder: Path, count: int) -> list[Path]:
    """`count` raw Omniglot PNGs (105x105, black on white) written to `folder`."""
    with zipfile.ZipFile(data_dir / "omniglot" / "images_evaluation.zip") as archive:
        members = sorted(n for n in archive.namelist() if n.endswith(".png"))[:count]
        files = []
        for member in members:
            files.append(folder / Path(member).name)
            files[-1].write_bytes(archive.read(member))
    return files


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench(name: str, path: Path, images: list, files: list[Path], device: torch.device, repeats: int) -> list[str]:
    learner = metalab.load_learner(path, device)
    rows = []
    few = max(3, repeats // 4)
    for shots in (1, 5):
        support = {f"class {k}": list(images[k][:shots]) for k in range(5)}
        adapt = median_seconds(partial(learner.adapt, support), repeats, device)
        task = learner.adapt(support)
        query = [x for k in range(5) for x in images[k][shots : shots + 15]]  # 75 items
        many = [x for k in range(len(images)) for x in images[k]][:1000]
        rates = [
            len(query) / median_seconds(partial(task.predict_proba, query), repeats, device),
            len(many) / median_seconds(partial(task.predict_proba, many), few, device),
            len(query) / median_seconds(partial(task.predict_proba, query, independent=True), few, device),
            len(query) / median_seconds(partial(task.predict_proba, query, batch_size=1), few, device),
            len(files) / median_seconds(partial(task.predict_proba, files), few, device),
        ]
        rates_text = " | ".join(f"{rate:,.0f}" for rate in rates)
        rows.append(f"| {name} | 5-way {shots}-shot | {1000 * adapt:.1f} | {rates_text} |")
    return rows


def accuracy_together_and_alone(learner, episodes: int, data_dir: Path, cache_dir: Path) -> str:
    """Accuracy on the checkpoint's fixed test episodes: queries predicted in one pass vs one at a time."""
    from metalab.runner import build_datamodule

    config = {
        **learner.model.run_config,
        "test_episodes": episodes,
        "paths": {"data_dir": str(data_dir), "cache_dir": str(cache_dir)},
    }
    datamodule = build_datamodule(config)
    datamodule.setup("test")
    together, independent, alone = [], [], []
    fixed = datamodule.test_dataloader().dataset
    for support_x, support_y, query_x, query_y in (fixed[j] for j in range(len(fixed))):
        task = learner.adapt(support_x, labels=support_y.tolist())
        together.append((task.predict_proba(query_x).argmax(-1) == query_y).float().mean())
        independent.append((task.predict_proba(query_x, independent=True).argmax(-1) == query_y).float().mean())
        alone.append((task.predict_proba(query_x, batch_size=1).argmax(-1) == query_y).float().mean())
    shape = f"{config['test_ways']}-way {config['test_shots']}-shot, {config['test_queries']} queries per class"
    cells = " | ".join(f"{100 * torch.stack(acc).mean():.1f}%" for acc in (together, independent, alone))
    return f"| {learner.algorithm} | {shape} | {episodes} | {cells} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protonet", type=Path, help="a ProtoNet checkpoint (default: a fresh one)")
    parser.add_argument("--maml", type=Path, help="a MAML checkpoint (default: a fresh one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--episodes",
        type=int,
        default=0,
        help="with checkpoints given: also the accuracy on this many fixed test episodes, "
        "queries predicted together vs one at a time",
    )
    args = parser.parse_args()
    keep_freed_memory()
    warnings.simplefilter("ignore", UserWarning)  # batch_size=1 is measured on purpose
    threads = torch.get_num_threads()  # a Lightning Trainer may change it; measure with torch's default
    device = torch.device(args.device)
    data_dir = Path(os.environ.get("METALAB_DATA_DIR", "data"))
    cache_dir = Path(os.environ.get("METALAB_CACHE_DIR", ".cache"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            images = omniglot_test_images(data_dir, cache_dir, classes=60, per_class=20)
        except MetalabError as error:
            print(f"(application benchmark skipped: {error})")
            return
        files = png_files(data_dir, tmp, 75)
        rows, accuracy = [], []
        for name in ("protonet", "maml"):
            path = getattr(args, name) or fresh_checkpoint(name, tmp, data_dir, cache_dir)
            torch.set_num_threads(threads)
            rows += bench(name, path, images, files, device, args.repeats)
            if args.episodes and getattr(args, name):
                learner = metalab.load_learner(path, device)
                accuracy.append(accuracy_together_and_alone(learner, args.episodes, data_dir, cache_dir))
    print(
        f"\ndevice={device}, torch threads={torch.get_num_threads()}, median of {args.repeats} "
        f"({max(3, args.repeats // 4)} for all but adapt and the 75-item pass)"
    )
    print(
        "| learner | support | adapt (ms) | items/s: 75 in one pass | 1,000 in one pass "
        "| 75 independent=True | 75 batch_size=1 | 75 PNG files in one pass |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if accuracy:
        print(
            "\n| learner | test episodes | episodes | accuracy: queries in one pass (default) "
            "| independent=True | batch_size=1 |"
        )
        print("|---|---|---|---|---|---|")
        print("\n".join(accuracy))


if __name__ == "__main__":
    main()
