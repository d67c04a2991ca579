"""`dfkd quantize`: an integer model from a float one and no data, measured against the float
model and against calibration with real images.

One run compares calibration sources side by side on one scheme. The first source named is
the product: its model is exported (`quantized.pt2`, the self-contained program;
`quantized.safetensors`, its integer weights and quantization parameters, which
`quant.load_quantized` rebuilds into the same program) and its numbers are the report's
top-level keys. The real-data anchor (`real`) is added as a row whenever the training split can be
loaded; the evaluation split only ever reports.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dfkd.accel import pick_device
from dfkd.config import SOURCE, TeacherArgs, option, prepare_run_dir
from dfkd.errors import DfkdError
from dfkd.evaluate import load_eval_data, metrics
from dfkd.io import write_json, write_text
from dfkd.quant import pt2e as quant
from dfkd.quant.calibration import calibration_method, make_calibration
from dfkd.quant.qat import FinetuneOptions, check_options, finetune
from dfkd.report import save_samples


@dataclass
class QuantizeConfig:
    model: TeacherArgs = option(factory=TeacherArgs, help=f"model: {SOURCE}")
    calibration: str = option("bns", "comma-separated sources, the first one is exported: "
                              "gaussian, inception, bns, mixmix, any transfer-set method "
                              "(deepinv, mvn, ...), real (the anchor; added as a row when the "
                              "training files load)")
    scheme: str = option("int8-static", "integer scheme", choices=quant.SCHEMES)
    finetune: str = option("none", "quantization-aware fine-tuning on the calibration set, the "
                           "float model teaching: kd, or fa (KD + feature affinity, FAQD)",
                           choices=("none", "kd", "fa"))
    finetune_steps: int = option(300, "fine-tuning steps")
    finetune_lr: float = option(1e-4, "fine-tuning learning rate")
    calibration_size: int = option(512, "inputs per source (also the fine-tuning set)")
    extra_teachers: str = option("", "mixmix: comma-separated models inverted together with "
                                 "--model (their BN statistics are matched too); PATH@ARCH "
                                 "for weights that do not name their architecture")
    method_options: dict = option(factory=dict, flag="--set", metavar="[SOURCE.]KEY=VALUE",
                                  help="an option of the synthesis methods behind the "
                                  "calibration: KEY for every source, SOURCE.KEY for one, e.g. "
                                  "--set bns.steps=100 (an option its method lacks is an error)")
    eval_dataset: str | None = option(None, "report-only evaluation data (default: the dataset "
                                      "the model records)")
    data_root: str | None = option(None, "where the evaluation dataset's files are")
    out: str = option("runs/quant", "run directory")
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    latency_batch: int = option(256, "batch of the latency measurement")
    compile: bool = option(False, "time both models under torch.compile (inductor lowers int8 "
                           "to oneDNN)")


def quantize(cfg: QuantizeConfig, *, progress: bool = True, command: str = "") -> dict:
    quant.check_scheme(cfg.scheme)
    quant.require_torchao()
    sources = [s.strip() for s in cfg.calibration.split(",") if s.strip()]
    if not sources:
        raise DfkdError("--calibration names no source")
    for s in sources:
        if s != "real":
            calibration_method(s)
    unknown = {k.split(".")[0] for k in cfg.method_options if "." in k} - set(sources)
    if unknown:
        raise DfkdError(f"--set names source(s) {', '.join(sorted(unknown))} that --calibration "
                        "does not list")
    ft = None
    if cfg.finetune != "none":
        ft = FinetuneOptions(loss=cfg.finetune, steps=cfg.finetune_steps, lr=cfg.finetune_lr)
        check_options(ft)
    device = pick_device(cfg.device)
    if cfg.model.is_api:
        raise DfkdError("dfkd quantize needs the model's weights; a black-box API has none")
    model = cfg.model.load().to(device).eval().requires_grad_(False)
    dataset = cfg.eval_dataset or model.spec.dataset
    if not dataset or dataset == "none":
        raise DfkdError("dfkd quantize reports accuracy: pass --eval-dataset NAME (the model "
                        "records no dataset)")
    data = load_eval_data(dataset, model, cfg.data_root)
    out = Path(cfg.out)
    prepare_run_dir(out, cfg, False, command)

    t_start = time.perf_counter()
    float_logits = quant.predict(model, data.x)
    fp32 = metrics(float_logits, data.y)
    rows = [_row(src, model, cfg, ft, data, float_logits, device, progress, first=i == 0)
            for i, src in enumerate(sources)]
    if "real" not in sources:
        try:
            rows.append(_row("real", model, cfg, ft, data, float_logits, device, progress,
                             first=False))
        except DfkdError as e:  # no training files: the anchor is missing, the run is not
            rows.append({"calibration": "real", "error": str(e)})
    product = rows[0]
    converted = product.pop("_model")
    for r in rows[1:]:
        r.pop("_model", None)

    quant_bytes = quant.save_quantized(converted, model, out / "quantized.safetensors",
                                       cfg.scheme, qat=ft is not None,
                                       extra={"calibration": product["calibration"]})
    fp32_bytes = quant.bytes_on_disk(quant.float_constants(model))
    program_bytes = quant.save_program(converted, model.spec.shape, out / "quantized.pt2")
    check = data.x[:64]
    expected = quant.predict(converted, check)
    for name, load in (("quantized.pt2", quant.load_program),
                       ("quantized.safetensors", lambda f: quant.load_quantized(f, device))):
        if not torch.equal(quant.predict(load(out / name), check), expected):
            raise DfkdError(f"the saved {name} does not reproduce the model's outputs")
    fp32_program = quant.save_program(quant.export_float(model), model.spec.shape,
                                      out / "float.pt2")
    lat_fp32, lat_quant, mode = _latencies(model, converted, cfg)

    report = {
        "model": str(cfg.model.path), "arch": model.arch, "dataset": dataset, "seed": cfg.seed,
        "calibration": product["calibration"], "scheme": cfg.scheme, "finetune": cfg.finetune,
        "fp32_acc": fp32["acc"], "quant_acc": product["quant_acc"],
        "ptq_acc": product["ptq_acc"], "agreement": product["agreement"],
        "real_calibration_acc": next((r.get("quant_acc") for r in rows
                                      if r["calibration"] == "real"), None),
        "fp32_bytes": fp32_bytes, "quant_bytes": quant_bytes,
        "size_ratio": round(fp32_bytes / quant_bytes, 3),
        "fp32_program_bytes": fp32_program, "quant_program_bytes": program_bytes,
        "latency_ms_fp32": lat_fp32, "latency_ms_quant": lat_quant,
        "latency_batch": cfg.latency_batch, "latency_mode": mode,
        "calibration_size": cfg.calibration_size, "rows": rows,
        "seconds": round(time.perf_counter() - t_start, 2),
        "threads": torch.get_num_threads(), "device": str(device),
    }
    write_json(out / "report.json", report)
    write_text(out / "report.md", report_markdown(report))
    return report


def _row(source: str, model, cfg: QuantizeConfig, ft: FinetuneOptions | None, data,
         float_logits, device, progress: bool, first: bool) -> dict:
    bar = tqdm(total=cfg.calibration_size, desc=f"calibration {source}", unit="img",
               disable=not progress)
    options = {k: v for k, v in cfg.method_options.items() if "." not in k}
    options.update({k.split(".", 1)[1]: v for k, v in cfg.method_options.items()
                    if k.startswith(source + ".")})
    if source == "mixmix" and cfg.extra_teachers:
        options["extra_teachers"] = cfg.extra_teachers
    cal = make_calibration(source, model, cfg.calibration_size, cfg.seed, options=options,
                           dataset=data.name, data_root=cfg.data_root,
                           progress=lambda n: bar.update(n - bar.n))
    bar.close()
    if first:
        save_samples(cal.x[:64], Path(cfg.out) / "samples.png", f"calibration: {source}")
    t0 = time.perf_counter()
    ptq = quant.quantize_static(model, cfg.scheme, cal.x.to(device))
    ptq_logits = quant.predict(ptq, data.x)
    row = {"calibration": source, "method": cal.method, "calibration_seconds":
           round(cal.seconds, 2), "teacher_passes": cal.teacher_passes,
           "ptq_acc": metrics(ptq_logits, data.y)["acc"]}
    final, logits = ptq, ptq_logits
    if ft is not None:
        prepared = quant.prepare_qat(model, cfg.scheme)
        quant.observe(prepared, cal.x.to(device))
        row["finetune"] = {**asdict(ft), **finetune(prepared, model, cal.x, ft, cfg.seed,
                                                    progress)}
        final = quant.convert(prepared)
        logits = quant.predict(final, data.x)
    m = metrics(logits, data.y, float_logits)
    row.update({"quant_acc": m["acc"], "agreement": m["agreement"],
                "quantize_seconds": round(time.perf_counter() - t0, 2), "_model": final})
    return row


def _latencies(model, converted, cfg: QuantizeConfig) -> tuple[float, float, str]:
    """Median ms per forward of a batch of `latency_batch` inputs, eager or compiled."""
    x = torch.rand(cfg.latency_batch, *model.spec.shape, device=model.mean.device)
    fp32, q = model, converted
    if cfg.compile:
        fp32, q = torch.compile(model), torch.compile(converted)
    return (round(quant.latency_ms(fp32, x), 3), round(quant.latency_ms(q, x), 3),
            "compiled" if cfg.compile else "eager")


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def report_markdown(r: dict) -> str:
    lines = [f"# dfkd quantize: {r['arch']} -> {r['scheme']} ({r['calibration']} calibration)",
             "", "| | |", "|---|---|",
             f"| fp32 accuracy | {_pct(r['fp32_acc'])} |",
             f"| quantized accuracy | {_pct(r['quant_acc'])} |",
             f"| with real calibration | {_pct(r['real_calibration_acc'])} |",
             f"| fine-tuning | {r['finetune']} |",
             f"| size on disk (weights, safetensors) | {r['fp32_bytes']:,} B -> "
             f"{r['quant_bytes']:,} B ({r['size_ratio']}x smaller) |",
             f"| program (.pt2, graph included) | {r['fp32_program_bytes']:,} B -> "
             f"{r['quant_program_bytes']:,} B |",
             f"| CPU latency, batch {r['latency_batch']} ({r['latency_mode']}) | "
             f"{r['latency_ms_fp32']:.2f} ms -> {r['latency_ms_quant']:.2f} ms |",
             f"| evaluation dataset | {r['dataset']} |", f"| seed | {r['seed']} |", "",
             "| calibration | after calibration | final | agreement with fp32 | "
             "calibration time |", "|---|---|---|---|---|"]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['calibration']} | not run: {row['error']} | | | |")
            continue
        lines.append(f"| {row['calibration']} | {_pct(row['ptq_acc'])} | "
                     f"{_pct(row['quant_acc'])} | {_pct(row['agreement'])} | "
                     f"{row['calibration_seconds']:.1f} s |")
    lines += ["", "`final` is after fine-tuning when there is any. Accuracies are on the "
              "evaluation split, which never calibrates, trains or selects anything.", ""]
    return "\n".join(lines)
