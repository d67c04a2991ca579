"""`--method auto` and `--compile` unset, the defaults: the method, and whether to compile, chosen
from the teacher by a documented rule, never from a suite's name.

The rule follows what a CPU budget buys (BENCHMARKS.md, "The default: one rule for every
suite"). Where one inversion step of the teacher is cheap enough (at most CHEAP_INVERSION_FLOPS
per image, forward and backward to the input: LeNet-5, the MNIST MLP, the digits CNN and the
MNIST ResNets of the mnist-r8/-r14 suites all are), per-sample inversion (deepinv) spends the
budget on well-matched samples and gives the best student; where it is dear (the CIFAR ResNets),
amortized synthesis (nayer) is far ahead. The cost is counted in FLOPs on the teacher's own
input, not timed, so the choice is the same on every machine and at every budget. A teacher
behind an API has no FLOPs to count and no gradients: dfme where it answers with probabilities,
db3kd where it gives decisions only.

torch.compile follows the same count, with its own threshold (MIN_COMPILE_FLOPS): compiling
costs tens of seconds at the start, and the passes of a dear teacher and its student run faster
by more than that within minutes (BENCHMARKS.md, "torch.compile on a CPU"), while a cheap one's
never repay it, nor does a wall-clock budget too short to win the compiling time back. It needs
a backend for the device (a C++ compiler on a CPU, Triton on a GPU); without one the run stays
eager.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

import torch

from dfkd.config import Budget
from dfkd.engine.plan import count_flops, inversion_step

AUTO = "auto"
# per image. Measured: deepinv ahead up to 104 MFLOPs (mnist-r14 by 20-42 points), nayer from 162
# (cifar10-r20 by 25); the threshold sits between the two, near their geometric mean.
CHEAP_INVERSION_FLOPS = 130e6
# A teacher above this many FLOPs per inversion step compiles: the CIFAR ResNets' (162+) repay the
# build, the suites' cheap teachers' (2-11) never do.
MIN_COMPILE_FLOPS = 50e6
CHEAP, DEAR = "deepinv", "nayer"
# A first compiled cifar10-r20 run (nothing in inductor's cache) loses to eager at 90 s and 3
# minutes and wins at 10 (BENCHMARKS.md, "Short budgets: where compiling pays").
MIN_COMPILE_SECONDS = 300
RULE = (f"{CHEAP} for a teacher whose inversion step costs at most "
        f"{CHEAP_INVERSION_FLOPS / 1e6:.0f} MFLOPs per image, {DEAR} above; dfme for a black-box "
        "API with probabilities, db3kd for one with decisions only")


_counted: WeakKeyDictionary = WeakKeyDictionary()


def inversion_flops(teacher) -> float:
    """FLOPs of one inversion step (forward and backward to the input) per image, counted once
    per teacher (both choices ask)."""
    if teacher not in _counted:
        x = torch.zeros(2, *teacher.spec.shape, device=teacher.mean.device)
        _counted[teacher] = count_flops(lambda: inversion_step(teacher, x)) / 2
    return _counted[teacher]


def choose_method(teacher) -> tuple[str, str]:
    """The method `auto` stands for with this teacher, and why (one line for the report)."""
    access = getattr(teacher, "access", None)
    if access:
        method = "dfme" if access in ("soft", "topk") else "db3kd"
        return method, f"a black-box API with {access} access"
    flops = inversion_flops(teacher)
    method = CHEAP if flops <= CHEAP_INVERSION_FLOPS else DEAR
    return method, f"an inversion step costs {flops / 1e6:.1f} MFLOPs per image"


def choose_transfer_set_method(teacher) -> tuple[str, str]:
    """`auto` for `dfkd synthesize`, which keeps a set: the same rule, with db3kd (the black-box
    method that keeps one) for every API, dfme keeping none."""
    method, why = choose_method(teacher)
    return ("db3kd", why) if getattr(teacher, "access", None) else (method, why)


def compile_backend_missing(device: torch.device) -> str:
    """Why torch.compile cannot build for `device` here, or '' where it can."""
    from torch._dynamo import is_dynamo_supported

    if not is_dynamo_supported():
        return "torch.compile does not support this Python"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return "" if has_triton() else "no Triton for the GPU"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # inductor's own search failed: no usable C++ compiler
        return "no C++ compiler found (set CXX)"
    return ""


def choose_compile(teacher, device: torch.device, budget: Budget | None = None
                   ) -> tuple[bool, str]:
    """Whether an unset `--compile` compiles this teacher and its student, and why. A step
    budget compiles as a long one would: it fixes the work, and compiling only shortens it."""
    if getattr(teacher, "access", None):
        return False, "a black-box API: only the student runs here"
    flops = inversion_flops(teacher)
    if flops <= MIN_COMPILE_FLOPS:
        return False, (f"an inversion step costs {flops / 1e6:.1f} MFLOPs per image, too little "
                       "to repay compiling")
    if budget is not None and budget.seconds is not None and budget.seconds < MIN_COMPILE_SECONDS:
        return False, (f"a budget under {MIN_COMPILE_SECONDS // 60} minutes, too short to repay "
                       "compiling")
    missing = compile_backend_missing(device)
    if missing:
        return False, f"{missing}; the run stays eager"
    return True, f"an inversion step costs {flops / 1e6:.1f} MFLOPs per image"
