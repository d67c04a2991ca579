"""`dfkd quickstart`: the whole pipeline offline on scikit-learn's bundled 8x8 digits.

Trains a teacher on the digits training split, distills a quarter-width student from the
teacher alone (DeepInversion, no data), and prints how close the student came.
"""

from __future__ import annotations

import time
from pathlib import Path

from dfkd.commands.train_teacher import TeacherConfig, train_teacher
from dfkd.config import DistillConfig, TeacherArgs
from dfkd.engine.distill import distill

# DeepInversion tuned for 8x8 digits under a one-minute budget: many short rounds (50 steps at a
# higher learning rate) beat few long ones. The student relabels shifted copies of the samples
# through the teacher (DistillConfig.augment).
QUICKSTART_METHOD_OPTIONS = {"batch_size": 256, "steps": 50, "lr": 0.2}


def quickstart(out: str = "runs/quickstart", budget: str = "60s", seed: int = 0,
               progress: bool = True, teacher_epochs: int | None = None) -> dict:
    start = time.perf_counter()
    out_dir = Path(out)
    teacher = TeacherConfig(dataset="digits", model="digits_cnn", out=str(out_dir / "teacher"),
                            seed=seed, device="cpu", epochs=teacher_epochs)
    t_report = train_teacher(teacher, resume=True, progress=progress)
    cfg = DistillConfig(teacher=TeacherArgs(path=teacher.out), method="deepinv",
                        method_options=dict(QUICKSTART_METHOD_OPTIONS),
                        student="digits_cnn_quarter", out=str(out_dir / "student"),
                        budget=budget, seed=seed, device="cpu", eval_dataset="digits")
    report = distill(cfg, resume=True, progress=progress)
    total = time.perf_counter() - start
    rows = [("teacher (digits_cnn, trained on digits)", f"{100 * report['teacher_acc']:.2f}%"),
            ("student (digits_cnn_quarter, no data)", f"{100 * report['student_acc']:.2f}%"),
            ("agreement student/teacher", f"{100 * report['agreement']:.2f}%"),
            ("teacher training time", f"{t_report['train_seconds']:.1f} s"),
            ("distillation time (synthesis + training)",
             f"{report['synthesis_seconds'] + report['train_seconds']:.1f} s"),
            ("total wall time", f"{total:.1f} s")]
    width = max(len(r[0]) for r in rows)
    print("\ndfkd quickstart: data-free distillation on the digits test split")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"  run directory: {out_dir / 'student'} (report.md, samples.png, curves.png)")
    return report
