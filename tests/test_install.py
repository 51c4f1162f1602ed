"""A non-editable install works: `pip install .` into a fresh environment, then metalab-train from
another directory, with the configs the package carries (conf/, installed as metalab/conf)."""

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import setuptools
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_the_install_lists_every_package_and_carries_conf():
    """pyproject.toml lists its packages (setuptools cannot find metalab.conf, outside src/): every
    folder under src/ is there, and conf/ is installed as metalab/conf with its yaml files."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(project["packages"]) == sorted([*setuptools.find_packages(ROOT / "src"), "metalab.conf"])
    assert project["package-dir"] == {"": "src", "metalab.conf": "conf"}
    assert "**/*.yaml" in project["package-data"]["metalab.conf"]


def test_a_non_editable_install_trains_from_another_directory(tmp_path):
    """About 20 s on two shared cores: in the default run."""
    # The project as a clean clone ships it (a copy: pip builds in the source folder).
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for part in ("src", "conf"):
        shutil.copytree(ROOT / part, source / part, ignore=ignore)
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / file, source / file)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # The dependencies (and pip, setuptools) are this environment's, reached by path: no network.
    # Paths alone: the .pth files there (an editable metalab's) are not read, and PYTHONPATH is
    # cleared, so the only metalab the new environment sees is the one installed into it.
    packages = next(venv.glob("lib/python3*/site-packages"))
    (packages / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "METALAB_CONFIG_DIR")}
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    done = subprocess.run([*install, str(source)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.rmtree(source)  # nothing may be read from the source any more

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import metalab, metalab.settings as s; print(metalab.__file__); print(s.CONFIG_DIR)"],
        env=env,
        capture_output=True,
        text=True,
        cwd=elsewhere,
    )
    module, config_dir = where.stdout.split()
    assert Path(module).is_relative_to(packages) and Path(config_dir) == packages / "metalab" / "conf", where
    run_dir = tmp_path / "run"
    overrides = [
        f"hydra.run.dir={run_dir}",
        "trainer.max_steps=5",
        "trainer.val_check_interval=5",
        "val_episodes=4",
        "test_episodes=4",
        "logger=none",
        "trainer.enable_progress_bar=false",
    ]
    train = subprocess.run(
        [str(venv / "bin" / "metalab-train"), *overrides],
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        cwd=elsewhere,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test/mse"] > 0 and (run_dir / "checkpoints" / "last.ckpt").is_file()
