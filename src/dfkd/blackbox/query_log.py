"""Every answer a black-box teacher was paid for, kept in the run directory.

A killed run resumes from its last checkpoint and replays, exactly, the steps it had taken since;
those steps ask the teacher the same questions again. The log answers them instead of the API:
the n-th query of a stream is looked up by its position and checked by a digest of its images,
so a resumed run pays only for questions never asked before. One append-only file per stream
(`train`, counted against --query-budget; `eval`, the teacher's accuracy for the report), one
record per request: a header (position, images, classes, digest) and the probabilities as
float32. A record cut short by a kill is dropped when the log is opened.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import torch

_HEADER = struct.Struct("<QII16s")  # position, images, classes, blake2b-128 of the images


def digest(x: torch.Tensor) -> bytes:
    return hashlib.blake2b(x.detach().float().cpu().contiguous().numpy().tobytes(),
                           digest_size=16).digest()


class QueryLog:
    def __init__(self, folder: Path, stream: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{stream}.bin"
        # position -> (offset of the probabilities, images, classes, digest)
        self.records: dict[int, tuple[int, int, int, bytes]] = {}
        self.paid = 0  # images answered by the API, replaced records included
        self._scan()

    def _scan(self) -> None:
        data = self.path.read_bytes() if self.path.exists() else b""
        offset = 0
        while offset + _HEADER.size <= len(data):
            position, n, k, dig = _HEADER.unpack_from(data, offset)
            end = offset + _HEADER.size + 4 * n * k
            if end > len(data):
                break
            self.records[position] = (offset + _HEADER.size, n, k, dig)
            self.paid += n
            offset = end
        if offset < len(data):  # a record cut short by a kill
            with self.path.open("r+b") as f:
                f.truncate(offset)

    def get(self, position: int, dig: bytes) -> torch.Tensor | None:
        """The logged answer to the query at `position`, if it was asked of these images."""
        found = self.records.get(position)
        if found is None or found[3] != dig:
            return None
        offset, n, k, _ = found
        with self.path.open("rb") as f:
            f.seek(offset)
            values = np.frombuffer(f.read(4 * n * k), dtype="<f4")
        return torch.from_numpy(values.copy()).view(n, k)

    def append(self, position: int, dig: bytes, probs: torch.Tensor) -> None:
        n, k = probs.shape
        with self.path.open("ab") as f:
            offset = f.tell() + _HEADER.size
            f.write(_HEADER.pack(position, n, k, dig))
            f.write(probs.float().cpu().contiguous().numpy().astype("<f4").tobytes())
            f.flush()
        self.records[position] = (offset, n, k, dig)
        self.paid += n
