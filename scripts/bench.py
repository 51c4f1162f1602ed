"""Meta-training speed: the optimization-based family task-batched against the plain per-task
loop of metalab.algorithms.reference, and the metric learners' training episodes.

Both sides of a row run the same learner, the same episodes and a full outer step
(meta-loss, backward, optimizer step), timed in alternation. Printed as a table with the
ratio and the GFLOP/s each side reaches beside the machine's matmul rate measured in the same
process (and, with --json, one JSON object per row); nothing is asserted.

    python scripts/bench.py                          # the project's speed floors (docs/speed.md): MAML on the
                                                     # default path on conv4, the MLP and Finn's stride-2 net
                                                     # at 1 and 5 inner steps; ProtoNet, Matching and Relation
                                                     # Networks' training episodes per second
    python scripts/bench.py --learners maml fomaml reptile anil metasgd mamlpp --compile both --metric
                                                     # every learner, eager, compiled and default rows
    python scripts/bench.py --device cuda            # on a GPU
    python scripts/bench.py --models mlp             # the MLP rows only
    python scripts/bench.py --device cuda --precision tf32 bf16 --cudagraphs   # GPU settings
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from metalab.algorithms import ALGORITHMS
from metalab.algorithms.compile_passes import AUTO_COMPILE_MIN_STEPS
from metalab.algorithms.maml import MAML
from metalab.algorithms.reference import reference_meta_loss
from metalab.allocator import keep_freed_memory
from metalab.data.episodes import Episode

CONF = Path(__file__).resolve().parents[1] / "conf"
WAYS, SHOTS, QUERIES = 5, 1, 15
FAMILY = ("maml", "fomaml", "reptile", "anil", "metasgd", "mamlpp")
# --metric learner: the (ways, shots, queries) of its paper's Omniglot training episodes, one per step.
METRIC_EPISODES = {"protonet": (60, 5, 5), "matchingnet": (5, 1, 15), "relationnet": (5, 1, 19)}
# --precision: float32 ("32"), float32 with TensorFloat-32 matmuls and convolutions, bf16 autocast (with TF32).
PRECISIONS = ("32", "tf32", "bf16")
# Row compile modes: 0 eager, 1 algorithm.compile=true, ro algorithm.compile=reduce-overhead,
# auto the default, algorithm.compile=auto, as it resolves for a long run (compile_passes.auto_compile).
COMPILE_SETTING = {"0": False, "1": True, "ro": "reduce-overhead", "auto": "auto"}
COMPILE_LABEL = {False: "", True: " +compile", "reduce-overhead": " +cudagraph", "auto": " (default)"}
# --executions: algorithm.task_execution of the batched side (auto: the default path).
EXECUTIONS = ("auto", "per_task", "vmap")
EXECUTION_LABEL = {"auto": "", "per_task": " per_task", "vmap": " vmap"}


def algorithm_config(name: str, **overrides) -> dict:
    """conf/algorithm/<name>.yaml with `overrides`: the benchmark builds what metalab-train builds."""
    loaded = yaml.safe_load((CONF / "algorithm" / f"{name}.yaml").read_text()) or {}
    defaults = loaded.get("algorithm", loaded)  # a group file may place its keys globally
    defaults = {key: value for key, value in defaults.items() if key != "defaults"}
    return {**defaults, "name": name, **overrides}


def learner(
    name: str,
    backbone: dict,
    input_shape: list[int],
    inner_steps: int,
    inner_lr: float,
    compiled: bool | str = False,
    execution: str = "auto",
    setting: dict | None = None,
) -> MAML:
    """`name` on `backbone`, second order; `setting`: a paper setting's algorithm keys, each
    applied where the learner has it."""
    algorithm = algorithm_config(
        name,
        inner_lr=inner_lr,
        inner_steps=inner_steps,
        eval_inner_steps=inner_steps,
        optimizer={"_target_": "torch.optim.Adam", "lr": 1e-3},
        scheduler=None,
        compile=compiled,
        task_execution=execution,
    )
    algorithm.update({key: value for key, value in (setting or {}).items() if key in algorithm})
    if "first_order" in algorithm:  # second order where the learner has the choice
        algorithm["first_order"] = False
    if name == "reptile":
        algorithm.update(inner_optimizer="sgd")
    if name == "mamlpp":  # second order, multi-step loss on: its most expensive phase
        algorithm.update(msl_steps=1000, first_order_steps=0)
    torch.manual_seed(0)
    # A run long enough that algorithm.compile=auto compiles where it would (an MLP on a CPU).
    trainer = {"accelerator": "cpu", "devices": 1, "max_steps": AUTO_COMPILE_MIN_STEPS}
    return ALGORITHMS[name].from_config(
        {"algorithm": algorithm, "backbone": backbone, "ways": WAYS, "trainer": trainer}, input_shape, "classification"
    )


def omniglot_batch(
    ways: int = WAYS, shots: int = SHOTS, queries: int = QUERIES, meta_batch: int = 32
) -> Episode | None:
    """A real meta-batch of Omniglot training episodes, or None where the data is not present."""
    from metalab.data import build_sources
    from metalab.data.episodes import episode_generator, sample_meta_batch
    from metalab.errors import MetalabError

    data_dir = Path(os.environ.get("METALAB_DATA_DIR", "data"))
    cache_dir = Path(os.environ.get("METALAB_CACHE_DIR", ".cache"))
    cfg = {"name": "omniglot"}  # the settings of conf/dataset/omniglot.yaml (vinyals split, 28x28)
    try:
        source = build_sources(cfg, data_dir, cache_dir)["train"]
    except MetalabError as error:
        print(f"(conv4 on Omniglot skipped: {error})")
        return None
    return sample_meta_batch(source, ways, shots, queries, meta_batch, episode_generator(0, "bench", 0))


def random_batch(features: int, meta_batch: int) -> Episode:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(WAYS)
    return Episode(
        torch.randn(meta_batch, WAYS * SHOTS, features, generator=g),
        labels.repeat_interleave(SHOTS).repeat(meta_batch, 1),
        torch.randn(meta_batch, WAYS * QUERIES, features, generator=g),
        labels.repeat_interleave(QUERIES).repeat(meta_batch, 1),
    )


def precision_context(precision: str, device: torch.device):
    """Sets TF32 for `precision` (on a GPU) and returns the autocast context it runs under."""
    if device.type == "cuda":
        from metalab.runner import use_tf32

        use_tf32(precision in ("tf32", "bf16"))
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def steps_per_second(step, device: torch.device, min_seconds: float) -> float:
    """Outer steps per second over at least `min_seconds` and 3 steps."""
    steps, started = 0, time.perf_counter()
    while True:
        step()
        steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds and steps >= 3:
            return steps / elapsed


def interleaved(sides: dict, device: torch.device, min_seconds: float, rounds: int = 5) -> tuple[dict, dict]:
    """({side: steps/s}, {side: ratio of the first side's speed to it}): medians over `rounds`
    rounds that time every side back to back.

    Timing the sides in alternation puts them under the same machine conditions: on a shared
    CPU one process's speed drifts by 30% over minutes, which timings made one after the other
    would read as a change of ratio.
    """
    for _ in range(3):  # warm-up: allocator, kernels, compilation
        for step in sides.values():
            step()
    window = min_seconds / rounds
    names = list(sides)
    timed = []
    for round_index in range(rounds):
        # Each round starts from the next side, so no side always runs right after the same one
        # (a step's speed depends on what ran before it: caches, allocator, CPU clocks).
        start = round_index % len(names)
        order = names[start:] + names[:start]
        timed.append({name: steps_per_second(sides[name], device, window) for name in order})
    first = names[0]
    rates = {name: statistics.median(t[name] for t in timed) for name in names}
    ratios = {name: statistics.median(t[first] / t[name] for t in timed) for name in names}
    return rates, ratios


def matmul_gflops(device: torch.device, size: int = 2048, min_seconds: float = 1.0) -> float:
    """The machine's float32 matmul rate (size × size), the yardstick of the GFLOP/s columns."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    return 2 * size**3 * steps_per_second(lambda: a @ b, device, min_seconds) / 1e9


def step_flops(step) -> int:
    """Floating-point operations of one call of `step`, counted by torch (matmuls and convolutions,
    forward and backward; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def outer_step(model, loss_fn, precision: str, device: torch.device):
    """One outer step of `loss_fn`'s loss: zero_grad, backward, Adam."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    autocast = precision_context(precision, device)

    def step():
        optimizer.zero_grad()
        with autocast:
            loss = loss_fn()
        loss.backward()
        optimizer.step()

    return step


def plain_layout(model: MAML) -> MAML:
    """A copy of `model` whose conv4 runs in PyTorch's default (contiguous) layout: the per-task
    loop as plain PyTorch code would run it (backbone.memory_format=contiguous)."""
    from metalab.backbones.conv4 import Conv4

    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module, Conv4):
            module.memory_format = "contiguous"
    return plain


def with_pytorch_double_backward(model: MAML, order: str, device: torch.device) -> MAML | None:
    """A copy of the batched side with PyTorch's BatchNorm double backward
    (backbone.batch_norm_double_backward=pytorch; its support pass then runs contiguous), where
    metalab's would be used: a conv4 learner differentiating its inner steps on a CPU. ANIL's
    inner loop adapts only the head, outside the backbone, so it is left out. None elsewhere."""
    from metalab.backbones.conv4 import Conv4

    convs = [m for m in model.modules() if isinstance(m, Conv4)]
    if order != "second" or model.algorithm_name == "anil" or device.type != "cpu" or model.compiled:
        return None
    if not convs or all(m.batch_norm_double_backward == "pytorch" for m in convs):
        return None
    other = copy.deepcopy(model)
    for module in other.modules():
        if isinstance(module, Conv4):
            module.batch_norm_double_backward = "pytorch"
    return other


def compare(
    name: str, model: MAML, batch: Episode, device: torch.device, min_seconds: float, precision: str, rounds: int
) -> dict:
    model = model.to(device)
    batch = Episode(*(t.to(device) for t in batch))
    order = "first" if model.algorithm_name in ("fomaml", "reptile") else "second"
    # algorithm.compile: the same vmapped meta-loss, its gradient from one compiled graph.
    sides = {
        "batched": outer_step(
            model,
            (lambda: model.compiled_meta_loss(batch)[0]) if model.compiled else (lambda: model.meta_loss(batch)[0]),
            precision,
            device,
        )
    }
    # The loop: the plain network, task by task. A conv4 row also times the loop in metalab's
    # own layout (channels-last on a CPU), so the table shows what batching adds to the layout.
    plain = plain_layout(model)
    sides["loop"] = outer_step(plain, lambda: reference_meta_loss(plain, batch), precision, device)
    from metalab.backbones.conv4 import Conv4
    from metalab.backbones.layout import chosen_memory_format

    same_layout = any(
        chosen_memory_format(m.memory_format, batch.support_x) != "contiguous"
        for m in model.modules()
        if isinstance(m, Conv4)
    )
    if same_layout:
        sides["loop_layout"] = outer_step(model, lambda: reference_meta_loss(model, batch), precision, device)
    pytorch_norm = with_pytorch_double_backward(model, order, device)
    if pytorch_norm is not None:
        sides["batched_pytorch_norm"] = outer_step(
            pytorch_norm, lambda: pytorch_norm.meta_loss(batch)[0], precision, device
        )
    rates, ratios = interleaved(sides, device, min_seconds, rounds)
    tasks = batch.support_x.shape[0]
    flops = step_flops(sides["loop"])  # the same work on every side
    row = {
        "learner": model.algorithm_name,
        "model": name,
        "inner_steps": model.inner_steps,
        "order": order,
        "execution": model.task_execution(),
        "loop_tasks_per_sec": rates["loop"] * tasks,
        "batched_tasks_per_sec": rates["batched"] * tasks,
        "ratio": ratios["loop"],
        "step_gflop": flops / 1e9,
        "batched_gflops": flops * rates["batched"] / 1e9,
        "loop_gflops": flops * rates["loop"] / 1e9,
        "matmul_gflops": matmul_gflops(device),
    }
    if same_layout:
        row.update(loop_layout_tasks_per_sec=rates["loop_layout"] * tasks, ratio_same_layout=ratios["loop_layout"])
    if pytorch_norm is not None:
        row.update(
            pytorch_norm_tasks_per_sec=rates["batched_pytorch_norm"] * tasks,
            ratio_pytorch_norm=ratios["batched_pytorch_norm"],
        )
    return row


def episodes_per_second(name: str, device: torch.device, min_seconds: float, precision: str) -> dict:
    """A metric learner's training episodes per second at its paper's Omniglot episode shape."""
    ways, shots, queries = METRIC_EPISODES[name]
    batch = omniglot_batch(ways, shots, queries, meta_batch=1)
    if batch is None:
        raise SystemExit(1)
    torch.manual_seed(0)
    model = (
        ALGORITHMS[name]
        .from_config(
            {
                "algorithm": algorithm_config(name, scheduler=None),
                "backbone": {"name": "conv4", "hidden_channels": 64, "blocks": 4},  # + the learner's backbone_options
                "ways": ways,
            },
            [1, 28, 28],
            "classification",
        )
        .to(device)
    )
    batch = Episode(*(t.to(device) for t in batch))
    step = outer_step(model, lambda: model.meta_loss(batch)[0], precision, device)
    for _ in range(3):
        step()
    rate = steps_per_second(step, device, min_seconds)
    flops = step_flops(step)
    return {
        "learner": name,
        "model": f"conv4, Omniglot {ways}-way {shots}-shot {queries} queries",
        "episodes_per_sec": rate,
        "step_gflop": flops / 1e9,
        "gflops": flops * rate / 1e9,
        "matmul_gflops": matmul_gflops(device),
    }


@dataclass(frozen=True)
class BenchModel:
    """A --models choice: the network, its input, and the episodes it is timed on (5-way 1-shot)."""

    label: str
    backbone: dict
    input_shape: list[int]
    queries: int = QUERIES  # query images per class
    setting: dict = field(default_factory=dict)  # algorithm keys of the paper setting it stands for

    @property
    def omniglot(self) -> bool:
        return self.backbone["name"] != "mlp"  # the MLP runs on random inputs


MODELS = {
    "mlp": BenchModel("MLP 784-64-64-5 (random inputs)", {"name": "mlp", "hidden_sizes": [64, 64]}, [784]),
    "conv4": BenchModel("conv4, Omniglot 28x28", {"name": "conv4", "hidden_channels": 64, "blocks": 4}, [1, 28, 28]),
    # MAML's Omniglot paper setting (conf/experiment/maml_omniglot_5w1s.yaml): Finn et al.'s
    # stride-2 network without max-pooling, 1 query a class, BatchNorm not adapted.
    "finn": BenchModel(
        "Finn's net, Omniglot, 1 query",
        {"name": "conv4", "hidden_channels": 64, "blocks": 4, "pooled_blocks": 0, "stride": 2, "global_average": True},
        [1, 28, 28],
        queries=1,
        setting={"inner_loss": "sum_over_shots", "adapt_norm": False},
    ),
}


def run_row(row: str, args) -> dict:
    """One table row, `model:learner:compile:steps:execution` or `metric:learner`, timed in this process."""
    device = torch.device(args.device)
    keep_freed_memory()  # as metalab-train does; both sides benefit
    if row.startswith("metric:"):
        result = episodes_per_second(row.split(":")[1], device, args.seconds, args.precision[0])
    else:
        model_name, learner_name, compiled, steps, execution = row.split(":")
        bench_model = MODELS[model_name]
        batch = (
            omniglot_batch(queries=bench_model.queries, meta_batch=args.meta_batch)
            if bench_model.omniglot
            else random_batch(bench_model.input_shape[0], args.meta_batch)
        )
        model = learner(
            learner_name,
            bench_model.backbone,
            bench_model.input_shape,
            int(steps),
            0.4,
            COMPILE_SETTING[compiled],
            execution,
            bench_model.setting,
        )
        result = compare(bench_model.label, model, batch, device, args.seconds, args.precision[0], args.rounds)
        result["compile"] = COMPILE_SETTING[compiled]
        if compiled == "auto":
            result["compile_chosen"] = model.compiled  # what auto chose for a long run
    result.update(precision=args.precision[0], device=device_name(device), torch=torch.__version__)
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def print_row(result: dict) -> None:
    if "episodes_per_sec" in result:
        print(
            f"| {result['learner']:<16} | {result['model']:<40} | {result['precision']:>9} | "
            f"{result['episodes_per_sec']:>10.2f} episodes/s | {rate_of_matmul(result['gflops'], result)} |",
            flush=True,
        )
        return
    label = result["learner"] + COMPILE_LABEL[result["compile"]] + EXECUTION_LABEL[result["execution"]]
    if result["compile"] == "auto":
        label += ", compiled" if result.get("compile_chosen") else ", eager"
    same_layout = (
        f"{result['loop_layout_tasks_per_sec']:>7.1f} ({result['ratio_same_layout']:.2f}x)"
        if "ratio_same_layout" in result
        else f"{'—':>15}"
    )
    pytorch_norm = (
        f" {result['pytorch_norm_tasks_per_sec']:>7.1f} ({result['ratio_pytorch_norm']:.2f}x) |"
        if "ratio_pytorch_norm" in result
        else ""
    )
    print(
        f"| {label:<24} | {result['model']:<32} | {result['precision']:>9} | {result['inner_steps']:>5} | "
        f"{result['order']:<6} | {result['loop_tasks_per_sec']:>10.1f} | {result['batched_tasks_per_sec']:>10.1f} | "
        f"{result['ratio']:>6.2f}x | {same_layout} | {rate_of_matmul(result['loop_gflops'], result)} | "
        f"{rate_of_matmul(result['batched_gflops'], result)} |{pytorch_norm}",
        flush=True,
    )


def rate_of_matmul(gflops: float, result: dict) -> str:
    """GFLOP/s with its share of the matmul rate measured in the same process."""
    return f"{gflops:6.1f} ({100 * gflops / result['matmul_gflops']:3.0f}%)"


def describe_failure(returncode: int) -> str:
    if returncode < 0:  # the kernel's out-of-memory killer sends SIGKILL
        return f"killed by signal {-returncode}" + (" (out of memory?)" if returncode == -9 else "")
    return f"failed with exit status {returncode}"


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing per side, over all rounds")
    parser.add_argument(
        "--rounds", type=int, default=7, help="alternating rounds a row (3 steps a side or more each); medians of them"
    )
    parser.add_argument("--learners", nargs="*", default=["maml"], choices=FAMILY, help="(default: maml)")
    parser.add_argument(
        "--compile",
        choices=("both", "no", "only", "default"),
        default="default",
        help="default: the default path only (algorithm.compile=auto for a long run; eager on conv nets); "
        "both: eager, algorithm.compile=true and the default rows; no: eager only; only: compiled only",
    )
    parser.add_argument(
        "--cudagraphs",
        action="store_true",
        help="also time algorithm.compile=reduce-overhead (the compiled step replayed as a CUDA graph)",
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 5], help="inner steps of each row")
    parser.add_argument("--meta-batch", type=int, default=32, help="tasks per outer step")
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["32"],
        choices=PRECISIONS,
        help="32: float32; tf32: float32 with TensorFloat-32 (GPU); bf16: bfloat16 autocast",
    )
    parser.add_argument(
        "--metric",
        nargs="*",
        default=list(METRIC_EPISODES),
        choices=list(METRIC_EPISODES),
        help="also time these metric learners' training episodes per second (conv4, Omniglot; default: all "
        "three; --metric alone: none)",
    )
    parser.add_argument(
        "--executions",
        nargs="+",
        default=["auto"],
        choices=EXECUTIONS,
        help="algorithm.task_execution of the batched side (auto: the default path)",
    )
    parser.add_argument("--json", help="append each row as one JSON object per line to this file")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: time one row in this process
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: a row needs at least one timing round; give --rounds 1 or more")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: no CUDA GPU is visible to torch {torch.__version__} here; "
            f"leave out --device to run on the CPU"
        )
    return args


