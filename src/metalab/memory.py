"""Will the outer step fit in memory? Measured on one task before the first step.

A meta-batch too large for the machine otherwise ends in an allocation failure after the data
has loaded, or in the machine's memory used up. What the outer step must hold until its
backward pass is what autograd saves during the forward pass: one task's share is measured here
by running its forward pass once with a hook that records each saved tensor's storage; the
meta-batch holds that for each of its tasks (they are batched, so it grows linearly). That is a
lower bound on the step's peak, so a batch it refuses cannot fit.
"""

import os

import torch

from metalab.errors import ConfigError


def size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def saved_bytes_of_one_task(model, batch) -> int:
    """Bytes autograd saves for the backward pass of `model.meta_loss` on `batch` (one task), the
    meta-learned weights themselves not counted (they do not grow with the tasks)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def record(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    # The eager path saves what the compiled one does; torch.func's transforms (the compiled path's
    # traceable inner step) do not run under saved-tensor hooks.
    compiled, model.compiled = getattr(model, "compiled", False), False
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
            loss, _ = model.meta_loss(batch)
        del loss
    finally:
        model.compiled = compiled
    return sum(saved.values())


def available_bytes(accelerator: str) -> int | None:
    """Memory free for the run: the GPU's free memory, or the machine's available memory (None: unknown)."""
    if accelerator in ("gpu", "cuda"):
        return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_meta_batch_fits(
    model, datamodule, meta_batch_size: int, processes: int, accelerator: str, available: int | None = None
) -> None:
    """Refuse a meta_batch_size whose outer step cannot fit, naming the largest that might."""
    available = available_bytes(accelerator) if available is None else available
    if available is None:
        return
    per_task = saved_bytes_of_one_task(model, datamodule.example_batch("train", tasks=1))
    tasks = meta_batch_size // processes  # each DDP process holds its share
    if per_task * tasks <= available:
        return
    largest = (available // per_task) // processes * processes  # a multiple of the processes (DDP's split)
    where = "this GPU's free memory" if accelerator in ("gpu", "cuda") else "the memory available on this machine"
    advice = (
        f"set meta_batch_size={largest} or less"
        if largest >= 1
        else "even one task does not fit: fewer ways, shots or queries, fewer inner steps, or first-order"
    )
    raise ConfigError(
        f"meta_batch_size={meta_batch_size} needs at least {size(tasks * per_task)} for the outer step "
        f"({size(per_task)} a task, measured on one) but {where} is {size(available)}; {advice}"
    )


# What the fixed evaluation episodes cost before any is evaluated: the data module deals their
# indices as lists of batches (datamodule.eval_batches), 43 bytes an episode measured with
# tracemalloc (a Python int and its list slot); their values and test_episodes.json come on top.
EPISODE_INDEX_BYTES = 43


def check_episode_counts(config: dict, keys: tuple[str, ...], available: int | None = None) -> None:
    """Refuse a number of fixed evaluation episodes whose indices alone exceed the memory available."""
    available = available_bytes("cpu") if available is None else available
    if available is None:
        return
    largest = available // EPISODE_INDEX_BYTES
    for key in keys:
        count = config.get(key) or 0
        if count > largest:
            raise ConfigError(
                f"{key}={count} fixed episodes need at least {size(count * EPISODE_INDEX_BYTES)} to deal out "
                f"but the memory available on this machine is {size(available)}; set {key}={largest} or less "
                "(papers use 600 to 10,000)"
            )
