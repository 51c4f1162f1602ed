"""A graph pass for algorithm.compile=true: short batched matmuls become fused arithmetic.

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

from typing import Any

import torch

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
