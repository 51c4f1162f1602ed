"""Peak memory of one MAML outer step: second order, second order with checkpointed inner
steps, and first order, on real Omniglot 20-way 1-shot with conv4 and 5 inner steps.

Second-order MAML keeps every inner step's graph until the outer backward pass, so its
memory grows with the number of inner steps. `algorithm.checkpoint_inner_steps=true`
recomputes each step during the backward pass instead (same gradient, more compute);
`algorithm.first_order=true` (or `algorithm=fomaml`) drops the second-order terms.

Each setting runs in a fresh process. On a CPU the figure is the growth of the process's
peak resident memory over its size before the first step; on a GPU it is
torch.cuda.max_memory_allocated. Printed, nothing asserted.

    python scripts/bench_memory.py [--device cuda] [--meta-batch 16] [--steps 5]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

MODES = {
    "second order": {},
    "second order, checkpointed steps": {"checkpoint_inner_steps": True},
    "first order": {"first_order": True},
}


def measure(mode: str, device: str, meta_batch: int, steps: int) -> dict:
    """Runs in the child process: two outer steps, then the peak memory and time per step."""
    from metalab.algorithms.maml import MAML
    from metalab.data import build_sources
    from metalab.data.episodes import Episode, episode_generator, sample_meta_batch

    cfg = {"name": "omniglot"}  # the settings of conf/dataset/omniglot.yaml (vinyals split, 28x28)
    source = build_sources(
        cfg, Path(os.environ.get("METALAB_DATA_DIR", "data")), Path(os.environ.get("METALAB_CACHE_DIR", ".cache"))
    )["train"]
    batch = sample_meta_batch(source, 20, 1, 15, meta_batch, episode_generator(0, "bench", 0))
    algorithm = {
        "name": "maml",
        "inner_lr": 0.1,
        "inner_steps": steps,
        "eval_inner_steps": steps,
        "first_order": False,
        "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3},
        **MODES[mode],
    }
    torch.manual_seed(0)
    model = MAML.from_config(
        {"algorithm": algorithm, "backbone": {"name": "conv4", "hidden_channels": 64, "blocks": 4}, "ways": 20},
        [1, 28, 28],
        "classification",
    ).to(device)
    batch = Episode(*(t.to(device) for t in batch))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    for _ in range(2):
        optimizer.zero_grad()
        model.meta_loss(batch)[0].backward()
        optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_mib": (peak - before) / 2**20, "seconds_per_step": (time.perf_counter() - started) / 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--meta-batch", type=int, default=16, help="tasks per outer step (the MAML paper's 20-way)")
    parser.add_argument("--steps", type=int, default=5, help="inner steps")
    parser.add_argument("--json", help="also write the figures to this file, as {mode: {peak_mib, seconds_per_step}}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: no CUDA GPU is visible to torch {torch.__version__} here; "
            f"leave out --device to run on the CPU"
        )
    if args.child:
        print(json.dumps(measure(args.child, args.device, args.meta_batch, args.steps)))
        return
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(
        f"MAML, conv4, Omniglot 20-way 1-shot 15 queries, meta-batch {args.meta_batch}, "
        f"{args.steps} inner steps; {device}, torch {torch.__version__}"
    )
    print("| mode                             | peak memory of a step (MiB) | seconds per outer step |")
    print("|----------------------------------|-----------------------------|------------------------|")
    figures = {}
    for mode in MODES:
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--device",
                args.device,
                "--meta-batch",
                str(args.meta_batch),
                "--steps",
                str(args.steps),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            print(f"| {mode:<32} | failed: {child.stderr.strip().splitlines()[-1]} |")
            continue
        result = figures[mode] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"| {mode:<32} | {result['peak_mib']:>27.0f} | {result['seconds_per_step']:>22.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"device": device, "meta_batch": args.meta_batch, "inner_steps": args.steps, "modes": figures}, indent=2
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
