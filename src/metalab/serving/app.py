"""The HTTP routes (FastAPI, run by uvicorn): JSON in and out, every refusal `{"error": "..."}`.

    GET  /healthz                       the process answers (never needs the API key)
    GET  /readyz                        the model is loaded and the task store writable (never needs the key)
    GET  /                              the page: adapt and predict from a browser (static, no data in it)
    GET  /v1/model                      what the checkpoint is and takes
    POST /v1/tasks                      {"support": [{"label", "image"}, ...]} -> {"task_id", "labels", ...}
    POST /v1/tasks/{task_id}/predict    {"images": [...]} -> {"predictions": [...]}
    POST /v1/predict                    {"support": [...], "images": [...]} -> {"predictions": [...]}

With an API key, every route but the health checks and the static page needs it, as
`Authorization: Bearer <key>` or `X-API-Key: <key>`, compared in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from metalab.errors import StorageError
from metalab.serving.inputs import ClientError, parse_body
from metalab.serving.service import Service

log = logging.getLogger("metalab.serve")
OPEN_PATHS = ("/healthz", "/readyz", "/")
# Each response names the worker process that answered: with workers=N, which one served what.
WORKER_HEADER = "X-Metalab-Worker"
DRAIN_FACTOR = 8  # a body over max_request_bytes is read (and dropped) up to 8 times that


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def key_matches(headers: Headers, api_key: str) -> bool:
    bearer = headers.get("authorization", "")
    offered = [headers.get("x-api-key", "")]
    if bearer[:7].lower() == "bearer ":
        offered.append(bearer[7:].strip())
    expected = api_key.encode()
    # Every offered value is compared, so the time taken does not depend on which header matched.
    return any([hmac.compare_digest(value.encode(), expected) for value in offered])


class KeyAndWorker:
    """ASGI middleware: refuses a request without the API key (but on OPEN_PATHS) and names the
    worker process on every answer. Written against ASGI itself rather than with
    `@app.middleware`, whose wrapper streams every response through a task of its own: measured
    with 16 clients on an empty route, 2,800 requests/s and 0.35 ms of server CPU a request with it
    against 7,700 and 0.10 ms without (time a create request holds the GIL for)."""

    def __init__(self, app, api_key: str | None, worker: str):
        self.app, self.api_key = app, api_key
        self.worker_header = (WORKER_HEADER.lower().encode(), worker.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.worker_header]}
            await send(message)

        if self.api_key and scope["path"] not in OPEN_PATHS and not key_matches(Headers(scope=scope), self.api_key):
            refusal = error(
                401, "missing or wrong API key; send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            )
            return await refusal(scope, receive, send_named)
        await self.app(scope, receive, send_named)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes `limit` bytes (whatever Content-Length claimed)."""
    declared = request.headers.get("content-length", "")
    body, received = bytearray(), 0
    async for chunk in request.stream():
        received += len(chunk)
        if received <= limit:
            body += chunk
        elif received > DRAIN_FACTOR * limit:
            break  # far past the limit: answer now (the client may then see the connection cut)
        # Past the limit the rest is read and dropped, not kept: a client that sends its whole body
        # before reading the answer (most do) gets the 413 instead of a broken pipe.
    if received > limit:
        size = f"{declared} bytes" if declared.isdigit() else f"more than {limit} bytes"
        raise ClientError(413, too_large(size, limit))
    return bytes(body)


def too_large(size: str, limit: int) -> str:
    return (
        f"the request body has {size}, more than max_request_bytes={limit}; send fewer or smaller images "
        "per request (or start the server with a larger max_request_bytes=)"
    )


def create_app(service: Service, api_key: str | None) -> FastAPI:
    # No generated docs: they would load scripts from a CDN and answer without the key.
    app = FastAPI(title="metalab-serve", docs_url=None, redoc_url=None, openapi_url=None)
    page = (files("metalab.serving") / "page.html").read_text(encoding="utf-8")

    app.add_middleware(KeyAndWorker, api_key=api_key, worker=str(os.getpid()))

    @app.exception_handler(ClientError)
    async def client_error(request: Request, problem: ClientError):
        return error(problem.status, str(problem))

    @app.exception_handler(StorageError)
    async def storage_error(request: Request, problem: StorageError):
        # The server's disk, not the request: the adapted task could not be kept (disk full, no permission).
        log.error("%s", problem)
        return error(507, f"the server cannot keep the task: {problem}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, problem: HTTPException):
        if problem.status_code == 404:
            return error(404, f"no route {request.method} {request.url.path}; see GET /v1/model and docs/serving.md")
        if problem.status_code == 405:
            return error(405, f"{request.url.path} does not take {request.method}")
        return error(problem.status_code, str(problem.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, problem: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error(500, f"internal error ({type(problem).__name__}); the server's log has the details")

    async def answer(request: Request, work, *args) -> JSONResponse:
        body = await read_body(request, service.limits.max_request_bytes)
        parsed = parse_body(body)
        # The work runs on the service's one work thread (service.py says why); requests wait
        # for it here, in the event loop, which goes on answering health checks meanwhile.
        return JSONResponse(await asyncio.wrap_future(service.submit(work, *args, parsed)))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not service.ready():
            return error(503, f"the task store {service.store.folder} is not writable")
        return {"status": "ready"}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/v1/model")
    async def model():
        return await run_in_threadpool(service.model_info)  # waits for the store's lock, as writes do

    @app.post("/v1/tasks")
    async def create_task(request: Request):
        return await answer(request, service.create_task)

    @app.post("/v1/tasks/{task_id}/predict")
    async def predict_task(task_id: str, request: Request):
        return await answer(request, service.predict_task, task_id)

    @app.post("/v1/predict")
    async def predict(request: Request):
        return await answer(request, service.predict_once)

    return app
