"""What a finished run leaves for people: report.json/.md, a grid of samples, learning curves."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dfkd.io import atomic_path, write_json, write_text

REQUIRED_KEYS = ("method", "teacher_acc", "student_acc", "agreement", "synthesis_seconds",
                 "train_seconds", "teacher_passes", "seed", "dataset", "budget")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def distinct_colors(n: int) -> list[tuple]:
    """n colours, no two alike up to 20 (tab10, then tab20), one per curve or class of a
    figure; past 20 they repeat."""
    cmap = pyplot().get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def image_grid(x: torch.Tensor, ncol: int | None = None) -> torch.Tensor:
    """(N,C,H,W) pixels in [0,1] -> one (H', W', C) image with 1-pixel gaps."""
    n, c, h, w = x.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = torch.ones(c, nrow * (h + 1) + 1, ncol * (w + 1) + 1)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = x[i]
    return grid.permute(1, 2, 0).clamp(0, 1)


def save_samples(x: torch.Tensor, path: Path, title: str = "", labels=None) -> None:
    """Grid of up to 64 synthesized inputs, with the class each was made for if known."""
    plt = pyplot()
    x = x[:64].detach().float().cpu()
    grid = image_grid(x).numpy()
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_axis_off()
    if labels is not None and len(labels):
        title = f"{title}\nintended classes: " + " ".join(str(int(v)) for v in labels[:16]) + \
            (" ..." if len(labels) > 16 else "")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def save_curves(records: list[dict], path: Path, title: str = "") -> None:
    """Student accuracy (and agreement) against wall time and against teacher passes."""
    plt = pyplot()
    evals = [r for r in records if r.get("student_acc") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "seconds", "wall time in budget (s)"),
                           (axes[1], "teacher_passes", "teacher image passes")):
        xs = [r[key] for r in evals]
        ax.plot(xs, [r["student_acc"] for r in evals], "o-", label="student accuracy")
        if evals and evals[0].get("agreement") is not None:
            ax.plot(xs, [r["agreement"] for r in evals], "s--", label="agreement with teacher")
        ax.set_xlabel(label)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction")
    axes[0].legend(loc="lower right")
    fig.suptitle(title)
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    plt = pyplot()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def write_report(report: dict, out: Path) -> None:
    """report.json (fractions in [0,1]) and a human-readable report.md."""
    write_json(out / "report.json", report)
    rows = [("method", report["method"]), ("teacher accuracy", _pct(report["teacher_acc"])),
            ("student accuracy", _pct(report["student_acc"])),
            ("student accuracy before training", _pct(report.get("student_init_acc"))),
            ("agreement", _pct(report["agreement"])),
            ("synthesis time", f"{report['synthesis_seconds']:.1f} s"),
            ("student training time", f"{report['train_seconds']:.1f} s"),
            ("teacher image passes", f"{report['teacher_passes']:,}"),
            ("budget", report["budget"]), ("evaluation dataset", report["dataset"]),
            ("seed", report["seed"])]
    extra = [(k, v) for k, v in report.items()
             if k not in (*REQUIRED_KEYS, "student_init_acc") and not isinstance(v, list | dict)]
    lines = [f"# dfkd run: {report['method']} -> {report.get('student', '')}", "",
             "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows + extra]
    if report.get("per_class_acc"):
        lines += ["", "Per-class student accuracy: " + ", ".join(
            f"{i}: {_pct(a)}" for i, a in enumerate(report["per_class_acc"]))]
    lines += ["", "Accuracies are measured at the end of the budget on the evaluation split, "
              "which never trains or selects anything.", ""]
    write_text(out / "report.md", "\n".join(lines))
