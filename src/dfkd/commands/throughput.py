"""Synthesis throughput of every transfer-set method, per device and accelerator setting.

Accuracy does not depend on how fast a round is made, but a wall-clock budget does: a method
that makes twice the image-iterations per second gets twice the optimization in the same time.
Each case times one synthesis round of a randomly initialised teacher whose BatchNorm statistics
are set (from Gaussian batches), so the numbers need no trained weights and no data, and every
method does its real per-step work (the BN prior included).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from dfkd.accel import Accel, synchronize
from dfkd.errors import DfkdError
from dfkd.hooks import bn_layers
from dfkd.io import write_json, write_text
from dfkd.machine import device_name, machine_info
from dfkd.models import model_input_shape
from dfkd.models.classifier import Classifier, InputSpec, new_classifier
from dfkd.synthesis import create_synthesizer, list_methods, method_class

MODELS = ("resnet34", "lenet5")  # ResNet-34 at 3x32x32 (CIFAR-10 scale), LeNet-5 at 1x32x32
# Not a dataset any rule keys on: DeepInversion's flip "auto" is on, as on natural images.
DATASET = "throughput"
MEAN, STD, NUM_CLASSES = 0.5, 0.25, 10


def transfer_set_methods() -> list[str]:
    """Registered data-free methods that make a stored transfer set (the ones timed here)."""
    return [n for n in list_methods() if method_class(n).family == "transfer_set"]


def default_settings(compile: bool = False) -> list[tuple[str, Accel]]:
    """CPU fp32 always; on CUDA also fp32 and bf16+channels_last; with `compile`, each device
    also compiled (fp32 on the CPU, where bf16 is slower without hardware support)."""
    settings = [("cpu", Accel())]
    if compile:
        settings.append(("cpu", Accel(compile=True)))
    if torch.cuda.is_available():
        settings += [("cuda", Accel()), ("cuda", Accel("bf16", True))]
        if compile:
            settings.append(("cuda", Accel("bf16", True, True)))
    return settings


@torch.no_grad()
def set_bn_statistics(net: nn.Module, shape: tuple[int, ...], batches: int = 4,
                      batch_size: int = 64, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm honest running statistics: the cumulative average over `batches`
    train-mode forwards of N(0,1) inputs (in the net's normalized space), so the BN prior has
    real targets. Momentum is restored afterwards and the net is left in eval mode."""
    layers = bn_layers(net)
    momenta = [m.momentum for m in layers]
    device = next(net.parameters()).device
    gen_device = generator.device if generator is not None else device
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
    net.train()
    try:
        for _ in range(batches):
            x = torch.randn((batch_size, *shape), generator=generator, device=gen_device)
            net(x.to(device))
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        net.eval()
    return net


def throughput_teacher(arch: str, device: torch.device, seed: int = 0) -> Classifier:
    """A seeded random `arch` with BN statistics set, frozen, in eval mode, on `device`."""
    shape = model_input_shape(arch)
    spec = InputSpec(shape, (MEAN,), (STD,), NUM_CLASSES, DATASET)
    torch.manual_seed(seed)
    teacher = new_classifier(arch, spec)  # built on the CPU: the same weights on every device
    set_bn_statistics(teacher.net, shape, generator=torch.Generator().manual_seed(seed))
    return teacher.to(device).eval().requires_grad_(False)


def measure(method: str, arch: str, device: torch.device, accel: Accel, *, steps: int,
            batch_size: int) -> dict:
    """Time one synthesis round (after a one-step warm-up round) of `method` on `arch`."""
    teacher = accel.prepare(throughput_teacher(arch, device))
    fields = {f.name for f in dataclasses.fields(method_class(method).Options)}
    options = {k: v for k, v in (("batch_size", batch_size), ("steps", 1)) if k in fields}
    synth = create_synthesizer(method, teacher, options, seed=0)
    with accel.autocast(device):
        synth.synthesize(None, 0)  # warm-up: allocator, cuDNN autotuning, compilation
        if "steps" in fields:
            synth.opts.steps = steps
        synchronize(device)
        passes = synth.teacher_passes
        start = time.perf_counter()
        batch = synth.synthesize(None, 1)
        synchronize(device)
        seconds = time.perf_counter() - start
    images = int(batch["x"].shape[0])
    iters = steps if "steps" in fields else 1  # a method without steps makes one pass a round
    return {"batch_size": images, "steps": iters, "seconds": seconds,
            "image_iters_per_s": images * iters / seconds,
            "teacher_passes_per_s": (synth.teacher_passes - passes) / seconds}


