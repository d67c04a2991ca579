"""`dfkd serve`: a model behind a black-box HTTP API (dfkd.blackbox), for distilling from it
with `--teacher http://HOST:PORT` and for measuring what each access level costs a student."""

from __future__ import annotations

from dataclasses import dataclass

from dfkd.accel import pick_device
from dfkd.blackbox.wire import ACCESS
from dfkd.config import SOURCE, TeacherArgs, option


@dataclass
class ServeConfig:
    model: TeacherArgs = option(factory=TeacherArgs, help=f"model: {SOURCE}")
    host: str = option("127.0.0.1", "address to listen on (loopback by default)")
    port: int = option(8000, "port to listen on")
    access: str = option("soft", "what an answer reveals: soft (all probabilities), topk (the k "
                         "most likely classes and their probabilities) or top1 (the decision "
                         "only)", choices=ACCESS)
    topk: int = option(5, "k of --access topk")
    max_batch: int = option(1024, "images one request may hold (larger ones get 413)")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")


def run_server(cfg: ServeConfig) -> None:
    try:
        from dfkd.blackbox.server import serve
    except ImportError:
        from dfkd.errors import DfkdError

        raise DfkdError("dfkd serve needs starlette and uvicorn; install them with pip install "
                        "'dfkd[serve]'") from None
    model = cfg.model.load().to(pick_device(cfg.device)).eval().requires_grad_(False)
    serve(model, cfg.host, cfg.port, cfg.access, cfg.topk, cfg.max_batch)
