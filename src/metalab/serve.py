"""metalab-serve: an HTTP service that adapts a meta-trained checkpoint to a client's classes and predicts.

    metalab-serve ckpt_path=pretrained:protonet-omniglot
    metalab-serve ckpt_path=run/checkpoints/last.ckpt host=0.0.0.0 port=8080 api_key=... workers=2

  ckpt_path=FILE          a checkpoint written by metalab-train, or pretrained:<name>
  host=127.0.0.1          the address to listen on (anything but loopback warns when no API key is set)
  port=8000               the TCP port
  workers=1               server processes, each with its own model; they share the task store
                          (for throughput on a CPU: one per core)
  threads=auto            torch threads each worker computes with (auto: the usable cores
                          divided by workers, at least 1; more in all than the cores warns)
  device=cpu              or cuda, cuda:N
  api_key=KEY             required on every route but /healthz, /readyz and the page
                          (default: the environment variable METALAB_API_KEY; api_key= empty: none)
  max_images=256          images in one request, support and query together
  max_image_bytes=4MB     one image's encoded bytes
  max_request_bytes=32MB  one request body
  max_pixels=25000000     one image's width x height, checked before its pixels are decoded
  cache_bytes=256MB       adapted tasks kept in each worker's memory (least recently used go first)
  store_dir=DIR           where adapted tasks are kept on disk (default: $METALAB_CACHE_DIR/serve-tasks,
                          else ~/.cache/metalab/serve-tasks)
  store_bytes=1GB         the most the store folder holds (least recently used files go first)

Sizes take a unit: 500kB, 4MB, 1GB (powers of 1000) or KiB, MiB, GiB. The interface, the
store and the limits are in docs/serving.md. Arguments are key=value pairs read literally (no
Hydra), as metalab-predict reads them; every value is checked before anything starts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from metalab.errors import ConfigError, MetalabError
from metalab.predict import printable
from metalab.pretrained import resolve as resolve_named

API_KEY_ENV = "METALAB_API_KEY"
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
SIZES = ("max_image_bytes", "max_request_bytes", "cache_bytes", "store_bytes")
COUNTS = ("port", "workers", "max_images", "max_pixels")


def default_store_dir() -> str:
    cache = os.environ.get("METALAB_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "metalab"
    return str(Path(cache).expanduser() / "serve-tasks")


@dataclass
class Settings:
    ckpt_path: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    threads: int = 0  # 0: auto, the usable cores divided by workers
    device: str = "cpu"
    api_key: str = ""
    max_images: int = 256
    max_image_bytes: int = 4 * 10**6
    max_request_bytes: int = 32 * 10**6
    max_pixels: int = 25 * 10**6
    cache_bytes: int = 256 * 10**6
    store_dir: str = ""
    store_bytes: int = 10**9


def size_value(key: str, value: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", value)
    unit = match.group(2).lower() if match else None
    if unit not in UNITS:
        raise ConfigError(f"{key}={value} is not a size; give bytes, e.g. {key}=64MB (kB, MB, GB, KiB, MiB, GiB)")
    size = int(match.group(1)) * UNITS[unit]
    if size < 1 and key != "cache_bytes":  # cache_bytes=0: every task read back from the store
        raise ConfigError(f"{key}={value} must be more than 0 bytes; set e.g. {key}=64MB")
    return size


def count_value(key: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1 or (key == "port" and int(value) > 65535):
        bound = " from 1 to 65535" if key == "port" else ""
        also = " or auto" if key == "threads" else ""
        example = Settings.__dict__[key] or 1  # threads' default, 0, stands for auto
        raise ConfigError(f"{key}={value} must be a positive integer{bound}{also}; set e.g. {key}={example}")
    return int(value)


def parse(argv: list[str]) -> Settings:
    """Settings from key=value arguments: every key known, every value checked, ckpt_path given."""
    settings = Settings(api_key=os.environ.get(API_KEY_ENV, ""), store_dir=default_store_dir())
    keys = list(asdict(settings))
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in keys:
            raise ConfigError(
                f"argument {arg!r} is not one of {', '.join(k + '=...' for k in keys)}; see metalab-serve --help"
            )
        if not value and key != "api_key":
            raise ConfigError(f"{key}= is empty; give a value (metalab-serve --help lists the settings)")
        if key in SIZES:
            setattr(settings, key, size_value(key, value))
        elif key in COUNTS:
            setattr(settings, key, count_value(key, value))
        elif key == "threads":
            settings.threads = 0 if value == "auto" else count_value(key, value)
        else:
            setattr(settings, key, value)
    if not settings.ckpt_path:
        raise ConfigError(
            "ckpt_path= missing; usage: metalab-serve ckpt_path=<checkpoint or pretrained:name> [port=8000]"
        )
    resolve_named(settings.ckpt_path)  # an unknown pretrained:<name> fails before any file is read
    if settings.max_image_bytes > settings.max_request_bytes:
        raise ConfigError(
            f"max_image_bytes={settings.max_image_bytes} is more than max_request_bytes={settings.max_request_bytes}, "
            "so no such image could arrive; lower max_image_bytes or raise max_request_bytes"
        )
    check_address(settings.host, settings.port)
    check_store(Path(settings.store_dir))
    return settings


def check_address(host: str, port: int) -> None:
    """Refuse an address this machine cannot listen on (no such interface, port taken) now, not
    after the model loaded."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ConfigError(
            f"host={host} is not an address of this machine; use 127.0.0.1, 0.0.0.0 or an interface's"
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise ConfigError(
                f"cannot listen on host={host} port={port} ({error.strerror}); choose another port=, or stop "
                "what is listening there"
            ) from None


