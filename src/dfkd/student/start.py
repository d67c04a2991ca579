"""Start the student from the teacher's own weights, where the student is a slimmer copy.

A data-free student has no real images, but the teacher's filters were learned from them. When
the student is the teacher's architecture with fewer channels (lenet5 -> lenet5_half) or fewer
blocks of the same names (resnet56 -> resnet20), every student tensor has a teacher tensor of
the same name that is at least as large, and the student can start from a slice of it: the
leading output channels, the leading input channels, the same kernel. Taking the same leading
indices everywhere keeps the slices consistent along every path through the network (a layer's
kept outputs are exactly the next layer's kept inputs, across residual sums and across
flattening, whose channel-major order keeps a channel's positions together), so no graph needs
to be traced. Which channels are kept mattered little on mnist: the leading ones did as well as
those with the largest BatchNorm scale (BENCHMARKS.md, "The student starts from the teacher").
"""

from __future__ import annotations

import torch
from torch import nn

from dfkd.config import STUDENT_INITS
from dfkd.errors import DfkdError, require_one_of


def _fits(student: torch.Tensor, teacher: torch.Tensor) -> bool:
    """A slice of `teacher` can stand for `student`: the same rank, at most as many output and
    input channels, and every further dimension (a kernel's height and width) the same."""
    if student.ndim != teacher.ndim:
        return False
    lead = min(student.ndim, 2)
    return (all(s <= t for s, t in zip(student.shape[:lead], teacher.shape[:lead], strict=True))
            and student.shape[lead:] == teacher.shape[lead:])


def misfits(student: nn.Module, teacher: nn.Module) -> list[str]:
    """The student's tensors (parameters and buffers) that no teacher tensor of the same name
    can stand for."""
    theirs = teacher.state_dict()
    return [name for name, value in student.state_dict().items()
            if name not in theirs or not _fits(value, theirs[name])]


def check_start(how: str) -> None:
    require_one_of("student_init", how, STUDENT_INITS)


@torch.no_grad()
def start_student(student: nn.Module, teacher: nn.Module, how: str) -> str:
    """`random`: leave the architecture's own initialization. `teacher`: copy into every student
    tensor the leading slice of the teacher tensor of the same name; a student that is not a
    slimmer copy of the teacher is a one-line error naming the tensors that do not fit. `auto`:
    `teacher` where it fits, else `random`. Returns the start taken."""
    check_start(how)
    if how == "random":
        return how
    bad = misfits(student, teacher)
    if bad and how == "auto":
        return "random"
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DfkdError("--student-init teacher needs a student that is a slimmer copy of the "
                        "teacher (the same tensor names, no more channels, the same kernels); "
                        f"no teacher tensor fits {', '.join(bad[:3])}{more}")
    theirs = teacher.state_dict()
    for name, value in student.state_dict().items():
        value.copy_(theirs[name][tuple(slice(0, n) for n in value.shape)])
    return "teacher"
