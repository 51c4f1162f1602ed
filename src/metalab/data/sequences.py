"""Sequential episodes for the memory-based learners (Santoro et al. 2016, `algorithm=mann`/`lstm`).

An episode is one sequence: `ways` classes, each shown `shots` times (the paper's "instances";
10 for its 5-class runs), shuffled together. At step t the model sees image t and the true label
of step t-1 (nothing at the first step), and must predict the label of image t. A class's first
showing can only be guessed; from its second on, a learner that bound image and label in memory
can answer. Which class gets which label is drawn afresh for every episode, so nothing about the
class-to-label mapping can be memorised across episodes.

How the sequence travels in an `Episode` (so the data module, loaders and fixed, seeded
evaluation episodes work unchanged, meta-batch first):

- support_x [ways*shots, C, H, W], support_y [ways*shots]: the sequence, in presentation order,
  with its labels (0..ways-1). The model builds the one-step-offset label input itself
  (`offset_labels`), so the data never holds a label the model should not see yet.
- query_x [ways*queries, ...], query_y: further, unseen images of the same classes. They are not
  part of the paper's protocol; evaluation classifies them after the whole sequence through
  `adapt`/`predict` (`acc_query`), which is how the application API uses a memory learner.

Chosen with `dataset.episodes=sequence` (the `mann` and `lstm` algorithm configs set it);
`dataset.episodes=few_shot` (the default) keeps the support/query episodes of the other learners;
`dataset.episodes=global_labels` labels the training episodes with global class indices, for the
transfer baselines (data/global_labels.py).
"""

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from metalab.data.episodes import Episode
from metalab.data.global_labels import GlobalLabelSource
from metalab.errors import ConfigError, check_choice

EPISODE_KINDS = ("few_shot", "sequence", "global_labels")


def episode_shaper(kind: str, dataset: str) -> Callable[[Mapping], dict]:
    """A function turning a dataset's split sources into `kind` episodes (`kind` is checked now)."""
    check_choice("dataset.episodes", kind, EPISODE_KINDS)

    def shape(sources: Mapping) -> dict:
        if kind == "few_shot":
            return dict(sources)
        task_type = next(iter(sources.values())).task_type
        if task_type != "classification":
            raise ConfigError(
                f"dataset.episodes={kind} needs a classification dataset, but dataset={dataset} "
                f"is {task_type}; choose e.g. dataset=omniglot"
            )
        if kind == "global_labels":  # the transfer baselines' training split (data/global_labels.py)
            return {**sources, "train": GlobalLabelSource(sources["train"])}
        return {split: SequenceSource(source) for split, source in sources.items()}

    return shape


class SequenceSource:
    """Wraps a class-labelled source: same `sample`/`check` interface, the support shuffled into a sequence."""

    task_type = "classification"

    def __init__(self, source):
        self.source = source
        self.input_shape = source.input_shape

    def check(self, ways: int, shots: int, queries: int, split_name: str) -> None:
        # The images needed per class are the same as for a few-shot episode: shots + queries.
        self.source.check(ways, shots, queries, split_name)

    def sample(self, ways: int, shots: int, queries: int, generator: torch.Generator) -> Episode:
        # The wrapped source draws the classes in random order and labels them by that order,
        # which is the per-episode random class-to-label assignment.
        episode = self.source.sample(ways, shots, queries, generator)
        order = torch.randperm(ways * shots, generator=generator)
        return episode._replace(support_x=episode.support_x[order], support_y=episode.support_y[order])


def offset_labels(labels: Tensor, ways: int) -> Tensor:
    """[..., T, ways] model input: at step t the one-hot label of step t-1; zeros at step 0."""
    one_hot = torch.nn.functional.one_hot(labels, ways).float()
    return torch.cat([torch.zeros_like(one_hot[..., :1, :]), one_hot[..., :-1, :]], dim=-2)


def instance_numbers(labels: Tensor) -> Tensor:
    """[..., T]: at step t, how many times labels[t] has been shown up to and including t (1, 2, ...)."""
    same = labels.unsqueeze(-1) == labels.unsqueeze(-2)  # [..., T, T]: step s shows step t's class
    return torch.tril(same).sum(-1)  # count the steps s <= t
