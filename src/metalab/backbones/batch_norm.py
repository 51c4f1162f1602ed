"""Batch normalization with batch statistics whose gradient is cheap to differentiate again.

A second-order inner step (MAML, Meta-SGD, MAML++) differentiates the support pass's gradient:
the outer backward pass runs each BatchNorm's *double backward*. PyTorch's
(`NativeBatchNormBackwardBackward0`, `batchnorm_double_backward` in its FunctionsManual.cpp)
is a composite of about 35 elementwise kernels over the full feature map. Written out, the
same derivatives need about 8 passes, two of them PyTorch's own fused BatchNorm backward
kernel, so here they are derived by hand (docs/speed.md, "BatchNorm's double backward", has
the figures). The forward pass and the first backward pass are PyTorch's own kernels, so a
forward pass and an inner gradient are bit for bit those of `F.batch_norm`; only the
second-order terms are computed differently, equal to rounding (tested against PyTorch's
in float64 in tests/test_batch_norm.py).

The math, per channel, over its M = N·H·W values, x̂ = (x − μ)·r with r = (σ² + ε)^-½:
    y = γ x̂ + β
    backward, given g = ∂L/∂y:  dβ = Σ g,  dγ = Σ g x̂,  dx = γ r P(g)
where P(v) = v − mean(v) − x̂ · mean(v x̂) (self-adjoint). The double backward takes the
gradients a, a_γ, a_β of a second loss L₂ with respect to dx, dγ, dβ and returns those with
respect to g, x and γ:
    ∂L₂/∂g = γ r P(a) + a_γ x̂ + a_β
    ∂L₂/∂γ = r Σ a P(g)
    ∂L₂/∂x = r P(G) − (r² R / M) x̂,   G = a_γ g − γ r (a · mean(g x̂) + g · mean(a x̂)),
                                        R = γ Σ a P(g)
(G is ∂L₂/∂x̂ holding r, R is ∂L₂/∂r holding x̂; ∂x̂/∂x = r P and ∂r/∂x = −r² x̂ / M.)
Every sum and mean above is per channel, so each result is a per-channel combination of a,
g and x plus one fused kernel: no intermediate full-size tensor beyond the outputs.
"""

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

# backbone.batch_norm_double_backward: whose double backward a pass differentiated twice uses:
#   metalab: the one written out here; pytorch: PyTorch's own (F.batch_norm);
#   auto: metalab's on a CPU, where it was measured to pay, PyTorch's elsewhere (not measured).
# The numbers are the same to rounding, and forward passes and first gradients bit for bit.
BATCH_NORM_DOUBLE_BACKWARDS = ("auto", "metalab", "pytorch")

# PyTorch's fused BatchNorm backward kernel: from (grad, input, weight, mean, invstd) it returns
# weight·invstd·P(grad), Σ grad·x̂ and Σ grad per channel, each only where its mask asks.
_native_backward = torch.ops.aten.native_batch_norm_backward


def _per_channel(values: Tensor) -> Tensor:
    """[C] -> [1, C, 1, 1]: broadcast over a feature map's batch and spatial dimensions."""
    return values.view(1, -1, 1, 1)


class _BatchNormTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)[:3]
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        x, weight, mean, invstd = ctx.saved_tensors
        # A Function of its own, so that the gradient, taken with create_graph, has the
        # hand-written double backward below as its backward.
        dx, dweight, dbias = _BatchNormTrainBackward.apply(grad, x, weight, mean, invstd, ctx.eps)
        return dx, dweight, dbias, None


