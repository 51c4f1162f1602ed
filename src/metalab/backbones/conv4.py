"""The four-block convolutional embedding of Vinyals et al. (2016), used by MAML and ProtoNet."""

import math
from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from metalab.backbones.batch_norm import (
    BATCH_NORM_DOUBLE_BACKWARDS,
    batch_norm_with_batch_statistics,
    uses_metalab_double_backward,
)
from metalab.backbones.forward_options import PLAIN_PASS, ForwardOptions
from metalab.backbones.layout import MEMORY_FORMATS, chosen_memory_format
from metalab.errors import check_choice

# backbone.input_convolution: how the per-task loop (algorithms/inner_loop.py) runs the first
# convolution, the one on the images, when every task has its own weights:
#   batched:  all tasks at once, the images unfolded into 3×3 patches and one batched matmul
#             over the tasks;
#   per_task: one convolution per task, with the rest of the network;
#   auto:     batched for a pass differentiated twice (a second-order support pass) on a CPU
#             with a stride-1 first convolution, where it was measured to pay (docs/speed.md,
#             "The input convolution"); per_task elsewhere, so evaluation and first-order
#             passes run exactly as before.
# The numbers are the same to rounding (a matmul sums the 9·C products in another order).
INPUT_CONVOLUTIONS = ("auto", "batched", "per_task")


class SamePaddedConv2d(nn.Conv2d):
    """A convolution with TensorFlow's 'SAME' padding: ceil(size / stride) outputs per side,
    an odd pad pixel going after (bottom/right). For stride 1 and a 3×3 kernel that is
    padding=1; for stride 2 PyTorch's symmetric padding would shift the sampling grid by a pixel."""

    def same_padding(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, stride, kernel in zip(reversed(x.shape[-2:]), reversed(self.stride), reversed(self.kernel_size)):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]  # F.pad order: (left, right, top, bottom)
        return F.pad(x, pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.same_padding(x))


