"""metalab-serve as a client meets it: a real server process on loopback, real HTTP, real Omniglot PNGs.

Predictions must equal the Python API's (`load_learner(...).adapt(...).predict_proba(images)`, a
request's images in one pass) for every learner family; bad requests get a 4xx JSON error and
the server goes on serving; tasks outlive a restart and are shared by workers; the store stays
within its budget and shrugs off a damaged file; bad settings end the command with one line.
"""

import contextlib
import hashlib
import http.client
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch
from learner_checkpoints import omniglot_folders, trained_checkpoint
from PIL import Image
from serve_client import WORKER_HEADER, Server, b64, free_port

pytest.importorskip("fastapi", reason="metalab-serve's extra is not installed: pip install 'metalab[serve]'")
pytest.importorskip("uvicorn", reason="metalab-serve's extra is not installed: pip install 'metalab[serve]'")
pytest.importorskip("safetensors", reason="metalab-serve's extra is not installed: pip install 'metalab[serve]'")

import metalab  # noqa: E402
from metalab.pretrained import resolve  # noqa: E402
from metalab.serve import main as serve_main  # noqa: E402
from metalab.serving import store as store_module  # noqa: E402
from metalab.serving.state import flatten_state, namedtuple_class, unflatten_state  # noqa: E402
from metalab.serving.store import MemoryCache, StoredTask, TaskStore  # noqa: E402

PRETRAINED = "pretrained:protonet-omniglot"
KEY = "test-key-0123456789"
# One learner per family the Python API serves: metric (ProtoNet: a tensor; Matching Networks: a
# tuple; Relation Networks), the MAML family (a dict of fast weights, BatchNorm over each pass),
# the transfer baselines (a fitted head), MANN (a NamedTuple with the controller's memory).
# The default run takes one of each family; the other learners' states run with the slow tests.
FAMILIES = [
    "protonet",
    pytest.param("matchingnet", marks=pytest.mark.slow),
    pytest.param("relationnet", marks=pytest.mark.slow),
    "maml",
    "baseline",
    pytest.param("baselinepp", marks=pytest.mark.slow),
    "mann",
]
FIXED_WAYS = {"maml": 5, "mann": 5}


# ---------------------------------------------------------------- images and reference answers
@pytest.fixture(scope="module")
def omniglot(tmp_path_factory, omniglot_dir):
    """([(png bytes, label)] support, 1 per class, [png bytes] queries, [true label]) of 5 unseen characters."""
    support, query = omniglot_folders(omniglot_dir, tmp_path_factory.mktemp("pngs"), classes=5, shots=1, queries=3)
    pairs = [(path.read_bytes(), label) for label in support for path in support[label]]
    queries = sorted(query)
    return pairs, [path.read_bytes() for path in queries], [query[path] for path in queries]


def support_json(pairs) -> list[dict]:
    return [{"label": label, "image": b64(data)} for data, label in pairs]


def python_api(ckpt, pairs, queries) -> tuple[tuple, torch.Tensor]:
    """(labels, probabilities) of the Python API on the same PNG bytes, the queries in one pass."""
    task = metalab.load_learner(ckpt).adapt([(Image.open(io.BytesIO(data)), label) for data, label in pairs])
    return task.labels, task.predict_proba([Image.open(io.BytesIO(data)) for data in queries])


def probabilities(answer: dict, labels) -> torch.Tensor:
    return torch.tensor([[p["probabilities"][label] for label in labels] for p in answer["predictions"]])


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 255).save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A few dozen bytes whose header claims width x height pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------- the shared server
@pytest.fixture(scope="module")
def server(tmp_path_factory, omniglot_dir):
    """The shipped ProtoNet behind an API key, with small limits to reach them cheaply."""
    folder = tmp_path_factory.mktemp("server")
    running = Server(
        folder / "server.log",
        f"ckpt_path={PRETRAINED}",
        f"store_dir={folder / 'tasks'}",
        "max_images=24",
        "max_image_bytes=100kB",
        "max_request_bytes=600kB",
        "max_pixels=20000",  # Omniglot's 105 x 105 fit
        env={"METALAB_API_KEY": KEY},
    )
    running.headers = {"Authorization": f"Bearer {KEY}"}
    yield running
    assert running.stop() == 0, running.output()