class _BatchNormTrainBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, x, weight, mean, invstd, eps):
        dx, dweight, dbias = _native_backward(grad, x, weight, None, None, mean, invstd, True, eps, [True] * 3)
        # dweight = Σ g x̂ and dbias = Σ g are the double backward's mean(g x̂) and mean(g), times M.
        ctx.save_for_backward(grad, x, weight, mean, invstd, dweight, dbias)
        ctx.eps = eps
        return dx, dweight, dbias

    @staticmethod
    @once_differentiable  # a third derivative is not written: asking for one is an error, not a wrong number
    def backward(ctx, a, a_weight, a_bias):
        g, x, weight, mean, invstd, sum_gx, sum_g = ctx.saved_tensors
        count = x.numel() // x.shape[1]  # M
        a = torch.zeros_like(x) if a is None else a
        a_weight = torch.zeros_like(weight) if a_weight is None else a_weight
        a_bias = torch.zeros_like(weight) if a_bias is None else a_bias
        # One fused kernel: γ r P(a), Σ a x̂ and Σ a; a second (mean 0, invstd 1 makes "x̂" = g): Σ a g.
        weighted_pa, sum_ax, sum_a = _native_backward(a, x, weight, None, None, mean, invstd, True, ctx.eps, [True] * 3)
        _, sum_ag, _ = _native_backward(
            a, g, None, None, None, torch.zeros_like(mean), torch.ones_like(invstd), True, 0.0, [False, True, False]
        )
        mean_a, mean_ax, mean_g, mean_gx = sum_a / count, sum_ax / count, sum_g / count, sum_gx / count
        a_dot_pg = sum_ag - count * (mean_a * mean_g + mean_ax * mean_gx)  # Σ a P(g)
        gamma_r = weight * invstd

        # ∂L₂/∂g = γ r P(a) + a_γ x̂ + a_β, with a_γ x̂ written as a_γ r x − a_γ r μ.
        scale = a_weight * invstd
        # In place: out-of-place addcmul with a broadcast operand measured several times slower.
        grad_g = weighted_pa.add_(_per_channel(a_bias - scale * mean)).addcmul_(x, _per_channel(scale))

        grad_weight = invstd * a_dot_pg

        # ∂L₂/∂x = r P(G) − (r² R / M) x̂ with G = k_a a + k_g g; its sums Σ G and Σ G x̂ follow
        # from the per-channel sums already taken, so the result is c_a a + c_g g + c_x x + c.
        k_a = -gamma_r * mean_gx
        k_g = a_weight - gamma_r * mean_ax
        sum_G = k_a * sum_a + k_g * sum_g
        sum_Gx = k_a * sum_ax + k_g * sum_gx
        xhat_coefficient = -invstd * sum_Gx / count - invstd**2 * weight * a_dot_pg / count
        grad_x = a * _per_channel(invstd * k_a)
        grad_x.addcmul_(g, _per_channel(invstd * k_g)).addcmul_(x, _per_channel(xhat_coefficient * invstd))
        grad_x.add_(_per_channel(-invstd * sum_G / count - xhat_coefficient * invstd * mean))
        return grad_g, grad_x, grad_weight, None, None, None


def batch_norm_with_batch_statistics(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """`F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)` for [N, C, H, W] feature
    maps: the same numbers forward and backward, with a faster double backward (module docstring)."""
    return _BatchNormTrain.apply(x, weight, bias, eps)


def uses_metalab_double_backward(choice: str, norm: nn.Module, x: Tensor, differentiated_twice: bool) -> bool:
    """Whether `norm(x)` runs as `batch_norm_with_batch_statistics` under `choice`
    (BATCH_NORM_DOUBLE_BACKWARDS): a 2-d BatchNorm with weights that normalizes with its batch's
    statistics and keeps no running ones, in a pass `differentiated_twice` (ForwardOptions), outside
    vmap (whose batched tensors a custom autograd Function does not take)."""
    if choice == "pytorch" or not differentiated_twice:
        return False
    return (
        isinstance(norm, nn.BatchNorm2d)
        and norm.affine
        and norm.running_mean is None
        and x.dim() == 4
        and not torch._C._functorch.is_batchedtensor(x)
        and (choice == "metalab" or x.device.type == "cpu")
    )
