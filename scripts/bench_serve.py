"""metalab-serve's throughput and latency on loopback, against the same work through the Python API.

    python scripts/bench_serve.py                      # pretrained:protonet-omniglot, 5-way 1-shot, 15 queries
    python scripts/bench_serve.py --requests 100 --seconds 10 --concurrency 1 4 16

Starts a server on 127.0.0.1 (a free port, a temporary task store, removed at the end), then
for each concurrency sends requests from that many clients, each on its own kept-alive
connection: "predict" (15 query PNGs on a task created once) and "adapt" (5 new support PNGs
per request, a task never seen before, so each one adapts and is written to the store). Each
(work, concurrency) stops after --requests requests or --seconds seconds, whichever comes first.
Before each, the same work in this process: the PNG bytes decoded and passed to
`learner.adapt` / `task.predict_proba`, one at a time (adapt also hashes the images into a task
id, as the server does; it writes no file), and again from as many threads at once as there
are clients ("APIxN": an application calling metalab from its own threads). Each (work,
concurrency) is measured --rounds times, API and server alternating, so that a change in the
machine's load shows as a spread of rounds rather than as one skewed ratio. Prints each round's
requests/s, p50/p95/p99 latency, CPU time a request (the server's, and the clients') and the
server-to-in-process ratios of throughput and of median latency, then each ratio's median over
the rounds. Bounded in requests and time; run it alone (it is a benchmark).

    python scripts/bench_serve.py --memory-tasks 10000 --seconds 180

instead creates that many distinct 5-way 1-shot tasks (5 of 40 Omniglot images, a different
combination each) on a fresh server from 4 clients, and prints the server's resident size
(VmRSS of its process) before and after, and the kept tasks' bytes in its memory cache and in
its store folder against their budgets (`GET /v1/model`'s "kept", and the folder's files).
"""

import argparse
import asyncio
import base64
import hashlib
import io
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
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


