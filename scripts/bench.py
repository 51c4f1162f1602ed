"""Tasks per second of meta-training for the optimization-based family: task-batched
(vmap) against the plain per-task loop of metalab.algorithms.reference.

Both sides run the same learner, the same episodes and a full outer step (meta-loss,
backward, optimizer step). Printed as a table with the ratio; nothing is asserted.

    python scripts/bench.py                          # every learner: MLP 784-64-64-5, conv4 on Omniglot
    python scripts/bench.py --learners maml anil     # some of them
    python scripts/bench.py --device cuda            # on a GPU
"""

import argparse
import os
import time
from pathlib import Path

import torch

from metalab.algorithms import ALGORITHMS
from metalab.algorithms.maml import MAML
from metalab.algorithms.reference import reference_meta_loss
from metalab.data.episodes import Episode
from metalab.memory import keep_freed_memory

WAYS, SHOTS, QUERIES, META_BATCH = 5, 1, 15, 32
FAMILY = ("maml", "fomaml", "reptile", "anil", "metasgd", "mamlpp")


def learner(name: str, backbone: dict, input_shape: list[int], inner_steps: int, inner_lr: float) -> MAML:
    algorithm = {"name": name, "inner_lr": inner_lr, "inner_steps": inner_steps, "eval_inner_steps": inner_steps,
                 "first_order": False, "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3}}
    if name == "reptile":
        algorithm.update(inner_optimizer="sgd", adam_beta1=0.0, adam_beta2=0.999)
    if name == "mamlpp":  # second order, multi-step loss on: its most expensive phase
        algorithm.update(msl_steps=1000, first_order_steps=0)
    torch.manual_seed(0)
    return ALGORITHMS[name]({"algorithm": algorithm, "backbone": backbone, "ways": WAYS}, input_shape,
                            "classification")


def omniglot_batch() -> Episode | None:
    """A real 5-way 1-shot meta-batch of Omniglot, or None where the data is not present."""
    from metalab.data import build_sources
    from metalab.data.episodes import episode_generator, sample_meta_batch
    from metalab.errors import MetalabError

    data_dir = Path(os.environ.get("METALAB_DATA_DIR", "data"))
    cache_dir = Path(os.environ.get("METALAB_CACHE_DIR", ".cache"))
    cfg = {"name": "omniglot", "protocol": "vinyals", "image_size": 28, "invert": True,
           "verify_checksums": True, "download": False}
    try:
        source = build_sources(cfg, data_dir, cache_dir)["train"]
    except MetalabError as error:
        print(f"(conv4 on Omniglot skipped: {error})")
        return None
    return sample_meta_batch(source, WAYS, SHOTS, QUERIES, META_BATCH, episode_generator(0, "bench", 0))


def random_batch(features: int) -> Episode:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(WAYS)
    return Episode(
        torch.randn(META_BATCH, WAYS * SHOTS, features, generator=g),
        labels.repeat_interleave(SHOTS).repeat(META_BATCH, 1),
        torch.randn(META_BATCH, WAYS * QUERIES, features, generator=g),
        labels.repeat_interleave(QUERIES).repeat(META_BATCH, 1),
    )


def tasks_per_second(step, device: torch.device, min_seconds: float) -> float:
    for _ in range(3):  # warm-up: allocator, kernels
        step()
    steps, started = 0, time.perf_counter()
    while True:
        step()
        steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds and steps >= 3:
            return steps * META_BATCH / elapsed


def compare(name: str, model: MAML, batch: Episode, device: torch.device, min_seconds: float) -> None:
    model = model.to(device)
    batch = Episode(*(t.to(device) for t in batch))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = model.algorithm_cfg
    order = "first" if cfg["name"] in ("fomaml", "reptile") else "second"

    def outer_step(loss_fn):
        def step():
            optimizer.zero_grad()
            loss_fn().backward()
            optimizer.step()
        return step

    vmapped = outer_step(lambda: model.meta_loss(batch)[0])
    looped = outer_step(lambda: reference_meta_loss(model, batch))
    fast = tasks_per_second(vmapped, device, min_seconds)
    slow = tasks_per_second(looped, device, min_seconds)
    print(f"| {cfg['name']:<8} | {name:<32} | {cfg['inner_steps']:>5} | {order:<6} | {slow:>10.1f} | "
          f"{fast:>10.1f} | {fast / slow:>6.1f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing window per measurement")
    parser.add_argument("--learners", nargs="+", default=list(FAMILY), choices=FAMILY)
    args = parser.parse_args()
    keep_freed_memory()  # as metalab-train does; both sides benefit
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"Meta-training, 5-way 1-shot 15 queries, meta-batch {META_BATCH}; {name}, torch {torch.__version__}")
    print("| learner  | model                            | steps | order  | loop tasks/s | vmap tasks/s | ratio |")
    print("|----------|----------------------------------|-------|--------|------------|------------|--------|")
    mlp = {"name": "mlp", "hidden_sizes": [64, 64]}
    for learner_name in args.learners:
        for steps in (1, 5):
            compare("MLP 784-64-64-5 (random inputs)", learner(learner_name, mlp, [784], steps, 0.4),
                    random_batch(784), device, args.seconds)
    batch = omniglot_batch()
    if batch is not None:
        conv4 = {"name": "conv4", "hidden_channels": 64, "blocks": 4}
        for learner_name in args.learners:
            for steps in (1, 5):
                compare("conv4, Omniglot 28x28", learner(learner_name, conv4, [1, 28, 28], steps, 0.4), batch,
                        device, args.seconds)


if __name__ == "__main__":
    main()
