"""algorithm.compile: when to compile (the policy) and the graph pass compiling adds.

The policy: `auto_compile` decides algorithm.compile=auto, `check_compile` refuses a
compile=true that cannot run, `cpp_compiler` finds what torch.compile's CPU backend calls.

The pass: short batched matmuls become fused arithmetic.

Every inner SGD step of a task-batched linear layer computes a per-task weight gradient
as an outer product over the support set, dW_t = X_tᵀ δ_t, a batched matmul whose
contraction runs over only ways × shots examples (5 for 5-way 1-shot), and then uses it
once, in θ'_t = θ_t − α dW_t. As a library matmul, each [tasks, 784, 64] result is
written to memory and read back by the update, and the same holds for the outer products
of the second-order backward pass: memory traffic, on a CPU, with little arithmetic.

Written instead as a broadcast multiply and a sum over the contraction, a matmul whose
contraction is no longer than Inductor's unrolling threshold
(`torch._inductor.config.unroll_reductions_threshold`, 8) turns into plain elementwise
arithmetic that Inductor fuses into its consumer: the gradient is never stored. Longer
contractions stay library matmuls: rewritten, they become real reductions, which measured
slower. (docs/speed.md has the figures.)

The rewrite changes only the order of float additions (a few ulp), and only for float32
or float64 on the CPU, the one place it has been measured. It is applied through
Inductor's documented hook for custom passes, `post_grad_custom_pre_pass` (before
Inductor's own pattern passes, so they see the new arithmetic: that order measured faster).
"""

import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch

from metalab.backbones import backbone_class
from metalab.errors import ConfigError
from metalab.settings import with_group_defaults

try:  # a torch without Inductor's custom-pass interface compiles without the pass
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
except ImportError:  # pragma: no cover
    CustomGraphPass = None

aten = torch.ops.aten


def short_contraction(node: torch.fx.Node, limit: int) -> bool:
    """True for a CPU float bmm [b, m, k] @ [b, k, n] with k <= limit, shapes known."""
    if node.op != "call_function" or node.target is not aten.bmm.default:
        return False
    left, right = (arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None for arg in node.args)
    if left is None or right is None:
        return False
    contraction = left.shape[-1]
    return (
        left.device.type == "cpu"
        and left.dtype in (torch.float32, torch.float64)
        and isinstance(contraction, int)
        and contraction <= limit
    )


def unroll_short_matmuls(graph: torch.fx.Graph) -> int:
    """Rewrite each short bmm as (A[:, :, :, None] * B[:, None, :, :]).sum(2). Returns how many."""
    limit = torch._inductor.config.unroll_reductions_threshold
    rewritten = 0
    for node in list(graph.nodes):
        if not short_contraction(node, limit):
            continue
        left, right = node.args
        with graph.inserting_before(node):
            products = graph.call_function(
                aten.mul.Tensor,
                (
                    graph.call_function(aten.unsqueeze.default, (left, 3)),
                    graph.call_function(aten.unsqueeze.default, (right, 1)),
                ),
            )
            summed = graph.call_function(aten.sum.dim_IntList, (products, [2]))
        for operand in (left, right):  # store the operands: inlined, they would be recomputed per product
            operand.meta["inductor_realize_to_strides"] = True
        node.replace_all_uses_with(summed)
        graph.erase_node(node)
        rewritten += 1
    return rewritten


if CustomGraphPass is not None:

    class UnrollShortMatmuls(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            unroll_short_matmuls(graph)

        def uuid(self) -> Any:  # Inductor's compile cache is keyed by this file's contents
            return get_hash_for_files((__file__,))


# algorithm.compile values: true compiles with Inductor's defaults; "reduce-overhead" also
# replays the compiled step as a CUDA graph (what torch.compile's mode of that name turns on;
# given as an option here because torch.compile takes a mode or options, not both).
COMPILE_MODES = (True, "reduce-overhead")


def inductor_options(mode: bool | str = True) -> dict[str, Any]:
    """`options=` for torch.compile of a meta-gradient under algorithm.compile=`mode`."""
    options: dict[str, Any] = {"post_grad_custom_pre_pass": UnrollShortMatmuls()} if CustomGraphPass is not None else {}
    if mode == "reduce-overhead":
        options["triton.cudagraphs"] = True
    return options


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would call, if there is one."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++"]
    return next((path for path in map(shutil.which, names) if path), None)