@pytest.mark.data
def test_pretrained_protonet_answers_as_the_python_api(server, omniglot):
    pairs, queries, truth = omniglot
    created = server.post("/v1/tasks", {"support": support_json(pairs)})
    labels, expected = python_api(PRETRAINED, pairs, queries)
    assert created["labels"] == list(labels) and created["created"]
    answer = server.post(f"/v1/tasks/{created['task_id']}/predict", {"images": [b64(q) for q in queries]})
    torch.testing.assert_close(probabilities(answer, labels), expected, rtol=0, atol=1e-5)
    assert [p["label"] for p in answer["predictions"]] == [labels[k] for k in expected.argmax(-1).tolist()]
    assert sum(p["label"] == t for p, t in zip(answer["predictions"], truth)) / len(truth) >= 0.8  # chance: 0.2
    # The same support set is the same task; the stateless route gives the same answer.
    again = server.post("/v1/tasks", {"support": support_json(pairs)})
    assert again["task_id"] == created["task_id"] and not again["created"]
    once = server.post("/v1/predict", {"support": support_json(pairs), "images": [b64(q) for q in queries]})
    assert once["predictions"] == answer["predictions"]
    # Another order of the same examples, or another label, is another task.
    assert server.post("/v1/tasks", {"support": support_json(pairs[::-1])})["task_id"] != created["task_id"]
    relabelled = [(data, label + "x") for data, label in pairs]
    assert server.post("/v1/tasks", {"support": support_json(relabelled)})["task_id"] != created["task_id"]


def test_model_description(server):
    status, model = server.request("GET", "/v1/model")
    assert status == 200
    assert model["learner"] == "protonet" and model["training_dataset"] == "omniglot"
    assert model["transform"] == {"size": 28, "channels": 1, "invert": True, "input_shape": [1, 28, 28]}
    assert model["checkpoint_sha256"] == hashlib.sha256(open(resolve(PRETRAINED), "rb").read()).hexdigest()
    assert model["metalab_version"] == metalab.__version__
    assert model["classes"]["min"] == 2 and model["classes"]["max"] is None
    assert model["limits"]["max_images"] == 24
    kept = model["kept"]  # this worker's memory cache and the shared store, against their budgets
    assert kept["memory"]["budget"] == 256 * 10**6 and kept["store"]["budget"] == 10**9
    assert 0 <= kept["memory"]["bytes"] <= kept["memory"]["budget"] and kept["store"]["bytes"] >= 0


def test_api_key_guards_everything_but_the_health_checks(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY[:-1]}):
        status, answer = server.request("GET", "/v1/model", headers={"Authorization": "", **headers})
        assert status == 401 and "API key" in answer["error"], (headers, status, answer)
        assert server.request("POST", "/v1/tasks", {}, headers={"Authorization": "", **headers})[0] == 401
    assert server.request("GET", "/v1/model", headers={"Authorization": "", "X-API-Key": KEY})[0] == 200
    assert server.request("GET", "/v1/model", headers={"Authorization": f"bearer {KEY}"})[0] == 200
    for path in ("/healthz", "/readyz"):
        assert server.request("GET", path, headers={"Authorization": ""})[0] == 200


