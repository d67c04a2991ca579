"""What numbers were measured on: they mean little without the CPU, GPU and torch version."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
from pathlib import Path

import torch

from dfkd import __version__


def device_name(device: torch.device) -> str:
    """The CPU model (from /proc/cpuinfo) or the GPU name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_gflops(device: torch.device, seconds: float = 0.3, size: int = 512) -> float:
    """The device's fp32 matrix-multiply rate now, in GFLOP/s: the same machine runs faster or
    slower from one day to the next, and a wall-clock number is read against this rate."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up: allocator, kernels, thread pool
        a @ b
    sync()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls == 0:
        a @ b
        sync()
        calls += 1
    return round(2 * size**3 * calls / elapsed / 1e9, 1)


PACKAGE_DIR = Path(__file__).resolve().parent


def code_revision(package: Path = PACKAGE_DIR) -> str | None:
    """The git commit of the dfkd source that runs, with '+' where that source has uncommitted
    changes; None for an installed copy (its files are not tracked by a repository). A benchmark
    row can be rerun from its commit."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True,
                              timeout=10)
    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode:
            return None  # not a checkout of dfkd (e.g. a venv inside someone's repository)
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def machine_info() -> dict:
    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    gpu = device_name(torch.device("cuda", 0)) if torch.cuda.is_available() else None
    return {"cpu_count": os.cpu_count(), "cpu_model": device_name(torch.device("cpu")),
            "memory_gib": memory, "gpu": gpu, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "dfkd": __version__,
            "dfkd_commit": code_revision(),
            "matmul_gflops": matmul_gflops(torch.device("cpu"))}


def machine_line(m: dict) -> str:
    return (f"{m['cpu_count']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, "
            f"GPU: {m['gpu'] or 'none'}, torch {m['torch']} ({m['torch_threads']} threads), "
            f"Python {m['python']}"
            + (f", fp32 matmul {m['matmul_gflops']} GFLOP/s" if m.get("matmul_gflops") else ""))


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now (for the servers dfkd starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
