"""Where metalab finds its Hydra configs, and the resolvers they name."""

import os
from pathlib import Path

import metalab.run_dirs  # noqa: F401  (registers ${metalab.run_dir:...} and ${metalab.new_dir:...})

# conf/ sits at the project root, beside src/ (the package is installed editable).
# METALAB_CONFIG_DIR points elsewhere, e.g. at a copy of conf/ with your own groups.
CONFIG_DIR = os.environ.get("METALAB_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf"))
