"""The page of metalab-serve in a real headless Chromium, driven over the DevTools protocol.

Real Omniglot PNG files are put into the page's file inputs (`DOM.setFileInputFiles`, what
choosing files in the dialog does), the Predict button is clicked, and the predictions are read
off the page and compared with the Python API's. Without Chromium the test is skipped, or fails
where METALAB_REQUIRE_BROWSER=1 (make test-full).
"""

import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from learner_checkpoints import omniglot_folders
from serve_client import Server

pytest.importorskip("fastapi", reason="metalab-serve's extra is not installed: pip install 'metalab[serve]'")
import websockets.sync.client as websockets  # noqa: E402  (the test extra)

import metalab  # noqa: E402

PRETRAINED = "pretrained:protonet-omniglot"
KEY = "browser-test-key"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WAIT_S = 90


def chromium() -> str:
    found = os.environ.get("METALAB_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
    if found is None:
        reason = f"no Chromium found (looked for {', '.join(BROWSERS)}; set METALAB_CHROMIUM)"
        if os.environ.get("METALAB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason}; METALAB_REQUIRE_BROWSER=1 makes a missing browser a failure", pytrace=False)
        pytest.skip(reason)
    return found


class DevTools:
    """One page of a headless Chromium, commands sent and answered over its DevTools websocket."""

    def __init__(self, binary: str, profile: Path):
        self.process = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",  # the tests may run as root, where Chromium's sandbox refuses to start
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",  # any free port: Chromium writes it to DevToolsActivePort
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        for _ in range(WAIT_S * 10):
            if port_file.is_file() and port_file.read_text().strip():
                break
            assert self.process.poll() is None, f"Chromium exited with {self.process.returncode}"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        page = next(p for p in pages if p["type"] == "page")
        self.socket = websockets.connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ids = itertools.count(1)

    def send(self, method: str, **params) -> dict:
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:  # events arrive between the answers; only this command's answer counts
            message = json.loads(self.socket.recv(timeout=WAIT_S))
            if message.get("id") == message_id:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str):
        for _ in range(WAIT_S * 5):
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"waited {WAIT_S} s for {expression}")

    def set_files(self, selector: str, files: list[Path]) -> None:
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        assert node, selector
        self.send("DOM.setFileInputFiles", nodeId=node, files=[str(f) for f in files])

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.mark.slow
@pytest.mark.data
def test_the_page_predicts_dropped_images_as_the_python_api(omniglot_dir, tmp_path):
    binary = chromium()
    support, query = omniglot_folders(omniglot_dir, tmp_path / "pngs", classes=5, shots=1, queries=2)
    queries = sorted(query)
    server = Server(
        tmp_path / "server.log", f"ckpt_path={PRETRAINED}", f"store_dir={tmp_path / 'tasks'}", f"api_key={KEY}"
    )
    (tmp_path / "profile").mkdir()
    browser = DevTools(binary, tmp_path / "profile")
    try:
        browser.send("Page.enable")
        browser.send("Page.navigate", url=server.url + "/")
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('predict')")
        browser.evaluate(f"document.getElementById('api-key').value = {json.dumps(KEY)}")
        labels = list(support)
        for index, label in enumerate(labels):
            if index >= 2:  # the page starts with two class rows
                browser.evaluate("document.getElementById('add-class').click()")
            browser.evaluate(f"document.querySelector('#class-{index} .class-name').value = {json.dumps(label)}")
            browser.set_files(f"#class-{index} input[type=file]", support[label])
        browser.set_files("#query-files", queries)
        browser.evaluate("document.getElementById('predict').click()")
        shown = browser.wait_for(
            "document.getElementById('error').textContent || "
            "(document.querySelectorAll('#results tr[data-label]').length && "
            "[...document.querySelectorAll('#results tr[data-label]')].map((r) => "
            "({label: r.dataset.label, probabilities: JSON.parse(r.dataset.probabilities)})))"
        )
        assert isinstance(shown, list), f"the page shows the error: {shown}"
        task = metalab.load_learner(PRETRAINED).adapt({label: support[label] for label in labels})
        expected = task.predict_proba(queries)  # the page sends the queries in one request: one pass
        assert [row["label"] for row in shown] == [labels[k] for k in expected.argmax(-1).tolist()]
        got = torch.tensor([[row["probabilities"][label] for label in labels] for row in shown])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert sum(row["label"] == query[path] for row, path in zip(shown, queries)) >= 8  # of 10; chance: 2
        # The page tells the user what went wrong: here, a wrong key.
        browser.evaluate("document.getElementById('api-key').value = 'wrong'")
        browser.evaluate("document.getElementById('predict').click()")
        message = browser.wait_for("document.getElementById('error').textContent")
        assert "API key" in message
    finally:
        browser.close()
        assert server.stop() == 0, server.output()
