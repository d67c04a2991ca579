"""Where a second goes on this machine: per-image cost of each pass a DFKD run makes.

Times, at one batch size, the passes that make up synthesis and student training for a teacher
and student pair (the published CIFAR-10 ResNet-20 -> resnet8a by default):
teacher forward without gradients (labelling, relabelling), teacher forward and backward to the
input (an inversion step), student forward and backward (a student step without the teacher),
a generator's forward and backward at two widths (the generator methods' extra work), and last
the teacher's no-grad forward again with nayer's BatchNorm prior hooked on it, as it is during a
nayer or fast run (what its hooks add to every relabelling). With `--compile`, then that forward
and the student step again under torch.compile as `dfkd distill --compile` runs them, each with
the seconds its first call took to compile.

    python benchmarks/cost_breakdown.py \
        --teacher ../shared/models/cifar10/resnet20-12fca82f.th [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch

from dfkd.accel import Accel
from dfkd.models.classifier import load_classifier, new_classifier
from dfkd.synthesis import create_synthesizer
from dfkd.synthesis.generative import build_generator


def per_image_ms(fn, batch: int, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats / batch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", required=True)
    p.add_argument("--arch", default="resnet20a")
    p.add_argument("--student", default="resnet8a")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time the compiled passes")
    a = p.parse_args()
    teacher = load_classifier(a.teacher, arch=a.arch, mean=(0.485, 0.456, 0.406),
                              std=(0.229, 0.224, 0.225)).eval()
    student = new_classifier(a.student, teacher.spec).train()
    x = torch.rand((a.batch, *teacher.spec.shape))

    def relabel():
        with torch.no_grad():
            teacher(x)

    def invert():
        xi = x.clone().requires_grad_(True)
        teacher(xi).logsumexp(1).sum().backward()

    def student_step():
        student.zero_grad()
        student(x).logsumexp(1).sum().backward()

    rows = [("teacher forward, no grad (label / relabel)", relabel),
            ("teacher forward + backward to input (one inversion step)", invert),
            ("student forward + backward (one student step, teacher excluded)", student_step)]
    for ngf in (64, 16):
        g = build_generator(teacher, "", 256, ngf, 0)
        z = torch.randn(a.batch, 256)

        def gen_step(g=g, z=z):
            g.zero_grad()
            g(z).sum().backward()

        rows.append((f"generator forward + backward (ngf {ngf}, nz 256)", gen_step))
    print(f"threads {torch.get_num_threads()}, batch {a.batch}, ms per image:")
    for name, fn in rows:
        print(f"  {per_image_ms(fn, a.batch, a.repeats):7.3f}  {name}")
    create_synthesizer("nayer", teacher, {}, seed=0)  # hooks the teacher's BatchNorm layers
    print(f"  {per_image_ms(relabel, a.batch, a.repeats):7.3f}  teacher forward, no grad, "
          "with nayer's BatchNorm prior hooked")
    if a.compile:
        accel = Accel(compile=True)
        accel.prepare(teacher)
        view = accel.training_view(student)

        def compiled_step():
            student.zero_grad()
            view(x).logsumexp(1).sum().backward()

        for name, fn in (("teacher forward, no grad, nayer's prior hooked", relabel),
                         ("student forward + backward", compiled_step)):
            start = time.perf_counter()
            fn()  # compiles
            compiling = time.perf_counter() - start
            print(f"  {per_image_ms(fn, a.batch, a.repeats):7.3f}  {name}, compiled "
                  f"({compiling:.1f} s compiling)")


if __name__ == "__main__":
    main()