def channels_last_convolution(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` with its output in the channels-last layout. A 1-channel image (Omniglot) has no
    channels-last layout of its own, and the CPU convolution returns the contiguous one for it,
    which its BatchNorm and pooling then read slowly, or a copy converts (about as slow). With a
    second, zero channel, and zero weights for it, the layout is unambiguous: the output and the
    weight gradient are bit for bit those of the 1-channel convolution (the zeros add exactly
    nothing), and the layout several times faster (docs/speed.md, "Memory layout", has the figures)."""
    channels_last = torch.channels_last
    if x.shape[1] != 1:  # given a channels-last input (a no-op from the second block on), it returns one
        return conv(x.contiguous(memory_format=channels_last)).contiguous(memory_format=channels_last)
    x = torch.cat([x, torch.zeros_like(x)], 1).contiguous(memory_format=channels_last)
    weight = torch.cat([conv.weight, torch.zeros_like(conv.weight)], 1).contiguous(memory_format=channels_last)
    if isinstance(conv, SamePaddedConv2d):
        x = conv.same_padding(x)
    return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding)


def options_for_tasks(
    model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor, options: ForwardOptions
) -> list[ForwardOptions]:
    """One pass's `options` for each task of per-task `params` ([tasks, ...], named as in `model`)
    and images `x` ([tasks, n, C, H, W]), each handing its task's first convolution where a Conv4
    that takes `model`'s input (the model itself, or the first module of an nn.Sequential) runs it
    for all tasks at once (input_convolutions_for_tasks)."""
    convolved = input_convolutions_for_tasks(model, params, x, options)
    if convolved is None:
        return [options] * x.shape[0]
    return [replace(options, first_convolution=c) for c in convolved]


def input_convolutions_for_tasks(
    model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor, options: ForwardOptions
) -> list[torch.Tensor] | None:
    """Each task's first convolution of a Conv4 that takes `model`'s input (the model itself, or
    the first module of an nn.Sequential), computed for all tasks at once from per-task `params`
    ([tasks, ...], named as in `model`) and images `x` ([tasks, n, C, H, W]) for a pass with
    `options`: a list of [n, C', H, W] outputs in the layout each task's pass runs in; None where
    the backbone's input_convolution setting keeps that convolution per task (INPUT_CONVOLUTIONS)."""
    backbone = model[0] if isinstance(model, nn.Sequential) and len(model) else model
    twice = options.differentiated_twice
    if not isinstance(backbone, Conv4) or not backbone.batches_input_convolution(x, twice):
        return None
    conv = backbone.layers[0][0]
    prefix = "" if backbone is model else f"{next(model.named_children())[0]}."  # "0." in nn.Sequential
    name = f"{prefix}layers.0.0"
    weight, bias = params[f"{name}.weight"], params.get(f"{name}.bias")
    tasks, images = x.shape[:2]
    flat = x.flatten(0, 1)
    flat = conv.same_padding(flat) if isinstance(conv, SamePaddedConv2d) else flat
    height, width = (
        (size + 2 * pad - (kernel - 1) - 1) // stride + 1
        for size, pad, kernel, stride in zip(flat.shape[-2:], conv.padding, conv.kernel_size, conv.stride)
    )
    # [tasks·n, C·3·3, H'·W'] -> [tasks, n·H'·W', C·3·3]: each output pixel's patch as a row
    patches = F.unfold(flat, conv.kernel_size, padding=conv.padding, stride=conv.stride)
    patches = patches.view(tasks, images, patches.shape[1], -1).transpose(2, 3).flatten(1, 2)
    kernels = weight.flatten(2).transpose(1, 2)  # [tasks, C·3·3, C'], unfold's (c, i, j) order
    out = torch.bmm(patches, kernels) if bias is None else torch.baddbmm(bias.unsqueeze(1), patches, kernels)
    # [tasks, n·H'·W', C'] holds each task's [n, C', H', W'] in the channels-last layout
    per_task_out = out.view(tasks, images, height, width, -1).permute(0, 1, 4, 2, 3).unbind(0)
    channels_last = backbone.runs_channels_last(x[0], backbone.uses_metalab_norm(x[0], twice), twice)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return [o.contiguous(memory_format=layout) for o in per_task_out]


def conv_block(
    in_channels: int,
    out_channels: int,
    pool: bool = True,
    stride: int = 1,
    ceil_pool: bool = False,
    running_stats: bool = False,
    batch_norm_scale: bool = True,
) -> nn.Sequential:
    # By default BatchNorm without running statistics: every forward pass normalizes with
    # the statistics of the images it is given. Under vmap each task is its own batch, so
    # the statistics are per task (transductive, as in MAML's reference code), the
    # module holds no buffers to mutate inside the inner loop, and an episode's result
    # does not depend on which other episodes share its meta-batch. `running_stats=True`
    # keeps running averages, used in eval mode; only for learners that do not vmap the
    # backbone (the metric learners, algorithms/metric.py).
    conv = (
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        if stride == 1
        else SamePaddedConv2d(in_channels, out_channels, kernel_size=3, stride=stride)
    )
    norm = nn.BatchNorm2d(out_channels, track_running_stats=running_stats)
    if not batch_norm_scale:
        # γ held at 1: a buffer, so it is neither trained nor adapted, and keeps its state-dict name.
        del norm.weight
        norm.register_buffer("weight", torch.ones(out_channels))
    if not pool:
        return nn.Sequential(conv, norm, nn.ReLU())
    # Max-pooling before the ReLU: the two commute exactly (ReLU is monotone, so the max of the
    # ReLUs is the ReLU of the max, and the gradient reaches the same pixel), and the ReLU's
    # forward and backward then see a quarter of the pixels. The parameter names are those of
    # conv, BatchNorm, ReLU, pool (neither of the last two holds any), so checkpoints load as before.
    return nn.Sequential(conv, norm, nn.MaxPool2d(2, ceil_mode=ceil_pool), nn.ReLU())


class Conv4(nn.Module):
    """`blocks` × [3×3 conv, BatchNorm, ReLU, 2×2 max-pool], flattened (pooled before the ReLU, the same).

    28×28 Omniglot gives 64 features, 84×84 miniImageNet 64×5×5 = 1600.

    For learners that compare feature maps (Relation Networks): `pooled_blocks=k` keeps
    the max-pool in the first k blocks only (the Relation Network embedding: k=2, so
    Omniglot keeps a 64×7×7 map), and `feature_map=True` returns the [C, H, W] map
    unflattened, its shape in `out_shape`. The defaults are the network above.

    Finn et al.'s Omniglot network (cbfinn/maml, utils.py:26-37 `conv_block`, maml.py:211-223
    `forward_conv`) is `pooled_blocks=0, stride=2, global_average=True`: 3×3 convolutions of
    stride 2 with 'SAME' padding instead of max-pooling (28 -> 14 -> 7 -> 4 -> 2), and the
    final map averaged over its positions (64 features) rather than flattened.
    `ceil_pool=True` pools like TensorFlow's 'same' max-pooling, keeping a last odd row and
    column (84 -> 42 -> 21 -> 11 -> 6), as supervised-reptile's miniImageNet network does.
    `running_stats=True`: BatchNorm keeps running statistics (see conv_block).
    `batch_norm_scale=False`: BatchNorm without the learned scale γ (held at 1), only the shift
    β, as TensorFlow's `batch_norm` by default and so Finn et al.'s network (utils.py `normalize`).
    `memory_format`: the images' layout inside the network, for speed only (MEMORY_FORMATS).
    `batch_norm_double_backward`: whose BatchNorm double backward a second-order inner step's
    support pass uses, for speed only (backbones/batch_norm.py, BATCH_NORM_DOUBLE_BACKWARDS).
    `input_convolution`: whether the per-task loop runs the first convolution for all tasks at
    once, for speed only (INPUT_CONVOLUTIONS).
    Under `auto` these three choose per pass, from the ForwardOptions the inner loop hands to
    `forward` (backbones/forward_options.py); `forward(x)` is a plain pass.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        hidden_channels: int = 64,
        blocks: int = 4,
        pooled_blocks: int | None = None,
        feature_map: bool = False,
        stride: int = 1,
        global_average: bool = False,
        ceil_pool: bool = False,
        running_stats: bool = False,
        batch_norm_scale: bool = True,
        memory_format: str = "auto",
        batch_norm_double_backward: str = "auto",
        input_convolution: str = "auto",
    ):
        super().__init__()
        check_choice("backbone.memory_format", memory_format, MEMORY_FORMATS)
        check_choice("backbone.batch_norm_double_backward", batch_norm_double_backward, BATCH_NORM_DOUBLE_BACKWARDS)
        self.memory_format = memory_format
        self.batch_norm_double_backward = batch_norm_double_backward
        check_choice("backbone.input_convolution", input_convolution, INPUT_CONVOLUTIONS)
        self.input_convolution = input_convolution
        pooled_blocks = blocks if pooled_blocks is None else pooled_blocks
        channels = [input_shape[0]] + [hidden_channels] * blocks
        self.layers = nn.Sequential(
            *(
                conv_block(
                    c_in,
                    c_out,
                    pool=i < pooled_blocks,
                    stride=stride,
                    ceil_pool=ceil_pool,
                    running_stats=running_stats,
                    batch_norm_scale=batch_norm_scale,
                )
                for i, (c_in, c_out) in enumerate(zip(channels, channels[1:]))
            )
        )
        self.feature_map = feature_map
        self.global_average = global_average
        with torch.no_grad():
            # eval: the shape probe must not update running statistics
            self.out_shape = tuple(self.pooled(self.layers.eval()(torch.zeros(2, *input_shape))).shape[1:])
        self.layers.train()
        self.out_features = math.prod(self.out_shape)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        return features.mean((-2, -1)) if self.global_average else features

    def uses_metalab_norm(self, x: torch.Tensor, differentiated_twice: bool) -> bool:
        return uses_metalab_double_backward(self.batch_norm_double_backward, self.layers[0][1], x, differentiated_twice)

    def runs_channels_last(self, x: torch.Tensor, metalab_norm: bool, differentiated_twice: bool) -> bool:
        """Whether a pass over `x` runs in the channels-last layout, given whether it is
        `differentiated_twice` and whether its BatchNorms then use metalab's double backward
        (`uses_metalab_norm`). Under vmap (ANIL's body, learners that vmap the backbone) a
        tensor's layout can be neither queried nor changed: those passes keep the layout they are given."""
        chosen = chosen_memory_format(
            self.memory_format, x, differentiated_twice, pytorch_double_backward=not metalab_norm
        )
        return chosen == "channels_last" and x.dim() == 4 and not torch._C._functorch.is_batchedtensor(x)

    def batches_input_convolution(self, x: torch.Tensor, differentiated_twice: bool) -> bool:
        """Whether the per-task loop runs the first convolution for all tasks at once on the
        per-task images `x` ([tasks, n, C, H, W]) under `input_convolution`, in a pass
        `differentiated_twice` or not."""
        conv = self.layers[0][0]  # unfold below takes zero padding, no dilation, no groups
        plain = conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and conv.groups == 1
        plain = plain and conv.dilation == (1, 1)
        if self.input_convolution == "per_task" or not plain or x.dim() != 5:
            return False
        if self.input_convolution == "batched":
            return True
        # auto: measured faster for the stride-1 network only; Finn et al.'s stride-2 one ran
        # 0.96-0.97x with it (docs/speed.md), its per-task convolution being a quarter the work
        return x.device.type == "cpu" and differentiated_twice and conv.stride == (1, 1)

    def forward(self, x: torch.Tensor, options: ForwardOptions = PLAIN_PASS) -> torch.Tensor:
        """The features of images `x` ([n, C, H, W]); `options`: what the inner loop says of this
        pass (ForwardOptions), which only picks the kernels."""
        twice = options.differentiated_twice
        metalab_norm = self.uses_metalab_norm(x, twice)
        channels_last = self.runs_channels_last(x, metalab_norm, twice)
        for i, block in enumerate(self.layers):
            conv, *rest = block
            if i == 0 and options.first_convolution is not None:
                x = options.first_convolution  # computed for all tasks at once (input_convolutions_for_tasks)
            else:
                x = channels_last_convolution(conv, x) if channels_last else conv(x)
            for layer in rest:
                if metalab_norm and isinstance(layer, nn.BatchNorm2d):
                    x = batch_norm_with_batch_statistics(x, layer.weight, layer.bias, layer.eps)
                else:
                    x = layer(x)
        features = self.pooled(x)
        return features if self.feature_map else features.flatten(1)
