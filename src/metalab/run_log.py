"""What a run tells its user: Python logging to the console and the run's log file, the resolved
config as a tree, and the known noise of the libraries filtered out.

Hydra configures the handlers (conf/hydra/default.yaml, `job_logging`): INFO to stdout,
warnings and errors to stderr, everything to `<run dir>/<task>.log`. The filters below are
named there.
"""

import logging
import sys
import warnings

import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.syntax import Syntax
from rich.text import Text
from rich.tree import Tree

log = logging.getLogger("metalab")


def is_rank_zero() -> bool:
    """True in the one process that reports (rank 0 of DDP, or the only process)."""
    return getattr(rank_zero_only, "rank", 0) == 0


class RankZero(logging.Filter):
    """Every DDP process runs the same code: information from rank 0 only, so each line appears
    once; warnings and errors from every rank, marked with it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if is_rank_zero():
            return True
        if record.levelno < logging.WARNING:
            return False
        record.msg = f"[rank {rank_zero_only.rank}] {record.msg}"
        return True


class ConsoleOnly(logging.Filter):
    """For the console handlers: a record logged with extra={"console": False} goes to the
    log file only (the progress lines while a progress bar draws the same on the terminal)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "console", True)


class LevelBelow(logging.Filter):
    """For the stdout handler: records under `level` only (the stderr handler takes the rest)."""

    def __init__(self, level: str = "WARNING"):
        super().__init__()
        self.level = logging.getLevelName(level)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class NoAdverts(logging.Filter):
    """Lightning 2.6 logs "💡 Tip: ... try installing litlogger/litmodels" on every run, an
    advertisement for its cloud services with nothing to act on in metalab
    (lightning/pytorch/trainer/connectors/logger_connector.py, callback_connector.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_known_warnings() -> None:
    """Silence the warnings every run would print that no metalab setting can act on; send the
    rest through logging, into the run's log file as well as stderr."""
    # torch 2.10+ deprecates `isinstance(x, LeafSpec)`, which Lightning 2.6's own
    # lightning/pytorch/utilities/_pytree.py still calls at every batch transfer: not ours to fix.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    # trainer.overfit_batches (debug=overfit): Lightning 2.6 takes any IterableDataset loader for a
    # shuffled one (data_connector.py, _resolve_overfit_batches); metalab's training stream is
    # never shuffled, and its first meta-batches replay as they are.
    warnings.filterwarnings("ignore", message="You requested to overfit but enabled train dataloader shuffling")
    logging.captureWarnings(True)


def config_tree(config: dict, highlight: bool = True):
    """The resolved config as a rich Tree (as lightning-hydra-template's print_config_tree
    shows it): the run's own settings, then a branch per group (algorithm, dataset, trainer, ...),
    the values as YAML, highlighted for a terminal."""

    def leaf(value) -> Syntax | Text:
        text = yaml.safe_dump(value, sort_keys=False).rstrip() if value else "{}"
        # Syntax pads every line to the console's width: plain text for a file
        return Syntax(text, "yaml") if highlight else Text(text)

    tree = Tree("config", style="dim", guide_style="dim")
    settings = {key: value for key, value in config.items() if not isinstance(value, dict)}
    if settings:
        tree.add("run").add(leaf(settings))
    for key, value in config.items():
        if isinstance(value, dict):
            tree.add(key).add(leaf(value))
    return tree


def print_config_tree(config: dict) -> None:
    """Show the resolved config at the start of a run (rank 0); config.yaml keeps it."""
    if is_rank_zero():
        console = Console(file=sys.stdout, soft_wrap=True)  # a file: plain text, no colours
        console.print(config_tree(config, highlight=console.is_terminal))
