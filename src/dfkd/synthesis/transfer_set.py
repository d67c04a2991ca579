"""The transfer set: synthetic inputs (float16), the logits the student learns to match, the class
each input was made for, and the seeds that reproduce it.

Stored as numbered safetensors parts, one per synthesis round, each written atomically: a run
killed at any moment keeps every finished round, and a resumed run continues after the last
one. Nothing is round-tripped through PNG (lossy, slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dfkd.errors import DfkdError
from dfkd.io import atomic_path, write_json

FIELDS = ("x", "target_logits", "classes", "seeds")
# the names two fields had in sets written before they were renamed; such sets still load
LEGACY_NAMES = {"logits": "target_logits", "targets": "classes"}


class TransferSet:
    """Append-only set of batches, in memory and (when `root` is given) on disk."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else None
        self.parts: list[dict[str, torch.Tensor]] = []
        self._cache: dict[str, torch.Tensor] | None = None

    @classmethod
    def open(cls, root: str | Path, limit: int | None = None) -> TransferSet:
        """Load the parts on disk (the first `limit` if given; later ones are deleted)."""
        ts = cls(root)
        files = ts._files()
        if not files and not Path(root).is_dir():
            raise DfkdError(f"no transfer set at '{root}'; create one with `dfkd synthesize`")
        if limit is not None:
            for f in files[limit:]:
                f.unlink()
            files = files[:limit]
        for f in files:
            try:
                part = load_file(str(f))
            except (SafetensorError, OSError) as e:
                raise DfkdError(f"transfer-set part '{f}' is unreadable ({e}); delete it") from None
            ts.parts.append({LEGACY_NAMES.get(k, k): v for k, v in part.items()})
        return ts

    def _files(self) -> list[Path]:
        return sorted(self.root.glob("part-*.safetensors")) if self.root else []

    def append(self, batch: dict[str, torch.Tensor]) -> None:
        part = {k: batch[k].detach().cpu() for k in FIELDS}
        part["x"] = part["x"].half()
        part["target_logits"] = part["target_logits"].float()
        if self.root is not None:
            with atomic_path(self.root / f"part-{len(self.parts):06d}.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in part.items()}, str(tmp))
        self.parts.append(part)
        self._cache = None

    def __len__(self) -> int:
        return sum(p["x"].shape[0] for p in self.parts)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._cache is None:
            self._cache = {k: torch.cat([p[k] for p in self.parts]) for k in FIELDS}
        return self._cache

    def sample(self, batch_size: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """A uniformly drawn minibatch: distinct samples within it, replaced between draws.
        `index` holds their positions in the set (stable: parts are only ever appended), which
        CRD's memory is keyed by."""
        data = self.tensors()
        idx = torch.randperm(len(self), generator=gen)[:batch_size]
        return {"x": data["x"][idx].float(), "target_logits": data["target_logits"][idx],
                "index": idx}

    def write_meta(self, meta: dict) -> None:
        write_json(self.root / "meta.json", meta)

    def read_meta(self) -> dict:
        path = self.root / "meta.json"
        return json.loads(path.read_text()) if path.exists() else {}
