"""metalab: a meta-learning research framework on Lightning and Hydra."""

__version__ = "0.1.0"