def planned_rows(args: argparse.Namespace, omniglot_present: bool) -> list[str]:
    """The rows `args` asks for, each `model:learner:compile:steps:execution` or `metric:learner`;
    the Omniglot models only where the data is present."""
    modes = ["0", "1", "auto"] + (["ro"] if args.cudagraphs else [])
    wanted = {"no": {"0"}, "only": {"1", "ro"}, "both": {"0", "1", "ro", "auto"}, "default": {"auto"}}[args.compile]
    # auto rows only where auto can differ from eager (a compilable learner); on conv4 it is eager.
    variants = [
        (name, mode)
        for name in args.learners
        for mode in modes
        if mode in wanted and (mode == "0" or ALGORITHMS[name].compilable)
    ]
    models = [m for m in args.models if not MODELS[m].omniglot or omniglot_present]
    rows = [
        f"{model_name}:{learner_name}:{mode}:{steps}:{execution}"
        for model_name in models
        for learner_name, mode in variants
        for steps in args.steps
        for execution in (args.executions if mode == "0" else ["auto"])
    ]
    return rows + [f"metric:{name}" for name in args.metric]


def main() -> None:
    args = arguments()
    device = torch.device(args.device)
    if args.row:
        result = run_row(args.row, args)
        print_row(result)
        if args.json:
            with open(args.json, "a") as out:
                out.write(json.dumps(result) + "\n")
        return
    print(
        f"Meta-training, {WAYS}-way {SHOTS}-shot {QUERIES} queries a class (unless a row says), "
        f"meta-batch {args.meta_batch}; {device_name(device)}, "
        f"torch {torch.__version__}"
    )
    print(
        f"float32 matmul {2048}x{2048}: {matmul_gflops(device):.0f} GFLOP/s (each row measures it again beside "
        f"its own timing; GFLOP/s count matmuls and convolutions)"
    )
    print(
        "(loop: the per-task loop of the plain network, contiguous; loop in layout: the same loop in "
        "metalab's layout, channels-last on a CPU, with batched's ratio to it; conv4 second-order rows "
        "on a CPU then give batched with PyTorch's BatchNorm double backward, and batched's ratio to it)"
    )
    print(
        "| learner                  | model                            | precision | steps | order  | loop tasks/s "
        "| batched tasks/s | ratio | loop in layout | loop GFLOP/s | batched GFLOP/s | PyTorch's BN 2nd backward |"
    )
    print(
        "|--------------------------|----------------------------------|-----------|-------|--------|------------|"
        "------------|--------|-----------------|--------------|--------------|---------------------------|",
        flush=True,
    )
    omniglot_present = any(MODELS[m].omniglot for m in args.models) and omniglot_batch(meta_batch=1) is not None
    rows = planned_rows(args, omniglot_present)
    for precision in args.precision:
        for row in rows:
            # Each row in its own process: a clean allocator for every row, and a row that
            # runs out of memory (MAML++ on conv4 at 5 steps needs more than 24 GiB) is
            # reported instead of ending the benchmark.
            command = [
                sys.executable,
                __file__,
                "--row",
                row,
                "--device",
                args.device,
                "--seconds",
                str(args.seconds),
                "--rounds",
                str(args.rounds),
                "--meta-batch",
                str(args.meta_batch),
                "--precision",
                precision,
            ]
            child = subprocess.run(command + (["--json", args.json] if args.json else []), check=False)
            if child.returncode != 0:
                print(f"| {row} | {precision} | {describe_failure(child.returncode)} |", flush=True)


if __name__ == "__main__":
    main()
