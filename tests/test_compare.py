"""scripts/compare.py: runs paper settings, then writes the table beside the papers' figures and a PNG."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_compare_runs_experiments_and_writes_table_and_learning_curves(tmp_path):
    out, plot = tmp_path / "comparison.md", tmp_path / "curves.png"
    command = [sys.executable, str(REPO / "scripts" / "compare.py"), "run", "maml_sinusoid_5shot", "--set",
               "trainer.max_steps=40", "trainer.val_check_interval=20", "trainer.log_every_n_steps=5",
               "val_episodes=10", "test_episodes=20", f"paths.cache_dir={tmp_path}",
               "--log-dir", str(tmp_path / "logs"), "--out", str(out), "--plot", str(plot)]
    finished = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
    assert finished.returncode == 0, finished.stderr[-2000:]
    results = json.loads(next((tmp_path / "logs").glob("**/results.json")).read_text())
    row = next(line for line in out.read_text().splitlines() if line.startswith("| maml"))
    # Ours (from results.json) beside the paper's figure recorded in the experiment config.
    assert f"{results['test/mse']:.2f} ± {results['test/mse_ci95']:.2f}" in row and "| 0.67 |" in row
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000

    # Reading the finished run gives the same table.
    again = tmp_path / "again.md"
    subprocess.run([sys.executable, str(REPO / "scripts" / "compare.py"), "read", str(tmp_path / "logs"),
                    "--out", str(again), "--plot", str(tmp_path / "again.png")], check=True, capture_output=True)
    assert again.read_text() == out.read_text()
