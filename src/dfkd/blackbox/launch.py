"""`dfkd serve` in a child process on a free loopback port, for as long as a block runs: how the
bench puts a suite's teacher behind a real API."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dfkd.errors import DfkdError
from dfkd.machine import free_port


def serve_args(teacher) -> list[str]:
    """The `dfkd serve` flags that load the model `teacher` (a TeacherArgs) names."""
    args = ["--model", str(teacher.path)]
    for flag, value in (("--arch", teacher.arch), ("--num-classes", teacher.num_classes)):
        if value:
            args += [flag, str(value)]
    for flag, values in (("--input-shape", teacher.input_shape), ("--mean", teacher.mean),
                         ("--std", teacher.std)):
        if values:
            args += [flag, ",".join(map(str, values))]
    return args


@contextlib.contextmanager
def served(teacher, access: str, log: Path, timeout: float = 120):
    """Yields the URL of `dfkd serve` running `teacher` at `access`; stops it afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dfkd", "serve", *serve_args(teacher),
                                 "--port", str(port), "--access", access, "--device", "cpu"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise DfkdError(f"dfkd serve exited with code {proc.returncode}; see {log}")
            try:
                urllib.request.urlopen(f"{url}/v1/info", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise DfkdError(f"dfkd serve did not answer within {timeout:.0f} s; "
                                    f"see {log}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
