"""A real metalab-serve process for the tests, and a plain HTTP client (urllib) to talk to it.

The server runs as `python -m metalab.serve` on 127.0.0.1 and a free port, its output in a log
file (a pipe nobody reads could fill and stall it); `Server.stop` ends it by its own pid.
"""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

WORKER_HEADER = "X-Metalab-Worker"
READY_TRIES = 600  # x 0.1 s: loading torch and a checkpoint on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Server:
    def __init__(self, log: Path, *settings: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.headers: dict[str, str] = {}
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "metalab.serve", f"port={self.port}", *settings],
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        self.wait_ready()

    def wait_ready(self) -> None:
        for _ in range(READY_TRIES):
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if self.request("GET", "/readyz")[0] == 200:
                    return
            except OSError:  # not listening yet
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server was not ready after {READY_TRIES / 10:.0f} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def request(self, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict]:
        """(status, parsed JSON answer); `body`: an object sent as JSON, or raw bytes sent as they are."""
        return self.request_with_worker(method, path, body, headers)[:2]

    def request_with_worker(self, method: str, path: str, body=None, headers=None) -> tuple[int, dict, str]:
        """(status, parsed JSON answer, the pid of the worker that answered)."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **self.headers, **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read()), response.headers.get(WORKER_HEADER)
        except urllib.error.HTTPError as error:
            text = error.read()
            answer = json.loads(text) if text.startswith(b"{") else {"raw": text.decode(errors="replace")}
            return error.code, answer, error.headers.get(WORKER_HEADER)

    def post(self, path: str, body) -> dict:
        status, answer = self.request("POST", path, body)
        assert status == 200, (status, answer)
        return answer

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode
