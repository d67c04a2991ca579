"""Resumable training state: weights, optimizer, RNG states and counters in one atomic file."""

from __future__ import annotations

from pathlib import Path

import torch

from dfkd.io import atomic_path


def save_checkpoint(path: Path, net: torch.nn.Module, optimizer, gen: torch.Generator,
                    state: dict, **extra) -> None:
    ckpt = {"net": net.state_dict(), "optimizer": optimizer.state_dict(), "gen": gen.get_state(),
            "torch_rng": torch.get_rng_state(), "state": dict(state), **extra}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path: Path, net: torch.nn.Module, optimizer, gen: torch.Generator,
                    state: dict) -> dict:
    """Restore in place (weights, optimizer, RNGs, counters); returns the checkpoint's extras."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(ckpt["net"])
    optimizer.load_state_dict(ckpt["optimizer"])
    gen.set_state(ckpt["gen"])
    torch.set_rng_state(ckpt["torch_rng"])
    state.update(ckpt["state"])
    return ckpt
