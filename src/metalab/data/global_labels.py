"""Training episodes labelled with each class's index in the training split, for the transfer
baselines (`algorithm=baseline`, `baselinepp`; Chen et al. 2019).

Those learners meta-train as a standard classifier over every training class, so an image's
label must name its class among all of the split's classes, not its position in one
episode. Chosen with `dataset.episodes=global_labels` (their algorithm configs set it):

- the `train` split yields the usual episodes (the same images, drawn by the same seeded
  stream, so resuming and DDP sharding work unchanged), with `support_y` and `query_y`
  holding the class index in 0..classes-1 of the training split;
- the `val` and `test` splits stay ordinary few-shot episodes labelled 0..ways-1, on which
  the learner fits a new head per episode.

A meta-batch of `meta_batch_size` such episodes of `ways` classes with `shots + queries`
images each is one mini-batch of the classifier (conf/experiment/baseline_omniglot_*.yaml
give the batch of 16 images Chen et al. train with).
"""

import torch

from metalab.data.episodes import Episode
from metalab.errors import ConfigError


class GlobalLabelSource:
    """Wraps a class-labelled source: same `sample`/`check` interface, labels global to the split."""

    task_type = "classification"

    def __init__(self, source):
        if not hasattr(source, "sample_with_classes"):
            raise ConfigError(
                f"dataset.episodes=global_labels needs a dataset of image classes; the "
                f"{type(source).__name__} source cannot tell which class a label stands for"
            )
        self.source = source
        self.input_shape = source.input_shape
        self.class_names = source.class_names
        self.num_classes = len(source.class_names)

    def check(self, ways: int, shots: int, queries: int, split_name: str) -> None:
        self.source.check(ways, shots, queries, split_name)

    def sample(self, ways: int, shots: int, queries: int, generator: torch.Generator) -> Episode:
        episode, classes = self.source.sample_with_classes(ways, shots, queries, generator)
        return episode._replace(support_y=classes[episode.support_y], query_y=classes[episode.query_y])