def summary(latencies: list[float], elapsed: float, cpu: float) -> dict:
    return {
        "requests": len(latencies),
        "per_s": len(latencies) / elapsed,
        **{f"p{q}_ms": 1e3 * percentile(latencies, q) for q in (50, 95, 99)},
        "cpu_ms": 1e3 * cpu / len(latencies),  # CPU time a request: what the machine's other load leaves alone
    }


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process `pid` and its child processes (the workers, with
    workers=N), all their threads (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own + sum(cpu_seconds(int(child)) for child in children)


def run_clients(port: int, make_request, concurrency: int, requests: int, seconds: float, pid: int) -> dict:
    """`make_request(i) -> (path, body)` sent by `concurrency` clients, each on its own kept-alive
    connection, until the count or time runs out; `pid`: the server's process, whose CPU time is
    counted. The clients share the server's cores, so they are kept light: the requests are
    encoded before the clock starts, and the clients are coroutines of one thread writing and
    reading HTTP/1.1 on plain sockets (16 threads of http.client spent 0.3-0.45 ms of CPU a
    request, time the server could not use)."""
    prepared = []
    for i in range(requests):
        path, body = make_request(i)
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        prepared.append(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    latencies, failures = [], []

    async def client(queue: Iterator[bytes], deadline: float):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for request in queue:
                if time.perf_counter() >= deadline:
                    break
                started = time.perf_counter()
                writer.write(request)
                status = await asyncio.wait_for(read_response(reader), timeout=120)
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    failures.append(status)
        finally:
            writer.close()

    async def clients():
        queue, deadline = iter(prepared), time.perf_counter() + seconds  # one queue, shared
        await asyncio.gather(*(client(queue, deadline) for _ in range(concurrency)))

    started, cpu, own = time.perf_counter(), cpu_seconds(pid), time.process_time()
    asyncio.run(clients())
    if failures:
        raise SystemExit(f"{len(failures)} requests failed: {sorted(set(failures))}")
    result = summary(latencies, time.perf_counter() - started, cpu_seconds(pid) - cpu)
    # The clients share the server's cores: their CPU time is what the server could not use.
    result["client_cpu_ms"] = 1e3 * (time.process_time() - own) / len(latencies)
    return result


async def read_response(reader: asyncio.StreamReader) -> int:
    """One HTTP/1.1 response read whole (metalab-serve's answers carry Content-Length); its status."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    length = next((line.split(":", 1)[1] for line in lines[1:] if line.lower().startswith("content-length:")), None)
    if length is None:
        raise SystemExit(f"an answer without Content-Length: {lines[0]}")
    await reader.readexactly(int(length))
    return int(lines[0].split()[1])


def in_process(ckpt: str, support: list[bytes], queries: list[bytes], requests: int, seconds: float):
    """The same two kinds of work through the Python API, sequentially, from the same PNG bytes:
    `measure(name)` times one kind, as often and as long as the server's clients may."""
    from PIL import Image

    import metalab

    learner = metalab.load_learner(ckpt)

    def images(blobs):
        return [Image.open(io.BytesIO(b)) for b in blobs]

    def adapt(i):
        labels = [f"{c}{i}" for c in "abcde"]
        # The server's task id: a hash over the image bytes' hashes and the labels.
        pairs = [[label, hashlib.sha256(b).hexdigest()] for label, b in zip(labels, support)]
        hashlib.sha256(json.dumps(pairs).encode())
        return learner.adapt(list(zip(images(support), labels)))

    task = learner.adapt(list(zip(images(support), "abcde")))
    work = {"predict": lambda i: task.predict_proba(images(queries)), "adapt": adapt}

    def measure(name: str, threads: int = 1) -> dict:
        """`name`'s work as often and as long as the clients may, from `threads` threads of this
        process at once (1: one at a time, torch using every core within each call)."""
        step = work[name]
        step(-1)  # warm up
        counter, lock, latencies = iter(range(requests)), threading.Lock(), []
        deadline, started = time.perf_counter() + seconds, time.perf_counter()
        cpu = time.process_time()  # every thread of this process; only these work meanwhile

        def caller():
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    break
                begun = time.perf_counter()
                step(i)
                latencies.append(time.perf_counter() - begun)

        if threads == 1:
            # In the main thread, where the learner was loaded and torch has computed: a second
            # thread gets an OpenMP team of its own, and with more OpenMP threads than cores each
            # operation waits for its team to wake (measured: adapt 3.95 ms against 2.2 ms).
            caller()
        else:
            callers = [threading.Thread(target=caller) for _ in range(threads)]
            for thread in callers:
                thread.start()
            for thread in callers:
                thread.join()
        return summary(latencies, time.perf_counter() - started, time.process_time() - cpu)

    return measure


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # given in kB
    raise SystemExit(f"no VmRSS for process {pid}")


def memory(ckpt: str, pngs: list[bytes], tasks: int, seconds: float, settings: list[str]) -> None:
    """Create `tasks` distinct 5-way 1-shot tasks; the server's resident size and the kept bytes."""
    encoded = [base64.b64encode(b).decode() for b in pngs]
    # 5 of the 40 images, a different combination (in order) for each task: 658,008 of them.
    sets = list(itertools.islice(itertools.combinations(range(len(encoded)), 5), tasks))

    def support(i):
        return {"support": [{"label": c, "image": encoded[k]} for c, k in zip("abcde", sets[i])]}

    def create(i):  # task 0 is created before, by itself
        return "/v1/tasks", json.dumps(support(i + 1)).encode()

    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    store = folder / "tasks"
    server = Server(folder / "server.log", f"ckpt_path={ckpt}", f"store_dir={store}", *settings)
    try:
        server.post("/v1/tasks", support(0))  # the first request's one-off costs
        before = resident_bytes(server.process.pid)
        run = run_clients(server.port, create, 4, len(sets) - 1, seconds, server.process.pid)
        after = resident_bytes(server.process.pid)
        kept = server.request("GET", "/v1/model")[1]["kept"]
        files = list(store.glob("*.safetensors"))
        stored = sum(path.stat().st_size for path in files)
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    created = run["requests"] + 1
    print(f"{ckpt}: {created} distinct 5-way 1-shot tasks created in {run['requests'] / run['per_s']:.0f} s")
    print(f"server resident size: {before / 1e6:.1f} MB before, {after / 1e6:.1f} MB after", end="")
    print(f" (+{(after - before) / 1e6:.1f} MB, {(after - before) / created:.0f} bytes a task)")
    mem = kept["memory"]
    print(f"memory cache: {mem['tasks']} tasks, {mem['bytes'] / 1e6:.2f} MB of {mem['budget'] / 1e6:.0f} MB budget")
    print(
        f"store folder: {len(files)} files, {stored / 1e6:.2f} MB "
        f"(the count: {kept['store']['bytes'] / 1e6:.2f} MB) of {kept['store']['budget'] / 1e6:.0f} MB budget"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="pretrained:protonet-omniglot")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=200, help="at most this many per (work, concurrency)")
    parser.add_argument("--seconds", type=float, default=15, help="at most this long per (work, concurrency)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="measure each (work, clients) this many times, API and server alternating"
    )
    parser.add_argument("--memory-tasks", type=int, help="instead: create this many tasks, report memory")
    parser.add_argument("--server", nargs="*", default=[], help="more metalab-serve settings, e.g. cache_bytes=1MB")
    args = parser.parse_args()
    data_dir = Path(os.environ.get("METALAB_DATA_DIR") or ROOT.parent / "shared" / "data")
    if args.memory_tasks:
        memory(args.ckpt, omniglot_pngs(data_dir, 40), args.memory_tasks, args.seconds, args.server)
        return
    pngs = omniglot_pngs(data_dir, 20)
    support, queries = pngs[:5], pngs[5:20]  # 5-way 1-shot, 15 queries
    support_b64 = [base64.b64encode(b).decode() for b in support]
    predict_body = json.dumps({"images": [base64.b64encode(b).decode() for b in queries]}).encode()

    def adapt_request(i):  # new labels, a new task every time
        body = {
            "support": [{"label": f"{c}{i}-{time.perf_counter_ns()}", "image": s} for c, s in zip("abcde", support_b64)]
        }
        return "/v1/tasks", json.dumps(body).encode()

    # Each server measurement right after the in-process one it is compared with: on a shared
    # machine the load changes within a run, and a ratio of measurements minutes apart would
    # show that change.
    local = in_process(args.ckpt, support, queries, args.requests, args.seconds)
    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    server = Server(folder / "server.log", f"ckpt_path={args.ckpt}", f"store_dir={folder / 'tasks'}", *args.server)
    try:
        task = server.post("/v1/tasks", {"support": [{"label": c, "image": s} for c, s in zip("abcde", support_b64)]})
        predict_path = f"/v1/tasks/{task['task_id']}/predict"
        rows = []
        for concurrency in args.concurrency:
            for name, make in (("predict", lambda i: (predict_path, predict_body)), ("adapt", adapt_request)):
                for round_ in range(1, args.rounds + 1):
                    api = local(name)
                    threaded = local(name, concurrency) if concurrency > 1 else api
                    served = run_clients(
                        server.port, make, concurrency, args.requests, args.seconds, server.process.pid
                    )
                    rows.append((name, concurrency, round_, api, threaded, served))
    finally:
        status = server.stop()
        shutil.rmtree(folder, ignore_errors=True)

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"{args.ckpt}, 5-way 1-shot, 15 queries per predict; {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}")
    print(f"server settings: {' '.join(args.server) or '(defaults)'}")
    print("API: the same work through the Python API in this process, one at a time, measured just before")
    print("APIxN: the same, called from as many threads of this process at once as there are clients")
    print("CPU ms: CPU time a request (the server's processes, every worker, all threads; the clients' not counted)")
    print(
        f"{'work':8} {'clients':>7} {'round':>5} {'API req/s':>9} {'API p50':>8} {'API CPU':>8} {'requests':>8} "
        f"{'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'CPU ms':>8} {'req/s vs API':>12} "
        f"{'p50 vs API':>10} {'CPU vs API':>10} {'APIxN req/s':>11} {'req/s vs APIxN':>15} {'client CPU ms':>13}"
    )
    rows.sort(key=lambda row: row[0] != "predict")  # stable: by concurrency and round within each work
    for name, concurrency, round_, api, threaded, served in rows:
        print(
            f"{name:8} {concurrency:7d} {round_:5d} {api['per_s']:9.1f} {api['p50_ms']:8.2f} {api['cpu_ms']:8.2f} "
            f"{served['requests']:8d} {served['per_s']:8.1f} {served['p50_ms']:8.2f} {served['p95_ms']:8.2f} "
            f"{served['p99_ms']:8.2f} {served['cpu_ms']:8.2f} {served['per_s'] / api['per_s']:12.2f} "
            f"{served['p50_ms'] / api['p50_ms']:10.2f} {served['cpu_ms'] / api['cpu_ms']:10.2f} "
            f"{threaded['per_s']:11.1f} {served['per_s'] / threaded['per_s']:15.2f} {served['client_cpu_ms']:13.2f}"
        )
    print(f"median over the {args.rounds} rounds of each ratio:")
    print(f"{'work':8} {'clients':>7} {'req/s vs API':>12} {'p50 vs API':>10} {'req/s vs APIxN':>15}")
    for (name, concurrency), group in itertools.groupby(rows, key=lambda row: row[:2]):
        group = list(group)
        throughput = statistics.median(served["per_s"] / api["per_s"] for *_, api, _, served in group)
        latency = statistics.median(served["p50_ms"] / api["p50_ms"] for *_, api, _, served in group)
        against_threads = statistics.median(served["per_s"] / threaded["per_s"] for *_, threaded, served in group)
        print(f"{name:8} {concurrency:7d} {throughput:12.2f} {latency:10.2f} {against_threads:15.2f}")
    print(f"server exit status after SIGTERM: {status}")


if __name__ == "__main__":
    main()
