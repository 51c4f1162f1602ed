"""The prepared GPU check (scripts/device_check.sh) and the settings it offers: algorithm.compile
modes, the benchmark's JSON rows, and the whole script at its smoke settings on this CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metalab.algorithms import ALGORITHMS
from metalab.algorithms.compile_passes import check_compile, inductor_options
from metalab.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_compile_accepts_reduce_overhead_on_a_gpu_only_and_refuses_unknown_modes(monkeypatch):
    monkeypatch.setenv("CXX", sys.executable)  # any program found stands in for the compiler here
    maml = ALGORITHMS["maml"]
    gpu = {"trainer": {"accelerator": "gpu"}, "algorithm": {"name": "maml", "compile": "reduce-overhead"}}
    check_compile(gpu, maml)
    with pytest.raises(ConfigError, match="algorithm.compile=reduce-overhead replays CUDA graphs, which need a GPU"):
        check_compile({**gpu, "trainer": {"accelerator": "cpu"}}, maml)
    with pytest.raises(
        ConfigError, match="algorithm.compile=max-speed is not a choice; use auto, false, true or reduce-overhead"
    ):
        check_compile({**gpu, "algorithm": {"name": "maml", "compile": "max-speed"}}, maml)


def test_reduce_overhead_turns_on_cuda_graphs_beside_the_graph_pass():
    assert "triton.cudagraphs" not in inductor_options(True)
    options = inductor_options("reduce-overhead")
    assert options["triton.cudagraphs"] is True
    assert options.keys() - {"triton.cudagraphs"} == inductor_options(True).keys()


def test_bench_row_writes_its_figures_as_json(tmp_path):
    rows = tmp_path / "rows.jsonl"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench.py"),
            "--row",
            "mlp:maml:0:1:vmap",
            "--seconds",
            "0.05",
            "--meta-batch",
            "2",
            "--precision",
            "bf16",
            "--json",
            str(rows),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (row,) = [json.loads(line) for line in rows.read_text().splitlines()]
    assert row["learner"] == "maml" and row["inner_steps"] == 1 and row["compile"] is False
    assert row["precision"] == "bf16" and row["device"].startswith("CPU")
    assert row["loop_tasks_per_sec"] > 0 and row["batched_tasks_per_sec"] > 0
    assert row["ratio"] == pytest.approx(row["batched_tasks_per_sec"] / row["loop_tasks_per_sec"], rel=0.5)
    assert row["execution"] == "vmap" and row["step_gflop"] > 0 and row["matmul_gflops"] > 0
    assert row["batched_gflops"] == pytest.approx(row["step_gflop"] * row["batched_tasks_per_sec"] / 2)


@pytest.mark.slow
@pytest.mark.data
def test_device_check_smoke_runs_every_part_on_the_cpu(tmp_path, data_dir):
    """The script a GPU session runs, at its tiny settings: every part reports, and the end-to-end run learns."""
    env = {**os.environ, "METALAB_DATA_DIR": str(data_dir), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "device_check.sh"), "--smoke", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert {part: record["status"] for part, record in report["parts"].items()} == {
        part: "ok"
        for part in (
            "1-maml-eager",
            "1-maml-compiled",
            "2-family",
            "2-anil-protonet",
            "3-memory",
            "4-gradient",
            "5-train-fast",
            "5-train-fast-eval",
            "5-train-float32-eager",
            "5-train-float32-eager-eval",
        )
    }
    assert report["parts"]["5-train-fast"]["eval"]["test/acc"] > 0.2  # 5-way: chance is 0.2
    assert "| maml |" in (tmp_path / "device_check.md").read_text()


def test_training_throughput_leaves_out_each_processs_first_outer_step():
    """The first step warms up (and with algorithm.compile compiles for tens of seconds): counted, it
    would make results.json's train_tasks_per_sec of a short run far below the step's real rate."""
    import torch

    from metalab.data.episodes import Episode

    model = ALGORITHMS["protonet"].from_config(
        {"algorithm": {"name": "protonet"}, "backbone": {"name": "mlp", "hidden_sizes": [4]}, "ways": 2},
        [3],
        "classification",
    )
    tasks = 4
    batch = Episode(torch.zeros(tasks, 2, 3), torch.zeros(tasks, 2), torch.zeros(tasks, 2, 3), torch.zeros(tasks, 2))
    for _ in range(3):
        model.on_train_batch_start(batch, 0)
        model.on_train_batch_end(None, batch, 0)
    assert model.train_tasks == 3 * tasks  # every task trained on counts ...
    assert model.timed_tasks == 2 * tasks and model.train_time > 0  # ... but not in the timed rate


def test_bench_refuses_fewer_than_one_round_before_timing_anything():
    child = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--rounds", "0", "--models", "mlp", "--learners", "maml"]
        + ["--compile", "no", "--steps", "1", "--seconds", "0.05", "--meta-batch", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 2 and "--rounds 0" in child.stderr and "Traceback" not in child.stderr
    assert child.stdout == ""  # nothing timed, no table started
