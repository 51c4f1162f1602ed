"""Shared fixtures: where the real data and the decoded-image cache live, and the `data` marker's rule."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT_ARCHIVES = ("images_background.zip", "images_evaluation.zip")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return Path(os.environ.get("METALAB_DATA_DIR") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ.get("METALAB_CACHE_DIR") or REPO / ".cache")


@pytest.fixture(scope="session")
def omniglot_dir(data_dir: Path) -> Path:
    """The Omniglot folder; skips the test without the archives, or fails it where CI requires data."""
    missing = [name for name in OMNIGLOT_ARCHIVES if not (data_dir / "omniglot" / name).is_file()]
    if missing:
        reason = f"Omniglot archives {missing} not found under {data_dir / 'omniglot'}; set METALAB_DATA_DIR"
        if os.environ.get("METALAB_REQUIRE_DATA") == "1":
            pytest.fail(f"{reason} (METALAB_REQUIRE_DATA=1 makes missing data a failure)", pytrace=False)
        pytest.skip(reason)
    return data_dir / "omniglot"


@pytest.fixture(autouse=True)
def _data_marker_needs_omniglot(request):
    # Marking a test `data` is enough: it then gets the skip-or-fail rule of `omniglot_dir`.
    if request.node.get_closest_marker("data"):
        request.getfixturevalue("omniglot_dir")
