"""The meta-test protocol of the papers: mean over fixed episodes with a 95% confidence interval."""

import math

import torch


def mean_and_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean of per-episode values and the half-width of its 95% normal confidence interval.

    1.96 · s / √n with the sample standard deviation s, as reported by MAML, ProtoNet and
    most few-shot papers (600 or 1,000 episodes make the normal approximation fine).
    """
    values = values.detach().double().flatten()
    n = values.numel()
    if n == 0:
        raise ValueError("no episodes were evaluated")
    mean = values.mean().item()
    if n == 1:
        return mean, float("nan")
    return mean, 1.96 * values.std(unbiased=True).item() / math.sqrt(n)
