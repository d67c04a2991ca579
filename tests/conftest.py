"""Shared fixtures: a small digits teacher trained once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dfkd.commands.train_teacher import TeacherConfig, train_teacher

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the processes a test starts (Flower's SuperLink, ServerApp and Ray actors, inductor's
    # compile workers) inherit one thread too: two OpenMP threads that share one free core
    # spin at every barrier, which made the Flower simulation test four times slower
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _threads():
    """Two torch threads, or one per worker when pytest-xdist spreads the files over the cores
    (`make test`), so that workers do not fight over them."""
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    """A digits_cnn teacher after 3 epochs (about 97% on the digits test split)."""
    out = tmp_path_factory.mktemp("teacher") / "t"
    train_teacher(TeacherConfig(dataset="digits", model="digits_cnn", out=str(out), epochs=3,
                                device="cpu"), progress=False)
    return out