def check_store(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"store_dir={folder} cannot be created ({error.strerror}); give a writable folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"store_dir={folder} is not writable; give a writable folder")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_extra() -> None:
    missing = []
    for module in ("fastapi", "uvicorn", "safetensors"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(f"metalab-serve needs {', '.join(missing)}; install them with pip install 'metalab[serve]'")


def worker_threads(settings: Settings) -> int:
    """Each worker's torch threads: by default the cores shared out among the workers. Workers
    that each take every core's thread only wait for one another; a small model on few cores
    runs a pass in one thread nearly as fast (5 Omniglot images through ProtoNet's conv4: 1.54 ms
    in one thread, 1.23 ms in two), so two workers of one thread each create about twice the
    tasks of one worker of two (scripts/bench_serve.py, docs/serving.md)."""
    from metalab.hardware import usable_cores  # imports torch: not on the way to --help

    return settings.threads or max(1, usable_cores() // settings.workers)


def oversubscribed(settings: Settings) -> str | None:
    """The warning for more torch threads in all than usable cores, on a CPU; None when they fit.
    A worker's idle threads keep spinning for work while the other workers want the cores:
    measured with workers=2 threads=2 on 2 cores, 16 clients got 0.18x (predict) and 0.11x
    (create) the Python API's throughput, against 1.1x and 1.0x with threads=auto."""
    from metalab.hardware import usable_cores  # imports torch: not on the way to --help

    cores, threads = usable_cores(), worker_threads(settings)
    total = threads * settings.workers
    if settings.device != "cpu" or total <= cores:
        return None
    return (
        f"workers={settings.workers} x threads={threads} = {total} torch threads on {cores} "
        "usable cores: under load the workers wait on each other's threads; leave threads=auto"
    )


def build_app(settings: Settings):
    from metalab.serving.app import create_app
    from metalab.serving.inputs import Limits
    from metalab.serving.service import Service

    limits = Limits(settings.max_images, settings.max_image_bytes, settings.max_request_bytes, settings.max_pixels)
    service = Service(
        settings.ckpt_path,
        settings.device,
        limits,
        Path(settings.store_dir),
        settings.cache_bytes,
        settings.store_bytes,
        worker_threads(settings),
    )
    return create_app(service, settings.api_key or None)


def serve(settings: Settings) -> None:
    import uvicorn

    if not settings.api_key and not is_loopback(settings.host):
        print(
            f"metalab: warning: listening on host={settings.host} without an API key: anyone who can reach this "
            f"address can use the model; set api_key= or {API_KEY_ENV}",
            file=sys.stderr,
            flush=True,
        )
    crowded = oversubscribed(settings)
    if crowded:
        print(f"metalab: warning: {crowded}", file=sys.stderr, flush=True)
    app = build_app(settings)  # loads and checks the checkpoint: a bad one is refused before listening
    if settings.workers == 1:
        clean_exit_server()(uvicorn.Config(app, **uvicorn_settings(settings))).run()
        return
    del app  # each worker loads its own copy
    supervise(settings)


def uvicorn_settings(settings: Settings) -> dict:
    return {"host": settings.host, "port": settings.port, "log_level": "info", "timeout_graceful_shutdown": 60}


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port beside the other workers' (SO_REUSEPORT): the kernel gives
    each new connection to one of them, spread by the connection's addresses (Linux). With one socket
    shared by every worker (uvicorn's `workers=`), the first worker to wake accepts every
    connection waiting, so clients that connect at once and keep their connections can all land
    on one worker (measured: 16 connections opened one after another went 16 to 0 in two of four
    tries)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(address)
    listener.listen(2048)
    return listener


def run_worker(settings: dict, listener: socket.socket, started) -> None:
    """One worker process: its own model, answering on its own socket until SIGTERM; `started`
    (an Event) is set once the model is loaded."""
    import threading

    import uvicorn

    # Its own process group: a terminal's Ctrl-C reaches the supervisor alone, which stops the
    # workers with SIGTERM (a worker interrupted by SIGINT would exit with an error status).
    os.setpgrp()
    threading.Thread(target=stop_when_orphaned, args=(os.getppid(),), daemon=True).start()
    settings = Settings(**settings)
    app = build_app(settings)
    started.set()
    clean_exit_server()(uvicorn.Config(app, **uvicorn_settings(settings))).run(sockets=[listener])


def stop_when_orphaned(supervisor: int) -> None:
    """SIGTERM to this worker once its supervisor is gone (killed outright, say), so that no
    worker goes on holding the port."""
    import time

    while os.getppid() == supervisor:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)


def supervise(settings: Settings) -> None:
    """workers=N: N worker processes, each on its own listening socket. A worker that ends
    unexpectedly is started again, unless it ended before loading its model (it would fail
    again): then the server stops, with status 1. SIGTERM or SIGINT stops every worker (each
    finishes the requests in flight); the status is 0 when they all stopped cleanly."""
    import multiprocessing
    import threading

    if sys.platform == "linux":
        listeners = [listening_socket(settings.host, settings.port) for _ in range(settings.workers)]
    else:  # elsewhere SO_REUSEPORT may give every connection to one socket: the workers share one
        listeners = [listening_socket(settings.host, settings.port)] * settings.workers
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: torch's threads do not survive a fork
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def start(i: int):
        started = spawn.Event()
        worker = spawn.Process(target=run_worker, args=(asdict(settings), listeners[i], started), name=f"worker-{i}")
        worker.start()
        return worker, started

    workers, failed = [start(i) for i in range(settings.workers)], False
    while not stop.wait(0.5):
        for i, (worker, started) in enumerate(workers):
            if worker.exitcode is None:
                continue
            failed = not started.is_set()
            what = "it did not start, so the server stops" if failed else "starting another"
            print(f"metalab-serve: worker {worker.pid} ended with status {worker.exitcode}; {what}", file=sys.stderr)
            if failed:
                stop.set()
                break
            workers[i] = start(i)
    for worker, _ in workers:
        if worker.exitcode is None:
            worker.terminate()  # SIGTERM: each worker finishes the requests in flight
    for worker, _ in workers:
        worker.join()
    if failed or any(worker.exitcode != 0 for worker, _ in workers):
        sys.exit(1)


def clean_exit_server():
    """uvicorn's Server, less one habit: after a graceful shutdown on SIGTERM it raises SIGTERM
    again, so the process ends killed by the signal (status 143); here a finished shutdown is a
    clean exit, status 0, as a service manager expects of a server it asked to stop."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals = [sig for sig in self._captured_signals if sig != signal.SIGTERM]

    return Server


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__.strip())
        return
    try:
        settings = parse(argv)
        check_extra()
        serve(settings)
    except MetalabError as error:  # one line, as the other entry points print it
        print(f"metalab: error: {printable(str(error))}", file=sys.stderr, flush=True)
        sys.exit(error.exit_status)


if __name__ == "__main__":
    main()
