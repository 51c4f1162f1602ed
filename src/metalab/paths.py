"""Where metalab finds its Hydra configs."""

import os
from pathlib import Path

# conf/ sits at the project root, beside src/ (the package is installed editable).
# METALAB_CONFIG_DIR points elsewhere, e.g. at a copy of conf/ with your own groups.
CONFIG_DIR = os.environ.get("METALAB_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf"))
