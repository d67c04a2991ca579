"""Quantization-aware fine-tuning without data: the float model teaches its fake-quantized copy
on synthetic inputs, by KD (The Knowledge Within) or KD plus feature affinity (FAQD).

Inputs are the calibration set, shifted and blended in pairs every step and relabelled by the
float model (the same augmentation as `dfkd distill`'s default), so a few hundred images give
thousands of distinct targets. BatchNorm stays frozen at the model's own statistics (synthetic
batches must not overwrite them) and folded into the convolutions, as it will be once converted.
Quantization ranges keep adapting for the first `observe_share` of the steps, then freeze, so
the last steps train against the ranges the integer model will use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dfkd.data import augment
from dfkd.errors import DfkdError, require_one_of
from dfkd.hooks import Tap, stage_outputs
from dfkd.losses import feature_affinity_loss, kd_loss
from dfkd.models.classifier import Classifier
from dfkd.optim import cosine_lr
from dfkd.quant import pt2e as quant

LOSSES = ("kd", "fa")


@dataclass
class FinetuneOptions:
    loss: str = "kd"  # kd | fa (KD + feature affinity of the matched stage outputs)
    steps: int = 300  # optimizer steps
    lr: float = 1e-4  # Adam, cosine-decayed to 0
    batch_size: int = 128
    temperature: float = 4.0  # KD temperature
    fa_weight: float = 10.0  # lambda in KD + lambda * FA (as `--loss fa` of dfkd distill)
    observe_share: float = 0.5  # share of the steps during which the quantization ranges adapt


def check_options(o: FinetuneOptions) -> None:
    require_one_of("--finetune", o.loss, LOSSES)
    if o.steps <= 0 or o.batch_size <= 0 or o.lr <= 0:
        raise DfkdError(f"fine-tuning steps, batch size and lr must be positive, got {o.steps}, "
                        f"{o.batch_size}, {o.lr}")
    if not 0 <= o.observe_share <= 1:
        raise DfkdError(f"observe_share must be in [0, 1], got {o.observe_share}")


class GraphTaps:
    """Records the outputs of chosen nodes of an exported graph (the last node that each named
    module produced), the graph-module counterpart of a forward hook."""

    def __init__(self, gm: torch.fx.GraphModule, paths: list[str]):
        self.gm, self.values = gm, [None] * len(paths)
        last = {}
        for node in gm.graph.nodes:
            stack = node.meta.get("nn_module_stack")
            if node.op == "call_function" and stack:
                last[list(stack.values())[-1][0]] = node
        missing = [p for p in paths if p not in last]
        if missing:
            raise DfkdError(f"feature affinity: no node of the exported model comes from "
                            f"{', '.join(missing)}; use --finetune kd")
        self.nodes = []
        for i, p in enumerate(paths):
            with gm.graph.inserting_after(last[p]):
                self.nodes.append(gm.graph.call_function(self._record, (last[p], i)))
        gm.recompile()

    def _record(self, value: torch.Tensor, i: int) -> torch.Tensor:
        self.values[i] = value
        return value

    def remove(self) -> None:
        for node in self.nodes:
            self.gm.graph.erase_node(node)
        self.gm.recompile()


def finetune(prepared: torch.fx.GraphModule, model: Classifier, x: torch.Tensor,
             opts: FinetuneOptions, seed: int, progress: bool = False) -> dict:
    """Train the QAT-prepared copy of `model` on inputs x (pixels, CPU); returns loss stats."""
    check_options(opts)
    device = model.mean.device
    params = [p for p in prepared.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=opts.lr)
    gen = torch.Generator().manual_seed(seed)
    taps = None
    if opts.loss == "fa":
        paths = stage_outputs(model)
        if not paths:
            raise DfkdError("feature affinity needs 4-D feature maps (N,C,H,W) and the model has "
                            "none; use --finetune kd")
        taps = GraphTaps(prepared, [f"net.{p}" for p in paths])
        teacher_taps = [Tap(model.net.get_submodule(p)) for p in paths]
    losses = []
    freeze_at = math.ceil(opts.observe_share * opts.steps)
    bar = tqdm(range(opts.steps), desc=f"fine-tune ({opts.loss})", disable=not progress)
    try:
        for step in bar:
            if step == freeze_at:
                quant.set_observers(prepared, False)
            cosine_lr(opt, opts.lr, step / opts.steps)
            idx = torch.randint(0, len(x), (opts.batch_size,), generator=gen)
            xb = augment.apply("shift+mix", x[idx], gen)[0].to(device)
            with torch.no_grad():
                if taps:
                    for t in teacher_taps:
                        t.on = True
                target = model(xb)
            logits = prepared(xb)
            loss = kd_loss(logits, target, opts.temperature)
            if taps:
                for t in teacher_taps:
                    t.on = False
                loss = loss + opts.fa_weight * sum(
                    feature_affinity_loss(s, t.value)
                    for s, t in zip(taps.values, teacher_taps, strict=True))
            if not torch.isfinite(loss):
                raise DfkdError(f"fine-tuning loss is {loss.item()} at step {step}; lower "
                                "--finetune-lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        if taps:
            taps.remove()
            for t in teacher_taps:
                t.remove()
    k = max(1, len(losses) // 10)
    return {"first_loss": sum(losses[:k]) / k, "last_loss": sum(losses[-k:]) / k,
            "steps": len(losses)}
