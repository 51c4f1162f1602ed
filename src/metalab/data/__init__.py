"""Episodic data: few-shot tasks from Omniglot, image folders (miniImageNet) and sinusoids."""

from metalab.data.datamodule import EpisodicDataModule, build_sources
from metalab.data.episodes import Episode, episode_generator, sample_meta_batch

__all__ = ["Episode", "EpisodicDataModule", "build_sources", "episode_generator", "sample_meta_batch"]
