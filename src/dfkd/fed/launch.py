"""`dfkd fed`: run the federation on Flower and report.

Flower runs apps through a SuperLink: `flwr run APP CONNECTION` packages the app directory
(here a generated pyproject whose components are dfkd's installed apps and whose config is this
run's), submits it, and streams its logs. In simulation (the default) dfkd starts a SuperLink
with Flower's simulation runtime, which runs the clients as Ray actors; with `--superlink
HOST:PORT` the run goes to a deployed SuperLink whose SuperNodes were started with
`--node-config "partition-id=I num-partitions=N"`. The ServerApp writes one record per
(algorithm, seed) to the run directory as each finishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from dfkd.errors import DfkdError
from dfkd.fed.task import FedConfig
from dfkd.machine import free_port

# offline and quiet: no telemetry or update checks, no colour codes in logs; the SuperNodes'
# executors poll for work every 0.2 s instead of every second
_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "NO_COLOR": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}


def require_flower():
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise DfkdError("federated runs need Flower; install it with pip install 'dfkd[fed]'"
                        ) from None
    if shutil.which("flwr", path=_bin_path()) is None:
        raise DfkdError("the flwr command is not on PATH next to this Python; reinstall "
                        "'dfkd[fed]' in this environment")


def _bin_path() -> str:
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def flower_env(home: Path) -> dict[str, str]:
    return {**os.environ, **_ENV, "PATH": _bin_path(), "FLWR_HOME": str(home)}


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_app(cfg: FedConfig, folder: Path) -> Path:
    """The Flower app directory: a pyproject naming dfkd's apps, this run's config as the
    run config."""
    folder.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{k} = {_toml(v)}" for k, v in cfg.to_run_config().items())
    (folder / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "dfkd-fed"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "dfkd"

[tool.flwr.app.components]
serverapp = "dfkd.fed.apps:server_app"
clientapp = "dfkd.fed.apps:client_app"

[tool.flwr.app.config]
{config}
""")
    return folder


def wait_for_superlink(address: str, proc: subprocess.Popen | None, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DfkdError(f"the SuperLink exited with code {proc.returncode}; see its log")
        try:
            urllib.request.urlopen(f"http://{address}/health", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise DfkdError(f"no SuperLink answered at {address} within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a Flower process, its process group, and the executors it started in sessions of
    their own (they would otherwise linger for some seconds)."""
    children = _children(proc.pid)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc; elsewhere none are found)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def start_superlink(home: Path, port: int, simulation: bool, log: Path) -> subprocess.Popen:
    cmd = ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if simulation:
        cmd.append("--simulation")
    proc = _spawn(cmd, home, log)
    try:
        wait_for_superlink(f"127.0.0.1:{port}", proc)
    except DfkdError:
        stop(proc)
        raise
    return proc


def submit(cfg: FedConfig, out: Path, address: str, simulation: bool,
           progress: bool = True) -> list[dict]:
    """`flwr run` the app on the SuperLink at `address` and wait for it (its logs go to
    flower.log); returns the ServerApp's records, one per (algorithm, seed)."""
    home = out / "flower"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "dfkd"\n\n[superlink.dfkd]\naddress = "{address}"\n'
        "insecure = true\n")
    result = (out / "records.json").resolve()
    result.unlink(missing_ok=True)
    app = write_app(dataclasses.replace(cfg, result_path=str(result)), out / "app")
    cmd = ["flwr", "run", str(app), "dfkd", "--stream"]
    if simulation:
        cmd += ["--federation-config", f"num-supernodes={cfg.clients} "
                f"client-resources-num-cpus=1 init-args-num-cpus={os.cpu_count() or 1}"]
    expected = cfg.seeds * len(cfg.algorithms())
    bar = tqdm(total=expected, desc="federated runs", unit="run", disable=not progress)
    with (out / "flower.log").open("a") as log:
        proc = subprocess.Popen(cmd, env=flower_env(home), stdout=log, stderr=subprocess.STDOUT,
                                cwd=home)
        while proc.poll() is None:
            time.sleep(1)
            bar.update(len(_records(result)) - bar.n)
    bar.update(len(_records(result)) - bar.n)
    bar.close()
    records = _records(result)
    if proc.returncode != 0 or len(records) < expected:
        raise DfkdError(f"the Flower run ended with {len(records)} of {expected} records "
                        f"({_last_error(out / 'flower.log')}); see {out / 'flower.log'}")
    return records


def _last_error(log: Path) -> str:
    """The last exception line of a Flower log, e.g. "ValueError: ...", or the text of the
    last error box the flwr command drew."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b.*:", ln)]
    if errors:
        return errors[-1][:300]
    boxes = [i for i, ln in enumerate(lines) if ln.startswith("╭─ Error")]
    if boxes:
        inside = itertools.takewhile(lambda ln: ln.startswith("│"), lines[boxes[-1] + 1:])
        return " ".join(" ".join(ln.strip("│ ") for ln in inside).split())[:300]
    return "no error in the log"


def _records(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())["records"]
    except (OSError, ValueError, KeyError):
        return []


def run_on_flower(cfg: FedConfig, out: Path, progress: bool = True) -> list[dict]:
    """Simulation unless cfg.superlink names a deployed SuperLink."""
    if cfg.superlink:
        return submit(cfg, out, cfg.superlink, simulation=False, progress=progress)
    home = out / "flower"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    link = start_superlink(home, port, simulation=True, log=out / "superlink.log")
    try:
        return submit(cfg, out, f"127.0.0.1:{port}", simulation=True, progress=progress)
    finally:
        stop(link)


def start_supernode(home: Path, superlink: str, partition: int, partitions: int, port: int,
                    log: Path) -> subprocess.Popen:
    """A SuperNode holding one partition (what each site of a deployment runs)."""
    cmd = ["flower-supernode", "--insecure", "--superlink", superlink, "--host", "127.0.0.1",
           "--port", str(port), "--node-config",
           f"partition-id={partition} num-partitions={partitions}"]
    return _spawn(cmd, home, log)


def _spawn(cmd: list[str], home: Path, log: Path) -> subprocess.Popen:
    """A long-lived Flower process in a session of its own (so `stop` can end its group),
    writing to `log`."""
    with log.open("w") as out:
        return subprocess.Popen(cmd, env=flower_env(home), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=home)
