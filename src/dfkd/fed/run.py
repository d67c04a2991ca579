"""`dfkd fed`: the client split, the federation on Flower, and the report (results.json,
report.md, accuracy per round and the per-client label counts as plots)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

from dfkd.config import prepare_run_dir
from dfkd.fed.launch import require_flower, run_on_flower
from dfkd.fed.partition import plot_label_counts
from dfkd.fed.task import FedConfig, all_label_counts
from dfkd.io import write_json, write_text
from dfkd.report import pyplot, save_figure


def federate(cfg: FedConfig, *, progress: bool = True, command: str = "") -> dict:
    algos = cfg.algorithms()
    require_flower()
    # Flower's apps run in other processes and folders: relative paths would point elsewhere
    cfg = dataclasses.replace(cfg, out=str(Path(cfg.out).resolve()), data_root=str(
        Path(cfg.data_root).resolve()) if cfg.data_root else "")
    out = Path(cfg.out)
    counts = all_label_counts(cfg, 0)  # loads the data: a missing dataset fails before Flower
    prepare_run_dir(out, cfg, False, command)
    plot_label_counts(counts, out / "clients.png", f"{cfg.dataset}: {cfg.clients} clients, "
                      f"Dirichlet alpha {cfg.alpha} (seed 0)")
    t0 = time.perf_counter()
    records = run_on_flower(cfg, out, progress)
    result = {"dataset": cfg.dataset, "model": cfg.arch(), "clients": cfg.clients,
              "alpha": cfg.alpha, "fraction": cfg.fraction, "rounds": cfg.rounds,
              "engine": f"deployment ({cfg.superlink})" if cfg.superlink else "simulation",
              "seconds": round(time.perf_counter() - t0, 2),
              "label_counts_seed0": counts.tolist(), "records": records,
              "summary": summarize(records, algos)}
    write_json(out / "results.json", result)
    plot_rounds(records, algos, out / "accuracy.png", f"{cfg.dataset}, {cfg.clients} clients, "
                f"alpha {cfg.alpha}, {cfg.fraction:.0%} per round")
    write_text(out / "report.md", report_markdown(result, algos))
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(records: list[dict], algos: list[str]) -> dict:
    out = {}
    for algo in algos:
        rs = [r for r in records if r["algo"] == algo]
        mean, std = _mean_std([r["acc"] for r in rs])
        personal, personal_std = _mean_std([r["personal_acc"] for r in rs])
        rounds = len(rs[0]["acc_by_round"])
        out[algo] = {"metric": rs[0]["metric"], "acc_mean": mean, "acc_std": std,
                     "personal_acc_mean": personal, "personal_acc_std": personal_std,
                     "seeds": len(rs),
                     "acc_by_round_mean": [statistics.mean(r["acc_by_round"][i] for r in rs)
                                           for i in range(rounds)],
                     "bytes_per_round": statistics.mean(
                         s + r for rec in rs for s, r in zip(rec["bytes_sent_by_round"],
                                                             rec["bytes_received_by_round"],
                                                             strict=True)),
                     "seconds_mean": statistics.mean(r["seconds"] for r in rs)}
    return out


def plot_rounds(records: list[dict], algos: list[str], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for algo in algos:
        rs = [r for r in records if r["algo"] == algo]
        rounds = range(1, len(rs[0]["acc_by_round"]) + 1)
        stats = [_mean_std([r["acc_by_round"][i - 1] for r in rs]) for i in rounds]
        mean = [m for m, _ in stats]
        ax.plot(rounds, mean, "o-", ms=3, label=algo)
        ax.fill_between(rounds, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (global; fedd2s: personalised)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def report_markdown(r: dict, algos: list[str]) -> str:
    s = r["summary"]
    lines = [f"# dfkd fed: {r['dataset']}, {r['clients']} clients, Dirichlet alpha {r['alpha']}, "
             f"{r['fraction']:.0%} per round, {r['rounds']} rounds ({r['engine']})", "",
             "| algorithm | final accuracy (mean ± std) | final personalised accuracy | seeds "
             "| MB per round | s per run |", "|---|---|---|---|---|---|"]
    for a in algos:
        model = "" if s[a]["metric"] == "global" else " (personalised)"
        lines.append(f"| {a} | {100 * s[a]['acc_mean']:.2f} ± {100 * s[a]['acc_std']:.2f}{model} "
                     f"| {100 * s[a]['personal_acc_mean']:.2f} ± "
                     f"{100 * s[a]['personal_acc_std']:.2f} | {s[a]['seeds']} | "
                     f"{s[a]['bytes_per_round'] / 1e6:.2f} | {s[a]['seconds_mean']:.1f} |")
    rounds = len(s[algos[0]]["acc_by_round_mean"])
    shown = sorted({1, *range(5, rounds + 1, 5), rounds})
    lines += ["", "Test accuracy by round (mean over seeds, %; global, fedd2s personalised):", "",
              "| round | " + " | ".join(algos) + " |", "|---" * (len(algos) + 1) + "|"]
    for i in shown:
        lines.append(f"| {i} | " + " | ".join(f"{100 * s[a]['acc_by_round_mean'][i - 1]:.2f}"
                                              for a in algos) + " |")
    lines += ["", "Personalised accuracy: the test split re-weighted to each client's label mix, "
              "averaged over all clients (of the global model; for fedd2s, of each client's own "
              "model, at its latest round). MB per round: payloads sent to and received from the "
              "round's clients (models, generators, heads, FedD2S uploads). The test split only "
              "reports; it never trains or selects.",
              f"Wall time of the whole run: {r['seconds']:.0f} s.", ""]
    return "\n".join(lines)
