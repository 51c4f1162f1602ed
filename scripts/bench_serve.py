"""metalab-serve's throughput and latency on loopback, against the same work through the Python API.

    python scripts/bench_serve.py                      # pretrained:protonet-omniglot, 5-way 1-shot, 15 queries
    python scripts/bench_serve.py --requests 100 --seconds 10 --concurrency 1 4 16

Starts a server on 127.0.0.1 (a free port, a temporary task store, removed at the end), then
for each concurrency sends requests from that many client threads, each on its own kept-alive
connection: "predict" (15 query PNGs on a task created once) and "adapt" (5 new support PNGs
per request, a task never seen before, so each one adapts and is written to the store). Each
(work, concurrency) stops after --requests requests or --seconds seconds, whichever comes first.
In the same run, the same work in this process: the PNG bytes decoded and passed to
`learner.adapt` / `task.predict_proba`, one at a time. Prints requests/s, p50/p95/p99 latency and
the server-to-in-process ratio. Bounded in requests and time; run it alone (it is a benchmark).
"""

import argparse
import base64
import http.client
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from serve_client import Server  # noqa: E402  (the tests' server process and client)


def omniglot_pngs(data_dir: Path, count: int) -> list[bytes]:
    with zipfile.ZipFile(data_dir / "omniglot" / "images_evaluation.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".png"))
        return [archive.read(n) for n in names[:: max(1, len(names) // count)][:count]]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def summary(latencies: list[float], elapsed: float) -> dict:
    return {
        "requests": len(latencies),
        "per_s": len(latencies) / elapsed,
        **{f"p{q}_ms": 1e3 * percentile(latencies, q) for q in (50, 95, 99)},
    }


def run_clients(port: int, make_request, concurrency: int, requests: int, seconds: float) -> dict:
    """`make_request(i) -> (path, body)` sent from `concurrency` threads until the count or time runs out."""
    counter, lock, latencies, failures = iter(range(requests)), threading.Lock(), [], []
    deadline = time.perf_counter() + seconds

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            path, body = make_request(i)
            started = time.perf_counter()
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            latencies.append(time.perf_counter() - started)
            if response.status != 200:
                failures.append(response.status)
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"{len(failures)} requests failed: {sorted(set(failures))}")
    return summary(latencies, time.perf_counter() - started)


def in_process(ckpt: str, support: list[bytes], queries: list[bytes], requests: int, seconds: float) -> dict:
    """The same two kinds of work through the Python API, sequentially, from the same PNG bytes."""
    from PIL import Image

    import metalab

    learner = metalab.load_learner(ckpt)

    def images(blobs):
        return [Image.open(io.BytesIO(b)) for b in blobs]

    task = learner.adapt(list(zip(images(support), "abcde")))
    work = {
        "predict": lambda i: task.predict_proba(images(queries)),
        "adapt": lambda i: learner.adapt(list(zip(images(support), [f"{c}{i}" for c in "abcde"]))),
    }
    results = {}
    for name, step in work.items():
        step(-1)  # warm up
        latencies, deadline, started = [], time.perf_counter() + seconds, time.perf_counter()
        for i in range(requests):
            if time.perf_counter() > deadline:
                break
            begun = time.perf_counter()
            step(i)
            latencies.append(time.perf_counter() - begun)
        results[name] = summary(latencies, time.perf_counter() - started)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="pretrained:protonet-omniglot")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=200, help="at most this many per (work, concurrency)")
    parser.add_argument("--seconds", type=float, default=15, help="at most this long per (work, concurrency)")
    args = parser.parse_args()
    data_dir = Path(os.environ.get("METALAB_DATA_DIR") or ROOT.parent / "shared" / "data")
    pngs = omniglot_pngs(data_dir, 20)
    support, queries = pngs[:5], pngs[5:20]  # 5-way 1-shot, 15 queries
    support_b64 = [base64.b64encode(b).decode() for b in support]
    predict_body = json.dumps({"images": [base64.b64encode(b).decode() for b in queries]}).encode()

    def adapt_request(i):  # new labels, a new task every time
        body = {
            "support": [{"label": f"{c}{i}-{time.perf_counter_ns()}", "image": s} for c, s in zip("abcde", support_b64)]
        }
        return "/v1/tasks", json.dumps(body).encode()

    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    server = Server(folder / "server.log", f"ckpt_path={args.ckpt}", f"store_dir={folder / 'tasks'}")
    try:
        task = server.post("/v1/tasks", {"support": [{"label": c, "image": s} for c, s in zip("abcde", support_b64)]})
        predict_path = f"/v1/tasks/{task['task_id']}/predict"
        served = {}
        for concurrency in args.concurrency:
            for name, make in (("predict", lambda i: (predict_path, predict_body)), ("adapt", adapt_request)):
                served[name, concurrency] = run_clients(server.port, make, concurrency, args.requests, args.seconds)
    finally:
        status = server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    local = in_process(args.ckpt, support, queries, args.requests, args.seconds)

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"{args.ckpt}, 5-way 1-shot, 15 queries per predict; {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}")
    header = (
        f"{'work':8} {'where':18} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'vs API':>7}"
    )
    print(header)
    for name in ("predict", "adapt"):
        row = local[name]
        print(
            f"{name:8} {'in-process API':18} {row['requests']:8d} {row['per_s']:8.1f} {row['p50_ms']:8.2f} "
            f"{row['p95_ms']:8.2f} {row['p99_ms']:8.2f} {1.0:7.2f}"
        )
        for concurrency in args.concurrency:
            row = served[name, concurrency]
            ratio = row["per_s"] / local[name]["per_s"]
            print(
                f"{name:8} {f'server, {concurrency:2d} clients':18} {row['requests']:8d} {row['per_s']:8.1f} "
                f"{row['p50_ms']:8.2f} {row['p95_ms']:8.2f} {row['p99_ms']:8.2f} {ratio:7.2f}"
            )
    print(f"server exit status after SIGTERM: {status}")


if __name__ == "__main__":
    main()
