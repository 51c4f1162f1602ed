"""The images' memory layout inside a convolutional backbone (backbone.memory_format).

The numbers are the same in every layout; only the speed differs. `auto`, the default, is
measured per pass on a CPU (docs/speed.md, "Memory layout"):

- channels_last (NHWC) for a pass that is differentiated at most once (every forward and
  backward of the metric learners, first-order learners, evaluation, and MAML's query
  pass): BatchNorm and max-pooling run several times faster in it;
- contiguous (NCHW) for a pass that is differentiated twice (a second-order inner step's
  support pass): PyTorch's BatchNorm double backward reads and writes both layouts there
  and runs 1.1-1.35× slower in channels_last than in contiguous;
- contiguous on other devices, where it is not measured.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

MEMORY_FORMATS = ("auto", "contiguous", "channels_last")

_differentiated_twice = ContextVar("differentiated_twice", default=False)


@contextmanager
def second_order_pass() -> Iterator[None]:
    """Marks the forward passes inside it as ones whose gradient will itself be differentiated
    (the support pass of a second-order inner step: inner_loop.sgd_step)."""
    token = _differentiated_twice.set(True)
    try:
        yield
    finally:
        _differentiated_twice.reset(token)


def differentiated_twice() -> bool:
    """Whether the forward passes running now are inside `second_order_pass`."""
    return _differentiated_twice.get()


def chosen_memory_format(memory_format: str, x: torch.Tensor) -> str:
    """The layout a pass over `x` runs in under `memory_format` (one of MEMORY_FORMATS)."""
    if memory_format != "auto":
        return memory_format
    return "channels_last" if x.device.type == "cpu" and not differentiated_twice() else "contiguous"
