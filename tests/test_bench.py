"""What `make bench` measures: the speed floors' rows by default (scripts/bench.py), and ProtoNet
against an earlier commit in a temporary worktree (scripts/bench_against.py). Nothing is timed here."""

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_plain_bench_run_times_every_floor_of_the_speed_issue():
    bench = script("bench")
    rows = bench.planned_rows(bench.arguments([]), omniglot_present=True)
    # MAML on the default path, batched against the loop, at 1 and 5 inner steps: conv4 (eager
    # there), the MLP (compiled for a long run) and Finn's network (MAML's Omniglot paper setting).
    for model in ("conv4", "mlp", "finn"):
        assert f"{model}:maml:auto:1:auto" in rows and f"{model}:maml:auto:5:auto" in rows
    # ... and the metric learners' training episodes, in the same run.
    assert {"metric:protonet", "metric:matchingnet", "metric:relationnet"} <= set(rows)
    assert len(rows) == 9


def test_the_family_and_the_metric_rows_are_still_one_option_away():
    bench = script("bench")
    args = bench.arguments(["--learners", *bench.FAMILY, "--compile", "both", "--models", "mlp", "--metric"])
    rows = bench.planned_rows(args, omniglot_present=False)
    assert {row.split(":")[1] for row in rows} == set(bench.FAMILY)
    assert not any(row.startswith("metric:") for row in rows)
    assert "mlp:reptile:0:5:auto" in rows and "mlp:maml:1:5:auto" in rows  # eager and compiled rows


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs this git checkout")
def test_a_commit_is_benchmarked_from_a_temporary_worktree_that_is_removed_afterwards():
    bench_against = script("bench_against")
    parser = argparse.ArgumentParser()
    with bench_against.checkout("HEAD", parser) as tree:
        assert tree != REPO and (tree / "scripts" / "bench.py").is_file() and (tree / "src" / "metalab").is_dir()
    assert not tree.exists()
    listed = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True, check=True)
    assert str(tree) not in listed.stdout


def test_a_baseline_that_is_neither_a_checkout_nor_a_commit_is_refused_naming_it(tmp_path):
    missing = tmp_path / "no-such-checkout"
    child = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_against.py"), str(missing), "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert child.returncode == 2 and "Traceback" not in child.stderr
    assert f"baseline {missing}: neither a metalab checkout" in child.stderr and "c1ec8a9" in child.stderr
    assert child.stdout == ""


def test_the_serve_bench_clients_send_every_request_on_kept_connections_and_count_refusals():
    """scripts/bench_serve.py's clients write HTTP/1.1 on plain sockets: against a real server,
    each request answered in turn on a kept-alive connection, a refused one reported."""
    import http.server
    import threading

    bench_serve = script("bench_serve")
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keeps the connection, as uvicorn does

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.path, body, self.client_address))
            answer = b'{"ok": true}'
            self.send_response(404 if self.path == "/refused" else 200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        run = bench_serve.run_clients(port, lambda i: ("/tasks", f"body {i}".encode()), 3, 12, 30, os.getpid())
        assert run["requests"] == 12 and len(seen) == 12
        assert sorted(body for _, body, _ in seen) == sorted(f"body {i}".encode() for i in range(12))
        assert len({address for *_, address in seen}) == 3  # one connection per client, kept
        with pytest.raises(SystemExit, match="1 requests failed: \\[404\\]"):
            bench_serve.run_clients(port, lambda i: ("/refused", b"x"), 1, 1, 30, os.getpid())
    finally:
        server.shutdown()
        server.server_close()
