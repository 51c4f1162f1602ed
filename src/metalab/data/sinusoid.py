"""Sinusoid regression (the MAML paper's toy task family): y = A sin(x - phase), A, phase, x uniform."""

from collections.abc import Sequence
from pathlib import Path

import torch

from metalab.data.episodes import Episode, EpisodeDataset, require_positive
from metalab.errors import ConfigError


class SinusoidSource:
    task_type = "regression"
    input_shape = (1,)

    def __init__(self, amplitude: Sequence[float], phase: Sequence[float], x_range: Sequence[float]):
        self.amplitude = _interval("amplitude", amplitude)
        self.phase = _interval("phase", phase)
        self.x_range = _interval("x_range", x_range)

    def check(self, ways: int, shots: int, queries: int, split_name: str) -> None:
        require_positive(split_name, shots=shots, queries=queries)  # ways means nothing for regression

    def sample(self, ways: int, shots: int, queries: int, generator: torch.Generator) -> Episode:
        amplitude = _uniform(self.amplitude, (), generator)
        phase = _uniform(self.phase, (), generator)
        x = _uniform(self.x_range, (shots + queries, 1), generator)
        y = amplitude * torch.sin(x - phase)
        return Episode(x[:shots], y[:shots], x[shots:], y[shots:])


class Sinusoid(EpisodeDataset):
    """The MAML paper's sinusoid tasks (conf/dataset/sinusoid.yaml): amplitude, phase and x drawn
    uniformly from the intervals `amplitude`, `phase` and `x_range`."""

    def __init__(self, *, amplitude: Sequence[float], phase: Sequence[float], x_range: Sequence[float]):
        self.source = SinusoidSource(amplitude, phase, x_range)  # checks the intervals

    def sources(self, data_dir: Path, cache_dir: Path) -> dict[str, SinusoidSource]:
        """One task family for all splits; their episodes differ only by seed."""
        return {"train": self.source, "val": self.source, "test": self.source}


def _interval(name: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        low = high = None
    if low is None or not low <= high:
        raise ConfigError(f"dataset.{name}={value!r} is invalid; give [low, high] with low <= high")
    return low, high


def _uniform(interval: tuple[float, float], shape: tuple, generator: torch.Generator) -> torch.Tensor:
    low, high = interval
    return low + (high - low) * torch.rand(shape, generator=generator)
