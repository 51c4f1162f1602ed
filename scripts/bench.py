"""Tasks per second of meta-training for the optimization-based family: task-batched
(vmap) against the plain per-task loop of metalab.algorithms.reference.

Both sides run the same learner, the same episodes and a full outer step (meta-loss,
backward, optimizer step). Printed as a table with the ratio; nothing is asserted.

    python scripts/bench.py                          # every learner: MLP 784-64-64-5, conv4 on Omniglot
    python scripts/bench.py --learners maml anil     # some of them
    python scripts/bench.py --device cuda            # on a GPU
    python scripts/bench.py --compile no             # without the algorithm.compile=true rows
    python scripts/bench.py --models mlp             # the MLP rows only
"""

import argparse
import os
import statistics
import subprocess
import sys
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


def learner(name: str, backbone: dict, input_shape: list[int], inner_steps: int, inner_lr: float,
            compiled: bool = False) -> MAML:
    algorithm = {"name": name, "inner_lr": inner_lr, "inner_steps": inner_steps, "eval_inner_steps": inner_steps,
                 "first_order": False, "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3}, "compile": compiled}
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
    """Tasks per second over at least `min_seconds` and 3 outer steps."""
    steps, started = 0, time.perf_counter()
    while True:
        step()
        steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds and steps >= 3:
            return steps * META_BATCH / elapsed


def interleaved(fast, slow, device: torch.device, min_seconds: float, rounds: int = 5) -> tuple[float, float, float]:
    """(fast tasks/s, slow tasks/s, ratio): medians over `rounds` back-to-back pairs of timings.

    Timing the two sides in alternation puts both under the same machine conditions: on a
    shared CPU one process's speed drifts by 30% over minutes, which a single pair of
    timings would read as a change of ratio.
    """
    for _ in range(3):  # warm-up: allocator, kernels, compilation
        fast()
        slow()
    window = min_seconds / rounds
    pairs = [(tasks_per_second(fast, device, window), tasks_per_second(slow, device, window)) for _ in range(rounds)]
    return (statistics.median(f for f, _ in pairs), statistics.median(s for _, s in pairs),
            statistics.median(f / s for f, s in pairs))


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

    # algorithm.compile=true: the same vmapped meta-loss, its gradient from one compiled graph.
    vmapped = outer_step((lambda: model.compiled_meta_loss(batch)[0]) if model.compiled
                         else (lambda: model.meta_loss(batch)[0]))
    looped = outer_step(lambda: reference_meta_loss(model, batch))
    fast, slow, ratio = interleaved(vmapped, looped, device, min_seconds)
    label = cfg["name"] + (" +compile" if model.compiled else "")
    print(f"| {label:<16} | {name:<32} | {cfg['inner_steps']:>5} | {order:<6} | {slow:>10.1f} | "
          f"{fast:>10.1f} | {ratio:>6.1f}x |", flush=True)


MODELS = {  # --models name: (label, backbone config, input shape)
    "mlp": ("MLP 784-64-64-5 (random inputs)", {"name": "mlp", "hidden_sizes": [64, 64]}, [784]),
    "conv4": ("conv4, Omniglot 28x28", {"name": "conv4", "hidden_channels": 64, "blocks": 4}, [1, 28, 28]),
}


def run_row(row: str, device: torch.device, min_seconds: float) -> None:
    """One table row, `model:learner:compiled:steps`, timed in this process."""
    model_name, learner_name, compiled, steps = row.split(":")
    label, backbone, shape = MODELS[model_name]
    batch = random_batch(shape[0]) if model_name == "mlp" else omniglot_batch()
    keep_freed_memory()  # as metalab-train does; both sides benefit
    compare(label, learner(learner_name, backbone, shape, int(steps), 0.4, compiled == "1"), batch, device,
            min_seconds)


def describe_failure(returncode: int) -> str:
    if returncode < 0:  # the kernel's out-of-memory killer sends SIGKILL
        return f"killed by signal {-returncode}" + (" (out of memory?)" if returncode == -9 else "")
    return f"failed with exit status {returncode}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum timing per side, over 5 alternating rounds")
    parser.add_argument("--learners", nargs="+", default=list(FAMILY), choices=FAMILY)
    parser.add_argument("--compile", choices=("both", "no", "only"), default="both",
                        help="also time algorithm.compile=true for the learners that support it (first call compiles)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: time one row in this process
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is visible to torch {torch.__version__} here; "
                     f"leave out --device to run on the CPU")
    if args.row:
        run_row(args.row, device, args.seconds)
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"Meta-training, 5-way 1-shot 15 queries, meta-batch {META_BATCH}; {name}, torch {torch.__version__}")
    print("| learner          | model                            | steps | order  | loop tasks/s | vmap tasks/s "
          "| ratio |")
    print("|------------------|----------------------------------|-------|--------|------------|------------|--------|",
          flush=True)
    variants = [(name, compiled) for name in args.learners for compiled in (False, True)
                if {"no": not compiled, "only": compiled, "both": True}[args.compile]
                and (not compiled or ALGORITHMS[name].compilable)]
    models = [m for m in args.models if m != "conv4" or omniglot_batch() is not None]
    for model_name in models:
        for learner_name, compiled in variants:
            for steps in (1, 5):
                # Each row in its own process: a clean allocator for every row, and a row that
                # runs out of memory (MAML++ on conv4 at 5 steps needs more than 24 GiB) is
                # reported instead of ending the benchmark.
                row = f"{model_name}:{learner_name}:{int(compiled)}:{steps}"
                child = subprocess.run([sys.executable, __file__, "--row", row, "--device", args.device,
                                        "--seconds", str(args.seconds)])
                if child.returncode != 0:
                    label = learner_name + (" +compile" if compiled else "")
                    print(f"| {label:<16} | {MODELS[model_name][0]:<32} | {steps:>5} | "
                          f"{describe_failure(child.returncode)} |", flush=True)


if __name__ == "__main__":
    main()