def bad_requests(pairs, queries):
    """(what, path, body, status, words the error must hold)."""
    good = support_json(pairs)
    image = good[0]["image"]
    big = b64(b"\0" * 150_000)
    return [
        ("not JSON", "/v1/tasks", b"{support: ", 400, "not JSON"),
        ("a JSON list", "/v1/tasks", b"[]", 400, "JSON object"),
        ("no support", "/v1/tasks", {"support": []}, 400, "at least 2 classes"),
        ("support missing", "/v1/tasks", {"images": [image]}, 400, "no support examples"),
        ("one class", "/v1/tasks", {"support": good[:1]}, 400, "at least 2 classes"),
        ("label not a string", "/v1/tasks", {"support": [{"label": 3, "image": image}, *good]}, 400, "strings"),
        ("example without image", "/v1/tasks", {"support": [{"label": "a"}, *good]}, 400, "support[0]"),
        ("not base64", "/v1/tasks", {"support": [{"label": "a", "image": "@@@not base64"}, *good]}, 400, "base64"),
        ("not an image", "/v1/tasks", {"support": [{"label": "a", "image": b64(b"hello")}, *good]}, 400, "PNG or JPEG"),
        ("a GIF", "/v1/predict", {"support": good, "images": [b64(gif())]}, 400, "PNG or JPEG"),
        (
            "truncated PNG",
            "/v1/predict",
            {"support": good, "images": [b64(queries[0][: len(queries[0]) // 2])]},
            400,
            "cannot be decoded",
        ),
        (
            "bomb header",
            "/v1/predict",
            {"support": good, "images": [b64(bomb_png(100_000, 100_000))]},
            413,
            "max_pixels",
        ),
        ("over max_pixels", "/v1/predict", {"support": good, "images": [b64(png(150, 150))]}, 413, "max_pixels=20000"),
        ("too many images", "/v1/predict", {"support": good, "images": [image] * 20}, 413, "max_images=24"),
        ("image too large", "/v1/predict", {"support": good, "images": [big]}, 413, "max_image_bytes"),
        ("body too large", "/v1/predict", {"support": good, "images": [big] * 5}, 413, "max_request_bytes"),
        ("no images", "/v1/predict", {"support": good}, 400, "no images to predict"),
        ("images not a list", "/v1/predict", {"support": good, "images": image}, 400, "no images to predict"),
        ("unknown task", "/v1/tasks/" + "0" * 64 + "/predict", {"images": [image]}, 404, "create it again"),
        ("task id not an id", "/v1/tasks/..%2F..%2Fetc/predict", {"images": [image]}, 404, ""),
        ("unknown route", "/v2/tasks", {}, 404, "no route"),
    ]


def gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (20, 20)).save(buffer, "GIF")
    return buffer.getvalue()


@pytest.mark.data
def test_bad_requests_get_a_json_error_and_the_server_goes_on(server, omniglot):
    pairs, queries, _ = omniglot
    task_id = server.post("/v1/tasks", {"support": support_json(pairs)})["task_id"]
    for what, path, body, status, words in bad_requests(pairs, queries):
        got, answer = server.request("POST", path, body)
        assert got == status and set(answer) == {"error"} and words in answer["error"], (what, got, answer)
        # The next request is served.
        assert server.post(f"/v1/tasks/{task_id}/predict", {"images": [b64(queries[0])]})["predictions"]
    status, answer = server.request("GET", "/v1/tasks")
    assert status == 405 and "error" in answer
    assert "Traceback" not in server.output()


# ---------------------------------------------------------------- every learner family
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_dir, cache_dir, omniglot_dir):
    return lambda name: trained_checkpoint(name, tmp_path_factory, data_dir, cache_dir)


@pytest.mark.data
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_answers_as_the_python_api(name, checkpoint, omniglot, tmp_path):
    """cache_bytes=0: every prediction reads the task back from its file, so the state's round trip
    through the store is checked too."""
    pairs, queries, _ = omniglot
    ckpt = checkpoint(name)
    running = Server(tmp_path / "server.log", f"ckpt_path={ckpt}", f"store_dir={tmp_path / 'tasks'}", "cache_bytes=0")
    try:
        created = running.post("/v1/tasks", {"support": support_json(pairs)})
        assert len(list((tmp_path / "tasks").glob("*.safetensors"))) == 1
        labels, expected = python_api(ckpt, pairs, queries)
        answer = running.post(f"/v1/tasks/{created['task_id']}/predict", {"images": [b64(q) for q in queries]})
        assert answer["labels"] == list(labels)
        torch.testing.assert_close(probabilities(answer, labels), expected, rtol=0, atol=1e-5)
        once = running.post("/v1/predict", {"support": support_json(pairs), "images": [b64(q) for q in queries]})
        torch.testing.assert_close(probabilities(once, labels), expected, rtol=0, atol=1e-5)
        if name in FIXED_WAYS:  # a fixed head refuses another class count, naming it
            status, error = running.request("POST", "/v1/tasks", {"support": support_json(pairs[:3])})
            assert status == 400 and f"ways={FIXED_WAYS[name]}" in error["error"], error
    finally:
        assert running.stop() == 0, running.output()


# ---------------------------------------------------------------- restarts, workers, the store
def slow_request(port: int, path: str, body: bytes) -> http.client.HTTPConnection:
    """A request whose body is sent in two parts: the server has it in flight until the rest comes."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.putrequest("POST", path)
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(len(body)))
    connection.endheaders()
    connection.send(body[: len(body) // 2])
    return connection


@pytest.mark.data
def test_sigterm_finishes_the_request_in_flight_and_a_restart_keeps_the_task(omniglot, tmp_path):
    pairs, queries, _ = omniglot
    settings = (f"ckpt_path={PRETRAINED}", f"store_dir={tmp_path / 'tasks'}")
    first = Server(tmp_path / "first.log", *settings)
    try:
        task_id = first.post("/v1/tasks", {"support": support_json(pairs)})["task_id"]
        body = json.dumps({"images": [b64(q) for q in queries]}).encode()
        expected = first.post(f"/v1/tasks/{task_id}/predict", body)
        in_flight = slow_request(first.port, f"/v1/tasks/{task_id}/predict", body)
        time.sleep(0.5)  # the server has read the headers
        first.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        in_flight.send(body[len(body) // 2 :])
        response = in_flight.getresponse()
        assert response.status == 200 and json.loads(response.read()) == expected
    finally:
        assert first.stop() == 0, first.output()
    second = Server(tmp_path / "second.log", *settings)
    try:  # the task, without its support set
        assert second.post(f"/v1/tasks/{task_id}/predict", body) == expected
    finally:
        assert second.stop() == 0, second.output()


@contextlib.contextmanager
def two_workers_with_a_task(omniglot, tmp_path):
    """(server, task id, predict body): a workers=2 server, a task created on it; stopped after."""
    pairs, queries, _ = omniglot
    running = Server(tmp_path / "server.log", f"ckpt_path={PRETRAINED}", f"store_dir={tmp_path / 'tasks'}", "workers=2")
    try:
        task_id = running.post("/v1/tasks", {"support": support_json(pairs)})["task_id"]
        yield running, task_id, {"images": [b64(q) for q in queries[:5]]}
    finally:
        assert running.stop() == 0, running.output()


@pytest.mark.data
def test_two_workers_serve_the_same_tasks(omniglot, tmp_path):
    pairs = omniglot[0]
    with two_workers_with_a_task(omniglot, tmp_path) as (running, task_id, body):
        answers = [running.post(f"/v1/tasks/{task_id}/predict", body) for _ in range(12)]
        assert all(answer == answers[0] for answer in answers)
        # Until both workers have answered (each response names its process): the same answer, the same id.
        workers = set()
        for _ in range(200):
            status, answer, worker = running.request_with_worker("POST", f"/v1/tasks/{task_id}/predict", body)
            assert status == 200 and answer == answers[0]
            status, created, _ = running.request_with_worker("POST", "/v1/tasks", {"support": support_json(pairs)})
            assert status == 200 and created["task_id"] == task_id
            workers.add(worker)
            if len(workers) == 2:
                break
        assert len(workers) == 2, workers
        # Each worker listens on its own socket, so clients that connect at once and keep their
        # connections are spread over the workers; with one shared socket the first worker to
        # wake took them all (16 to 0 in two of four tries).
        assert len(listening_sockets(running.port)) == 2
        connections = [http.client.HTTPConnection("127.0.0.1", running.port, timeout=60) for _ in range(16)]
        answered_by = []
        for connection in connections:
            connection.request("POST", f"/v1/tasks/{task_id}/predict", json.dumps(body))
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read()) == answers[0]
            answered_by.append(response.headers[WORKER_HEADER])
        for connection in connections:
            connection.close()
        assert set(answered_by) == workers, answered_by


@pytest.mark.slow
@pytest.mark.data
def test_a_killed_worker_is_replaced_and_the_replacement_serves_the_kept_task(omniglot, tmp_path):
    with two_workers_with_a_task(omniglot, tmp_path) as (running, task_id, body):
        expected = running.post(f"/v1/tasks/{task_id}/predict", body)
        victim = running.request_with_worker("POST", f"/v1/tasks/{task_id}/predict", body)[2]
        before = set(Path(f"/proc/{running.process.pid}/task/{running.process.pid}/children").read_text().split())
        os.kill(int(victim), signal.SIGKILL)
        deadline, replacement = time.monotonic() + 120, None
        while replacement is None and time.monotonic() < deadline:
            try:
                status, answer, worker = running.request_with_worker("POST", f"/v1/tasks/{task_id}/predict", body)
            except OSError:  # a connection given to the dead worker's socket before the replacement listens
                continue
            assert status == 200 and answer == expected
            replacement = worker if worker not in before else None
            time.sleep(0.05)
        assert replacement is not None, running.output()


def listening_sockets(port: int) -> set[str]:
    """The inodes of the sockets listening on 127.0.0.1:`port` (Linux's /proc/net/tcp)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and int(local.rpartition(":")[2], 16) == port:  # 0A: LISTEN
            inodes.add(inode)
    return inodes


@pytest.mark.data
def test_the_store_stays_in_budget_and_a_damaged_file_is_an_unknown_task(omniglot, tmp_path):
    pairs, queries, _ = omniglot
    store = tmp_path / "tasks"
    # ProtoNet's 5 prototypes of 64 floats: a file of about 1.6 kB, so the store keeps one task;
    # cache_bytes=1 keeps none in memory.
    running = Server(
        tmp_path / "server.log", f"ckpt_path={PRETRAINED}", f"store_dir={store}", "store_bytes=2500", "cache_bytes=1"
    )
    try:
        body = {"images": [b64(queries[0])]}
        first = running.post("/v1/tasks", {"support": support_json(pairs)})["task_id"]
        assert running.request("POST", f"/v1/tasks/{first}/predict", body)[0] == 200
        second = running.post("/v1/tasks", {"support": support_json(pairs[:4])})["task_id"]
        assert sorted(p.name for p in store.glob("*.safetensors")) == [f"{second}.safetensors"]
        status, answer = running.request("POST", f"/v1/tasks/{first}/predict", body)
        assert status == 404 and "create it again" in answer["error"]
        assert running.request("POST", f"/v1/tasks/{second}/predict", body)[0] == 200
        # Damaged files (cut short, or garbage) are unknown tasks, and the worker goes on.
        whole = (store / f"{second}.safetensors").read_bytes()
        for name, damage in (("a" * 64, whole[: len(whole) // 2]), ("b" * 64, b"\xff" * 100), ("c" * 64, b"")):
            (store / f"{name}.safetensors").write_bytes(damage)
            status, answer = running.request("POST", f"/v1/tasks/{name}/predict", body)
            assert status == 404 and "create it again" in answer["error"], (name, answer)
            assert running.request("POST", f"/v1/tasks/{second}/predict", body)[0] == 200
        assert "Traceback" not in running.output()
        # A store that cannot be written (here a file where the folder was) is the server's problem: 507.
        shutil.rmtree(store)
        store.write_text("")
        status, answer = running.request("POST", "/v1/tasks", {"support": support_json(pairs[:3])})
        assert status == 507 and str(store) in answer["error"], answer
        assert running.request("GET", "/v1/model")[0] == 200
    finally:
        assert running.stop() == 0, running.output()


# ---------------------------------------------------------------- the settings
def test_more_torch_threads_than_cores_are_warned_of(monkeypatch):
    """workers x threads above the usable cores collapsed throughput (16 clients: 0.11-0.18x the
    API with workers=2 threads=2 on 2 cores); threads=auto shares the cores out."""
    from metalab import hardware, serve

    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)
    settings = serve.Settings(ckpt_path=PRETRAINED, workers=2, threads=2)
    assert "workers=2 x threads=2 = 4 torch threads on 2 usable cores" in serve.oversubscribed(settings)
    assert serve.oversubscribed(serve.Settings(ckpt_path=PRETRAINED, workers=2)) is None  # auto: 1 each
    assert serve.oversubscribed(serve.Settings(ckpt_path=PRETRAINED, threads=2)) is None
    assert serve.oversubscribed(serve.Settings(ckpt_path=PRETRAINED, workers=2, threads=2, device="cuda")) is None


@pytest.mark.parametrize(
    "argv, words",
    [
        ([], "ckpt_path= missing"),
        ([f"ckpt_path={PRETRAINED}", "port=http"], "port=http must be a positive integer"),
        ([f"ckpt_path={PRETRAINED}", "port=70000"], "from 1 to 65535"),
        ([f"ckpt_path={PRETRAINED}", "workers=0"], "workers=0"),
        ([f"ckpt_path={PRETRAINED}", "threads=many"], "threads=many must be a positive integer or auto"),
        ([f"ckpt_path={PRETRAINED}", "threads=0"], "threads=0 must be a positive integer or auto"),
        ([f"ckpt_path={PRETRAINED}", "max_images=-3"], "max_images=-3"),
        ([f"ckpt_path={PRETRAINED}", "cache_bytes=lots"], "cache_bytes=lots is not a size"),
        ([f"ckpt_path={PRETRAINED}", "max_request_bytes=1MB", "max_image_bytes=2MB"], "max_image_bytes="),
        ([f"ckpt_path={PRETRAINED}", "max_pixels=0"], "max_pixels=0"),
        ([f"ckpt_path={PRETRAINED}", "colour=blue"], "'colour=blue' is not one of"),
        (["ckpt_path=pretrained:nope"], "no checkpoint named 'nope'"),
        (["ckpt_path=/no/such.ckpt", "port=PORT"], "ckpt_path=/no/such.ckpt does not exist"),
        ([f"ckpt_path={PRETRAINED}", "host=no-such-host.invalid"], "host=no-such-host.invalid"),
        ([f"ckpt_path={PRETRAINED}", "device=abacus", "port=PORT"], "device='abacus' is not a torch device"),
        ([f"ckpt_path={PRETRAINED}", "store_dir=STORE_FILE"], "store_dir="),
    ],
)
def test_bad_settings_end_with_one_line_and_status_2(argv, words, tmp_path, capsys, monkeypatch):
    # The entry point's main() in this process (the command itself: the port test below).
    monkeypatch.delenv("METALAB_API_KEY", raising=False)
    (tmp_path / "file").write_text("")
    argv = [a.replace("STORE_FILE", str(tmp_path / "file" / "tasks")).replace("PORT", str(free_port())) for a in argv]
    argv = argv if any(a.startswith("store_dir=") for a in argv) else [*argv, f"store_dir={tmp_path / 'tasks'}"]
    with pytest.raises(SystemExit) as end:
        serve_main(argv)
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert end.value.code == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("metalab: error: ") and words in lines[0], stderr


def test_a_port_in_use_is_refused_before_loading(tmp_path):
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [f"ckpt_path={PRETRAINED}", f"port={port}", f"store_dir={tmp_path}"]
        proc = subprocess.run(
            [sys.executable, "-m", "metalab.serve", *argv], capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 2 and f"port={port}" in proc.stderr and "torch" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("host, key, warns", [("0.0.0.0", "", True), ("0.0.0.0", KEY, False)])
def test_listening_beyond_loopback_without_a_key_warns(host, key, warns, tmp_path, capsys):
    # A checkpoint that is not there ends the command after the warning, before listening.
    argv = ["ckpt_path=/no/such.ckpt", f"host={host}", f"port={free_port()}", f"store_dir={tmp_path}"]
    with pytest.raises(SystemExit):
        serve_main([*argv, f"api_key={key}"])
    stderr = capsys.readouterr().err
    assert ("warning: listening on host=0.0.0.0 without an API key" in stderr) == warns, stderr


# ---------------------------------------------------------------- the pieces, in process
def test_states_round_trip_through_named_tensors():
    from metalab.algorithms.mann import State

    state = (
        torch.arange(6.0).view(2, 3),
        {"head.weight": torch.ones(2, 2)[:, :1], 3: [None, 1.5, "x", True]},
        State(torch.zeros(1, 2), torch.ones(1, 2)),
    )
    tensors, layout = flatten_state(state)
    json.dumps(layout)  # the layout is plain JSON
    restored = unflatten_state({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(layout)))
    assert isinstance(restored[2], State) and restored[2].memory is None
    assert torch.equal(restored[0], state[0]) and torch.equal(restored[1]["head.weight"], state[1]["head.weight"])
    assert restored[1][3] == [None, 1.5, "x", True]
    with pytest.raises(TypeError):
        flatten_state({"f": print})


@pytest.mark.parametrize("name", ["os:system", "subprocess:Popen", "metalab.serve:Settings", "metalab.nope:X"])
def test_a_stored_layout_names_only_metalab_namedtuples(name):
    with pytest.raises(ValueError):
        namedtuple_class(name)


def test_the_memory_cache_drops_the_least_recently_used_within_its_budget():
    cache = MemoryCache(budget=300)
    for name in "abc":
        cache.put(name, StoredTask(("x",), None, 100))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", StoredTask(("x",), None, 100))
    assert "b" not in cache and all(n in cache for n in "acd") and cache.used == 300
    cache.put("huge", StoredTask(("x",), None, 301))  # over the whole budget: not kept, nothing dropped
    assert "huge" not in cache and len(cache) == 3


def task_files_bytes(folder) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def test_two_stores_on_one_folder_keep_its_budget_with_one_shared_count(tmp_path, monkeypatch):
    """Two workers' stores on one folder: each counts the other's writes, the folder stays within
    store_bytes, and a write under the budget lists no folder (its cost does not grow with the
    tasks kept); over it, the least recently used files go, down to 90% of the budget."""
    prototypes = torch.arange(320.0).view(5, 64)  # ProtoNet's 5-way state; every file the same size
    probe = TaskStore(tmp_path / "probe", "sha", 0, 10**9)
    probe.put("0" * 64, tuple("abcde"), prototypes)
    size = task_files_bytes(probe.folder)
    folder, budget = tmp_path / "tasks", 20 * size
    stores = [TaskStore(folder, "sha", 0, budget) for _ in range(2)]
    listings = []
    for name in ("scandir", "listdir"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *args, real=real: listings.append(args) or real(*args))
    for i in range(20):  # up to the budget exactly: no listing
        stores[i % 2].put(f"{i:064x}", tuple("abcde"), prototypes)
    assert listings == []
    assert task_files_bytes(folder) == stores[0].used_bytes() == stores[1].used_bytes() == budget
    for i in range(20):  # last used in the order written (the clock's ticks are coarser than the writes)
        os.utime(stores[0].path(f"{i:064x}"), (1e9 + i, 1e9 + i))
    listings.clear()  # the test's own listings
    stores[1].put("f" * 64, tuple("abcde"), prototypes)  # over: the 3 least recently used go
    assert len(listings) == 1 and task_files_bytes(folder) == 18 * size == stores[0].used_bytes()
    listings.clear()
    assert [i for i in range(20) if not stores[0].path(f"{i:064x}").exists()] == [0, 1, 2]
    assert stores[0].get("f" * 64) is not None
    # Both stores writing at once, from threads as a worker's requests do: the count stays exact.
    writers = [
        threading.Thread(target=lambda s=s, k=k: [s.put(f"{k}{i:063x}", tuple("abcde"), prototypes) for i in range(30)])
        for k, s in enumerate(stores)
    ]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    assert len(listings) <= 60 // 3  # one for every 3 writes: 18 files after each prune, 21 start the next
    assert task_files_bytes(folder) == stores[0].used_bytes() <= budget


def test_a_task_is_written_without_fsync_and_read_back_whole(tmp_path, monkeypatch):
    """The store is a cache (a lost task is a 404: create it again), so no fsync; the rename
    still hands readers the whole file, and what a crashed write leaves is cleared at start-up."""
    synced = []
    monkeypatch.setattr(os, "fsync", lambda descriptor: synced.append(descriptor))
    state = (torch.randn(5, 64), {"head.weight": torch.randn(5, 3)})
    TaskStore(tmp_path, "sha", 10**6, 10**6).put("a" * 64, ("x", "y"), state)
    assert synced == []
    # Another worker (no memory cache) reads it from the file: whole and equal.
    kept = TaskStore(tmp_path, "sha", 0, 10**6).get("a" * 64)
    assert kept.labels == ("x", "y") and torch.equal(kept.state[0], state[0])
    assert torch.equal(kept.state[1]["head.weight"], state[1]["head.weight"])
    # A crashed write's temporary file and a damaged count: a starting store removes the one
    # and counts the files again.
    (tmp_path / f".{'b' * 64}.safetensors.x1y2.tmp").write_bytes(b"half a task")
    (tmp_path / "usage").write_bytes(b"garbage")
    store = TaskStore(tmp_path, "sha", 0, 10**6)
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{'a' * 64}.safetensors", "usage"]
    assert store.used_bytes() == task_files_bytes(tmp_path)


def test_the_memory_budget_counts_what_a_kept_task_costs_and_free_pages_go_back(tmp_path, monkeypatch):
    """A kept tensor costs the process more than its data (10,000 ProtoNet tasks grew the server
    3.9 kB each for 1,280 bytes of prototypes): the budget counts it, so cache_bytes bounds the
    resident size; and the heap's free pages are handed back every 100 tasks kept."""
    trims = []
    monkeypatch.setattr(store_module, "release_free_memory", lambda: trims.append(True))
    prototypes = torch.zeros(5, 64)  # 1,280 bytes of data
    store = TaskStore(tmp_path, "sha", 10 * 1280, 10**9)  # ten tasks' data
    for i in range(200):
        store.put(f"{i:064x}", tuple("abcde"), prototypes)
    assert len(store.memory) == 3 and store.memory.used <= 10 * 1280  # 3 x (1,280 + 2,700)
    assert len(trims) == 2


def test_the_page_is_in_the_package():
    from importlib.resources import files

    page = (files("metalab.serving") / "page.html").read_text()
    assert "<script" in page and "http://" not in page and "https://" not in page  # no external assets
