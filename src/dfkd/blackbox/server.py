"""`dfkd serve`: any model dfkd can load, behind an HTTP API that reveals only what its access
level allows (dfkd.blackbox.wire). Starlette routes the requests and uvicorn serves them; the
model runs in a worker thread, one batch at a time, so the event loop keeps answering (and
refusing malformed requests) while it works."""

from __future__ import annotations

import threading

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dfkd.blackbox.wire import ACCESS, NPY, BadRequest, api_info, decode_inputs, model_answer
from dfkd.errors import DfkdError, require_one_of
from dfkd.models.classifier import Classifier

HEADER_SLACK = 4096  # bytes a .npy header may take beyond the pixels themselves


def create_app(model: Classifier, access: str = "soft", topk: int = 5,
               max_batch: int = 1024) -> Starlette:
    require_one_of("access", access, ACCESS)
    if topk < 1 or max_batch < 1:
        raise DfkdError(f"topk and max_batch must be positive, got {topk} and {max_batch}")
    shape, lock = model.spec.shape, threading.Lock()
    max_bytes = max_batch * 4 * int(torch.tensor(shape).prod()) + HEADER_SLACK
    info = api_info(model, access, topk, max_batch)

    def locked_answer(x: torch.Tensor) -> dict:
        with lock:
            return model_answer(model, x, access, topk)

    async def get_info(request: Request) -> JSONResponse:
        return JSONResponse(info)

    async def predict(request: Request) -> JSONResponse:
        try:
            if request.headers.get("content-type", "").split(";")[0].strip() != NPY:
                raise BadRequest(415, f"send the images as {NPY} (a .npy float32 array)")
            body = await _read_body(request, max_bytes)
            x = decode_inputs(body, shape, max_batch)
        except BadRequest as e:
            return JSONResponse({"error": e.reason}, status_code=e.status)
        return JSONResponse(await run_in_threadpool(locked_answer, x))

    return Starlette(routes=[Route("/v1/info", get_info, methods=["GET"]),
                             Route("/v1/predict", predict, methods=["POST"])])


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"a body of {declared} bytes; at most {limit} (max_batch images)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"a body over {limit} bytes (max_batch images)")
        chunks.append(chunk)
    return b"".join(chunks)


def serve(model: Classifier, host: str, port: int, access: str, topk: int,
          max_batch: int) -> None:
    """Serve until interrupted (uvicorn handles SIGINT and SIGTERM)."""
    import uvicorn

    app = create_app(model, access, topk, max_batch)
    print(f"serving {model.arch} ({access} access) on http://{host}:{port}/v1/predict",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", ws="none")