def run_throughput(out: Path, *, methods: list[str] | None = None, steps: int = 3,
                   batch_size: int = 256, settings: list[tuple[str, Accel]] | None = None,
                   compile: bool = False, progress: bool = True,
                   models: tuple = MODELS) -> list[dict]:
    """Measure every (setting, model, method); write machine.json, and throughput.json and .md
    after each case.

    A method that fails with a DfkdError (or whose compilation fails) is recorded with an
    `error` instead of rates, so one method cannot end the suite.
    """
    methods = transfer_set_methods() if methods is None else list(methods)
    for name in methods:
        method_class(name)  # unknown names fail now, in one line, before any timing
    for arch in models:
        model_input_shape(arch)
    settings = default_settings(compile) if settings is None else list(settings)
    if steps < 1 or batch_size < 1:
        raise DfkdError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    out = Path(out)
    write_json(out / "machine.json", machine_info())
    cases = [(d, a, m, n) for d, a in settings for m in models for n in methods]
    records: list[dict] = []
    for dev, accel, arch, method in tqdm(cases, desc="throughput", unit="case",
                                         disable=not progress):
        device = torch.device(dev)
        record = {"device": device.type, "device_name": device_name(device),
                  "setting": accel.label, "model": arch,
                  "input_shape": list(model_input_shape(arch)), "method": method}
        try:
            record |= measure(method, arch, device, accel, steps=steps, batch_size=batch_size)
        except DfkdError as e:
            record["error"] = str(e)
        except Exception as e:
            if not _is_compile_failure(e):
                raise
            record["error"] = f"torch.compile failed: {(str(e).splitlines() or [''])[0][:300]}"
        record |= {"threads": torch.get_num_threads(), "torch": torch.__version__}
        records.append(record)
        write_json(out / "throughput.json", records)
        write_text(out / "throughput.md", throughput_markdown(records))
    return records


def _is_compile_failure(e: Exception) -> bool:
    try:
        from torch._dynamo.exc import BackendCompilerFailed
    except ImportError:
        return False
    return isinstance(e, BackendCompilerFailed)


def _rate(value) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def throughput_markdown(records: list[dict]) -> str:
    """A markdown table of the records, headed by what they were measured on."""
    if not records:
        return "# Synthesis throughput\n\nNo cases measured.\n"
    first = records[0]
    names = list(dict.fromkeys(f"{r['device']}: {r['device_name']}" for r in records))
    lines = ["# Synthesis throughput", "",
             f"torch {first['torch']}, {first['threads']} CPU threads; {'; '.join(names)}. "
             "One round per case, after a one-step warm-up round; image-iterations/s = "
             "batch x steps / seconds.", "",
             "| device | setting | model | method | image-iterations/s | teacher passes/s "
             "| seconds |",
             "|---|---|---|---|---:|---:|---:|"]
    errors = []
    for r in records:
        where = f"| {r['device']} | {r['setting']} | {r['model']} | {r['method']} |"
        if "error" in r:
            lines.append(f"{where} error | - | - |")
            errors.append(f"- {r['device']} {r['setting']} {r['model']} {r['method']}: "
                          f"{r['error']}")
        else:
            lines.append(f"{where} {_rate(r['image_iters_per_s'])} | "
                         f"{_rate(r['teacher_passes_per_s'])} | {r['seconds']:.3f} |")
    if errors:
        lines += ["", "Errors:", "", *errors]
    return "\n".join(lines) + "\n"