# algorithm.compile=auto compiles where compiling was measured to pay (docs/speed.md, "Compiled
# by default", with the figures): an MLP on a CPU, in a run long enough to repay the compile.
AUTO_COMPILE_MIN_STEPS = 20_000


def auto_compile(cfg: dict, learner_cls) -> tuple[bool, str]:
    """What algorithm.compile=auto means for this run: (compile?, the reason, to print)."""
    algorithm, trainer = cfg["algorithm"], cfg.get("trainer") or {}
    # A backbone written by hand by name only gets its class from its yaml.
    backbone_cfg = with_group_defaults("backbone", cfg.get("backbone") or {})
    steps, backbone, target = trainer.get("max_steps"), backbone_cfg.get("name"), backbone_cfg.get("_target_")
    pays = target is not None and getattr(backbone_class(target), "compile_pays_on_cpu", False)
    devices = trainer.get("devices", 1)
    distributed = "ddp" in str(trainer.get("strategy") or "") or (isinstance(devices, int) and devices > 1)
    eager_because = [
        (not learner_cls.compilable, f"algorithm={algorithm.get('name')} has no compiled path"),
        (not pays, f"backbone={backbone}: compiling is measured to pay for an MLP only"),
        (trainer.get("accelerator", "cpu") != "cpu", "on a GPU compiling is not measured yet"),
        (distributed, "several processes (DDP): not measured"),
        (bool(algorithm.get("checkpoint_inner_steps")), "algorithm.checkpoint_inner_steps=true cannot be compiled"),
        (bool(trainer.get("fast_dev_run")), "a fast_dev_run is too short to repay the compile"),
        (
            not isinstance(steps, int) or steps < AUTO_COMPILE_MIN_STEPS,
            f"trainer.max_steps={steps} is under {AUTO_COMPILE_MIN_STEPS:,}, too short to repay the compile",
        ),
        (cpp_compiler() is None, "no C++ compiler was found (g++, clang++ or $CXX)"),
    ]
    reasons = [reason for applies, reason in eager_because if applies]
    if reasons:
        return False, f"algorithm.compile=auto: eager, as {reasons[0]}; algorithm.compile=true compiles anyway"
    return True, (
        f"algorithm.compile=auto: compiling the meta-gradient (an MLP on a CPU, {steps:,} steps; the "
        "first step compiles, about 30 s); algorithm.compile=false runs eagerly"
    )


def check_compile(cfg: dict, learner_cls, learners: Mapping[str, type] | None = None) -> None:
    """algorithm.compile=true needs a learner torch.compile can capture, and a compiler to run.
    `learners`: {name: class} to list the compilable ones from in a refusal, the caller's
    registry (metalab.algorithms.ALGORITHMS: this module is below the learners, so it cannot)."""
    algorithm = cfg["algorithm"]
    if not algorithm.get("compile") or algorithm["compile"] == "auto":  # auto chooses only what works
        return
    if algorithm["compile"] not in COMPILE_MODES:
        raise ConfigError(
            f"algorithm.compile={algorithm['compile']} is not a choice; use auto, false, true or "
            f"reduce-overhead (true, and also replay the step as a CUDA graph on a GPU)"
        )
    on_cpu = cfg.get("trainer", {}).get("accelerator", "cpu") == "cpu"
    if algorithm["compile"] == "reduce-overhead" and on_cpu:
        raise ConfigError(
            "algorithm.compile=reduce-overhead replays CUDA graphs, which need a GPU; use "
            "algorithm.compile=true on a CPU, or hardware=gpu"
        )
    if not learner_cls.compilable:
        compilable = ", ".join(name for name, cls in (learners or {}).items() if cls.compilable)
        raise ConfigError(
            f"algorithm.compile=true is not available for algorithm={algorithm['name']}"
            + (f" (it is for {compilable})" if compilable else "")
            + "; leave it out"
        )
    if algorithm.get("checkpoint_inner_steps"):
        raise ConfigError(
            "algorithm.compile=true and algorithm.checkpoint_inner_steps=true do not combine "
            "(torch.compile cannot capture the recomputation); set one of them to false"
        )
    if on_cpu and cpp_compiler() is None:
        raise ConfigError(
            "algorithm.compile=true on a CPU needs a C++ compiler for torch.compile (g++, or the "
            "one named by $CXX) and none was found; install one or leave algorithm.compile out"
        )
