"""A metric learner's training episodes, this tree against another checkout of metalab, in lock step.

    python scripts/bench_against.py c1ec8a9 --learner protonet --rounds 12   # a commit: a temporary worktree
    git worktree add ../metalab-before c1ec8a9        # or a checkout you keep
    python scripts/bench_against.py ../metalab-before --learner protonet --rounds 12

c1ec8a9 is the code before the speed work (docs/speed.md); `make bench` runs this against it.

Each side runs in its own process, importing the metalab of its own tree (its `src/` first on
PYTHONPATH) and building the training step of its own `scripts/bench.py` (the learner at its
paper's Omniglot episode, its optimizer, one real episode). The driver then times `--steps`
steps of one side while the other waits, alternating which goes first, so a slow spell of the
host lands on both sides of a round. Prints each round and the median of the paired ratios;
nothing is asserted.
"""

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


class StepBuilt(Exception):
    """Raised from inside bench.episodes_per_second once its step exists, before it is timed."""


def serve(learner: str) -> None:
    """Worker: build this tree's training step, then time `k` steps for each line `k` on stdin."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench", Path.cwd() / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    built = {}

    def keep_step(step, device, min_seconds):
        built["step"] = step
        raise StepBuilt

    # Every bench.py since the metric rows exist builds the step and warms it, then hands it to
    # steps_per_second: taking it there uses each tree's own setup, unchanged.
    bench.steps_per_second = keep_step
    if hasattr(bench, "keep_freed_memory"):
        bench.keep_freed_memory()
    try:
        bench.episodes_per_second(learner, torch.device("cpu"), 1.0, "32")
    except StepBuilt:
        pass
    step = built["step"]
    print("ready", flush=True)
    for line in sys.stdin:
        started = time.perf_counter()
        for _ in range(int(line)):
            step()
        print(time.perf_counter() - started, flush=True)


def start(tree: Path, learner: str) -> subprocess.Popen:
    # Each worker runs in its own tree, so the data and cache folders (relative to where this
    # command runs, as metalab-train reads them) are handed over as absolute paths. The image
    # cache is named by a fingerprint of its contents, so both sides can share it.
    env = dict(
        os.environ,
        PYTHONPATH=str(tree / "src"),
        METALAB_DATA_DIR=str(Path(os.environ.get("METALAB_DATA_DIR", "data")).resolve()),
        METALAB_CACHE_DIR=str(Path(os.environ.get("METALAB_CACHE_DIR", ".cache")).resolve()),
    )
    worker = subprocess.Popen(
        [sys.executable, __file__, "--serve", learner],
        cwd=tree,
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    if worker.stdout.readline().strip() != "ready":
        raise SystemExit(f"the worker in {tree} did not build its step (its error is above)")
    return worker


def seconds_per_step(worker: subprocess.Popen, steps: int) -> float:
    worker.stdin.write(f"{steps}\n")
    worker.stdin.flush()
    return float(worker.stdout.readline()) / steps


def git_commit(revision: str) -> str | None:
    """The commit `revision` names in this tree's git history, or None."""
    found = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.strip() if found.returncode == 0 else None


@contextlib.contextmanager
def checkout(baseline: str, parser: argparse.ArgumentParser):
    """The baseline tree: `baseline` itself where it is a metalab checkout, else a temporary git
    worktree of the commit it names, removed afterwards."""
    if (Path(baseline) / "scripts" / "bench.py").is_file():
        yield Path(baseline).resolve()
        return
    commit = git_commit(baseline)
    if commit is None:
        parser.error(
            f"baseline {baseline}: neither a metalab checkout (no scripts/bench.py there) nor a commit of "
            f"this tree's git history; give a commit such as c1ec8a9, or a folder made with "
            f"`git worktree add ../metalab-before <commit>`"
        )
    with tempfile.TemporaryDirectory(prefix="metalab-baseline-") as parent:
        tree = Path(parent) / "tree"
        subprocess.run(
            ["git", "-C", str(HERE), "worktree", "add", "--detach", "--quiet", str(tree), commit], check=True
        )
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(tree)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "baseline",
        nargs="?",
        help="another metalab checkout (a folder), or a commit (checked out in a temporary worktree)",
    )
    parser.add_argument("--learner", default="protonet", choices=("protonet", "matchingnet", "relationnet"))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3, help="training steps of each side a round")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: be one side's worker
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.baseline is None:
        parser.error("give the baseline: a commit such as c1ec8a9, or another metalab checkout (a folder)")
    if args.rounds < 1 or args.steps < 1:
        parser.error(f"--rounds {args.rounds} --steps {args.steps}: give 1 or more of each")
    with checkout(args.baseline, parser) as tree:
        print(f"{args.learner} training episodes: {args.baseline} ({tree}) against this tree ({HERE})", flush=True)
        workers = [start(tree, args.learner)]
        try:
            workers.append(start(HERE, args.learner))
            compare(*workers, args)
        finally:  # the workers end at the end of their input, before their tree is removed
            for worker in workers:
                worker.stdin.close()
                worker.wait()


def compare(baseline: subprocess.Popen, this: subprocess.Popen, args: argparse.Namespace) -> None:
    """Times the two workers in lock step and prints each round and the median paired ratio."""
    ratios, befores, afters = [], [], []
    for round_ in range(args.rounds):
        if round_ % 2:
            after, before = seconds_per_step(this, args.steps), seconds_per_step(baseline, args.steps)
        else:
            before, after = seconds_per_step(baseline, args.steps), seconds_per_step(this, args.steps)
        befores.append(before)
        afters.append(after)
        ratios.append(before / after)
        print(
            f"round {round_}: baseline {before:.3f} s/episode, this tree {after:.3f}, {before / after:.2f}x", flush=True
        )
    print(
        f"{args.learner}: baseline {1 / statistics.median(befores):.2f} episodes/s, this tree "
        f"{1 / statistics.median(afters):.2f}; median paired ratio {statistics.median(ratios):.2f}x "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}, {args.rounds} rounds of {args.steps} steps a side)"
    )


if __name__ == "__main__":
    main()
