"""metalab: a meta-learning research framework on Lightning and Hydra."""

__version__ = "0.1.0"
__all__ = ["__version__", "load_learner"]


def __getattr__(name: str):
    # `metalab.load_learner` imports torch and the learners only when first used, so
    # `import metalab` stays cheap.
    if name == "load_learner":
        from metalab.api import load_learner

        return load_learner
    raise AttributeError(f"module 'metalab' has no attribute {name!r}")
