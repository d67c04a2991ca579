"""The floor: KD on Gaussian noise. Any method worth using must beat it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfkd.synthesis.base import Options, Synthesizer, register_method


@dataclass
class NoiseOptions(Options):
    batch_size: int = 256  # noise images per student step
    sigma: float = 1.0  # std of the noise in the teacher's normalized input space


@register_method
class Noise(Synthesizer):
    """Noise: KD on Gaussian noise inputs, fresh every step (the baseline to beat)."""

    name = "noise"
    family = "online"
    Options = NoiseOptions
    temperature = 4.0
    black_box = ("soft", "topk", "top1")

    def synthesize(self, student, index):
        o, t = self.opts, self.teacher
        gen = self.rng(index)
        z = o.sigma * torch.randn((o.batch_size, *t.spec.shape), generator=gen, device=self.device)
        x = t.denormalize(z).clamp(0, 1)
        return {"x": x, "target_logits": self.label(x),
                "classes": torch.full((o.batch_size,), -1, dtype=torch.long),
                "seeds": self.seeds(index, o.batch_size)}
