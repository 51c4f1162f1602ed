"""The images' memory layout inside a convolutional backbone (backbone.memory_format).

The numbers are the same in every layout; only the speed differs. `auto`, the default, is
measured per pass on a CPU (docs/speed.md, "Memory layout"):

- channels_last (NHWC) on a CPU: BatchNorm and max-pooling run several times faster in it;
- except, contiguous (NCHW) for a pass that is differentiated twice (a second-order inner
  step's support pass) while its BatchNorm double backward is PyTorch's own
  (backbone.batch_norm_double_backward=pytorch): that composite reads and writes both layouts
  and runs 1.1-1.35× slower in channels_last. metalab's (backbones/batch_norm.py, the default
  on a CPU) runs faster in channels_last, like everything else;
- contiguous on other devices, where it is not measured.
"""

import torch

MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


def chosen_memory_format(
    memory_format: str, x: torch.Tensor, differentiated_twice: bool = False, pytorch_double_backward: bool = True
) -> str:
    """The layout a pass over `x` runs in under `memory_format` (one of MEMORY_FORMATS);
    `differentiated_twice`: whether the pass's gradient will itself be differentiated
    (ForwardOptions); `pytorch_double_backward`: whether its BatchNorms, if so, use PyTorch's
    double backward."""
    if memory_format != "auto":
        return memory_format
    slow_double_backward = differentiated_twice and pytorch_double_backward
    return "channels_last" if x.device.type == "cpu" and not slow_double_backward else "contiguous"
