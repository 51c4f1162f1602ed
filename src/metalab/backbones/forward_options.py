"""What the inner loop tells a backbone about one forward pass, passed as an argument.

A backbone's speed-only settings (Conv4's `memory_format`, `batch_norm_double_backward`,
`input_convolution`) are its constructor's: they configure the network, are stored with it in a
checkpoint's config, and `auto` lets it choose per pass. What it cannot know by itself is how the
pass will be used and what has already been computed for it; the inner loop
(algorithms/inner_loop.py) knows both and says so in a `ForwardOptions`, handed down as the
`options` keyword of the forward pass: `sgd_step` -> the batched loss -> `batched_forward` ->
`functional_call(model, params, (x,), {"options": ...})` -> the learner's network
(algorithms/maml.py, `BackboneWithHead`) -> the backbone. `module(x)` is a plain pass.

The options change which kernels run, never the numbers beyond rounding (docs/speed.md).
"""

import inspect
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True, eq=False)  # eq=False: a tensor field has no truth value to compare by
class ForwardOptions:
    """`differentiated_twice`: the gradient of this pass will itself be differentiated (the support
    pass of a second-order inner step), which picks BatchNorm's double backward, the memory layout
    and whether the input convolution is batched under `auto` (backbones/layout.py,
    backbones/batch_norm.py, backbones/conv4.py).
    `first_convolution`: the output of the backbone's first convolution on exactly this pass's
    input, already computed (for all tasks at once: conv4.input_convolutions_for_tasks), or None."""

    differentiated_twice: bool = False
    first_convolution: Tensor | None = None


PLAIN_PASS = ForwardOptions()


def takes_forward_options(module: nn.Module) -> bool:
    """Whether metalab hands `module` a pass's ForwardOptions: where its `forward` declares an
    `options` parameter (Conv4, a learner's BackboneWithHead). Every other module (mlp, resnet12, a
    user's own nn.Module) is called as `module(x)`, as it was written. Read from the signature, so
    a new backbone opts in by declaring it, with no list to extend."""
    return "options" in inspect.signature(module.forward).parameters
