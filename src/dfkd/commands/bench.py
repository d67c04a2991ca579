"""`dfkd bench`: every method against the same teacher, at the same budget, in one command.

A suite fixes the teacher and student architectures and the data. For each seed the harness
trains (or reuses from its cache) the suite's teacher, then runs the two anchors that see real
training data (`kd_real`, the ceiling, and `scratch_real`) and every requested data-free method
through the one distillation engine, so budgets, evaluation schedule and student recipe are
identical for all of them. Each finished (method, seed) run becomes one record of
`results.json`; a rerun of the same command skips finished records and resumes unfinished runs
from their checkpoints, so a crash or Ctrl-C loses at most a few seconds of work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dfkd.blackbox.launch import served
from dfkd.blackbox.wire import ACCESS
from dfkd.commands.suites import DATASET_CHANNELS, SUITE_NAMES, SUITES, Suite, published_file
from dfkd.commands.train_teacher import TeacherConfig, train_teacher
from dfkd.config import (
    DEFENSES,
    RELABELS,
    SCHEDULES,
    STUDENT_INITS,
    Budget,
    DistillConfig,
    TeacherArgs,
    load_config,
    on_off,
    option,
    save_config,
    synthesis_share,
    to_dict,
)
from dfkd.engine.distill import distill
from dfkd.engine.method_choice import choose_method
from dfkd.errors import DfkdError, require_one_of
from dfkd.io import read_jsonl, write_json, write_text
from dfkd.machine import machine_info, machine_line
from dfkd.models.classifier import Classifier, InputSpec, build_net, default_input_shape
from dfkd.student.start import check_start
from dfkd.student.update import online_methods
from dfkd.synthesis import list_methods, method_class

ANCHORS = ("kd_real", "scratch_real")
LRA_ENTRY = "dfad+lra"  # `all` runs LRA on the online method closest to the paper's base


@dataclass
class BenchConfig:
    suite: str = option("digits", "the benchmark suite", choices=SUITE_NAMES)
    methods: str = option("all", "all, default, or names like deepinv,noise; NAME[key=value;...] "
                          "adds a variant with its own options (a row of its own; schedule=, "
                          "relabel=, synthesis_share= and compile= set those for the row alone, "
                          "e.g. default[schedule=proportional]); the real-data anchors kd_real "
                          "and scratch_real run too, unless --no-anchors")
    budget: str | None = option(None, "per method and seed (default: the suite's: 60s for "
                                "digits, 5m for mnist, mnist-r8 and mnist-r14, 10m for mnist-mlp "
                                "and cifar10-r20, 30m for cifar10-r56)")
    seeds: int = option(3, "seeds 0..N-1, one teacher per seed")
    out: str = option("runs/bench", "the benchmark's directory")
    data_root: str | None = option(None, "the suite dataset's files (not for digits)")
    teacher_epochs: int | None = option(None, "epochs of the suite's teachers (default: "
                                        "train-teacher's per-dataset default)")
    teacher_cache: str | None = option(None, "where trained suite teachers are kept (default "
                                       "$DFKD_CACHE/teachers or ~/.cache/dfkd/teachers)")
    models_root: str | None = option(None, "where the published teachers of the "
                                     "cifar10-r20/-r56 suites are (default $DFKD_MODELS or "
                                     "~/.cache/dfkd/models)")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    eval_points: int = option(10, "evaluations spread evenly over each budget")
    method_options: dict = option(factory=dict, flag="--set", metavar="METHOD.KEY=VALUE",
                                  help="a method option, e.g. --set deepinv.steps=100, or a "
                                  "defence option of the METHOD+abd or METHOD+nc rows, "
                                  "e.g. --set abd.sr_share=0.5")
    loss: str = option("", "the student's loss for every data-free method (default: each "
                       "method's own); the anchors keep theirs, so the ceiling stays the same",
                       metavar="{kd,l1,at,fa,crd}")
    student_init: str = option("auto", "where every student starts, the kd_real anchor's too "
                               "(scratch_real always starts random)", choices=STUDENT_INITS)
    schedule: str = option("planned", "transfer-set rounds of every method: planned by cost "
                           "(student steps even or proportional to the set) or fixed",
                           choices=SCHEDULES)
    relabel: str = option("teacher", "the targets of every transfer-set method's augmented "
                          "batches: the teacher's on each batch, or the stored ones blended",
                          choices=RELABELS)
    compile: bool | None = option(None, "every row's teacher and student steps through "
                                  "torch.compile (--no-compile: none); unset, as `dfkd distill` "
                                  "decides for the suite's teacher (tables measured before "
                                  "commit e31d29f ran eager: extend them with --no-compile); "
                                  "the throughput suite: --compile also times compiled cases")
    poison: str = option("", "a backdoor trigger (dfkd.backdoor, e.g. badnets:target=0): every "
                         "suite teacher is poisoned with it (trained so, or a published one "
                         "fine-tuned so), and every run reports teacher and student attack "
                         "success; METHOD+abd and METHOD+nc rows defend against it",
                         metavar="SPEC")
    access: str = option("", "black-box rows: every data-free method that can use a teacher "
                         "API at this access level (soft, topk, top1) distills from the suite "
                         "teacher behind `dfkd serve` on loopback; the others run on its weights "
                         "(marked white box)", choices=("", *ACCESS))
    query_budget: int = option(0, "with --access: queries each black-box run may send (0: no "
                               "limit)", metavar="N")
    no_anchors: bool = option(False, "skip the real-data anchors kd_real and scratch_real (a "
                              "screen of the requested methods alone: 20 minutes fewer at 10m, "
                              "and no gap column)")


# Settings that must match for records to share one table; methods and seeds may grow on rerun.
_FIXED = ("suite", "budget", "data_root", "teacher_epochs", "device", "eval_points",
          "method_options", "loss", "student_init", "schedule", "relabel", "compile", "poison",
          "access", "query_budget")
# fine-tuning a published teacher to poison it (train-teacher --init), unless --teacher-epochs
POISON_FINETUNE = {"epochs": 10, "lr": 0.01}
# train-teacher options added after teachers were first cached: at their defaults they stay out
# of the cache key, so those teachers keep theirs
_LATER_TEACHER_OPTIONS = ("init", "mean", "std", "poison", "poison_rate")


def split_variant(entry: str) -> tuple[str, dict]:
    """'mvn[sigma=0.5;cov=bn]' -> ('mvn', {'sigma': '0.5', 'cov': 'bn'}): one method with its
    own options, a row of its own (ablations in one table). A plain name has no options."""
    match = re.fullmatch(r"([\w+-]+)(?:\[([^\]]*)\])?", entry)
    if not match:
        raise DfkdError(f"bad method entry '{entry}'; write NAME or NAME[key=value;key=value]")
    opts = {}
    for item in [i.strip() for i in (match.group(2) or "").split(";") if i.strip()]:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DfkdError(f"bad option '{item}' in '{entry}'; write key=value")
        opts[key.strip()] = value.strip()
    return match.group(1), opts


# distill settings an entry may set for its own row (NAME[schedule=proportional]), so that two
# settings run side by side, seed by seed, in one table: their choices, or what parses them.
# Every other key is a method option
ENTRY_SETTINGS = {"schedule": SCHEDULES, "relabel": RELABELS, "synthesis_share": synthesis_share,
                  "compile": on_off}


def split_settings(entry: str, opts: dict) -> tuple[dict, dict]:
    """An entry's keys split into method options and its distill settings, the settings checked
    and parsed: {'steps': '3', 'schedule': 'fixed'} -> ({'steps': '3'}, {'schedule': 'fixed'})."""
    settings = {}
    for key in [k for k in opts if k in ENTRY_SETTINGS]:  # in the entry's order
        kind = ENTRY_SETTINGS[key]
        try:
            if isinstance(kind, tuple):
                require_one_of(key, opts[key], kind)
                settings[key] = opts[key]
            else:
                settings[key] = kind(opts[key])
        except DfkdError as e:
            raise DfkdError(f"'{entry}': {e}") from None
    return {k: v for k, v in opts.items() if k not in settings}, settings


def entry_settings(entry: str) -> dict:
    """The distill settings an entry sets for its row, checked: 'nayer[schedule=fixed]' ->
    {'schedule': 'fixed'}."""
    return split_settings(entry, split_variant(entry)[1])[1]


def parse_entry(entry: str) -> tuple[str, dict, str, str]:
    """'dfad+lra[lr_g=0.001]' -> ('dfad', {'lr_g': '0.001'}, 'lra', 'none'): the method, its
    options (without the entry's distill settings, which are checked), the student update
    (`+lra`; plain without) and the backdoor defence (`+abd` or `+nc`; none without), checked."""
    name, opts = split_variant(entry)
    opts, _ = split_settings(entry, opts)
    method, *suffixes = name.split("+")
    cls = method_class(method)  # one-line error listing the methods
    defenses = [s for s in suffixes if s in DEFENSES[1:]]
    unknown = [s for s in suffixes if s != "lra" and s not in DEFENSES[1:]] or \
        (suffixes if len(set(suffixes)) < len(suffixes) or len(defenses) > 1 else [])
    if unknown:
        raise DfkdError(f"bad method entry '{entry}'; the suffixes are +lra (student update) "
                        f"and one backdoor defence: {', '.join('+' + d for d in DEFENSES[1:])}")
    if "lra" in suffixes and cls.family != "online":
        raise DfkdError(f"'{entry}': +lra needs an online method ({online_methods()}), not the "
                        f"{cls.family} method '{method}'")
    return (method, opts, "lra" if "lra" in suffixes else "plain",
            defenses[0] if defenses else "none")


def suite_default(suite: Suite) -> str:
    """The method `--method auto` chooses for the suite's teacher (its architecture decides,
    so an untrained copy does; dfkd.engine.method_choice)."""
    shape = (DATASET_CHANNELS[suite.dataset], *default_input_shape(suite.teacher)[1:])
    with torch.random.fork_rng(devices=[]):
        net = build_net(suite.teacher, 10, shape)
    spec = InputSpec(shape, (0.5,), (0.5,), 10)
    return choose_method(Classifier(net, spec, suite.teacher).eval().requires_grad_(False))[0]


def method_entries(spec: str) -> list[str]:
    """The comma-separated entries of --methods; commas inside NAME[...] stay in their entry."""
    return [t.strip() for t in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", spec) if t.strip()]


def resolve_methods(spec: str, default: str = "", anchors: bool = True) -> list[str]:
    """The anchors first (when `anchors`), then the requested data-free methods
    (validated names); an entry may carry its own options, NAME[key=value;...]; `default`
    stands for the method `auto` chooses for the suite."""
    names: list[str] = []
    for token in method_entries(spec):
        if token == "all":
            names += [*list_methods(), LRA_ENTRY]
        elif split_variant(token)[0] == "default":  # default[...]: its options too
            names.append(default + token[len("default"):])
            parse_entry(names[-1])
        else:
            parse_entry(token)
            names.append(token)
    if not names:
        raise DfkdError("--methods is empty; use all, default or names like deepinv,noise")
    return list(dict.fromkeys([*(ANCHORS if anchors else ()), *names]))


def check_set_keys(method_options: dict) -> None:
    """Every --set key names a method or a defence, so a typo is an error, not an option that
    no row reads."""
    targets = [*list_methods(anchors=True), *DEFENSES[1:]]
    for key in method_options:
        target, _, name = key.partition(".")
        if not name:
            raise DfkdError(f"bench --set takes METHOD.KEY=VALUE (e.g. deepinv.steps=100), got "
                            f"'{key}'")
        if target not in targets:
            raise DfkdError(f"bench --set {key}: '{target}' is neither a method nor a defence; "
                            f"choose one of: {', '.join(targets)}")


def _set_options(cfg: BenchConfig, target: str) -> dict:
    """The --set TARGET.KEY=VALUE options of one method or defence, as KEY -> VALUE."""
    return {k.partition(".")[2]: v for k, v in cfg.method_options.items()
            if k.partition(".")[0] == target}


def options_for(entry: str, cfg: BenchConfig, suite: Suite) -> dict:
    """--set METHOD.KEY=VALUE options, then the entry's own; anchors get the suite's data."""
    method, own, *_ = parse_entry(entry)
    opts = {**_set_options(cfg, method), **own}
    if method_class(method).uses_real_data:
        opts.setdefault("dataset", suite.dataset)
        if cfg.data_root:
            opts.setdefault("data_root", cfg.data_root)
    return opts


def teacher_cache_root(cfg: BenchConfig) -> Path:
    if cfg.teacher_cache:
        return Path(cfg.teacher_cache)
    base = os.environ.get("DFKD_CACHE") or Path.home() / ".cache" / "dfkd"
    return Path(base) / "teachers"


def published_teacher(cfg: BenchConfig, suite: Suite) -> TeacherArgs:
    """The suite's published teacher file, checked once: the same for every seed."""
    pub = suite.published
    return TeacherArgs(path=str(published_file(cfg.suite, suite, cfg.models_root)),
                       arch=suite.teacher, mean=list(pub.mean), std=list(pub.std))


def suite_teacher(cfg: BenchConfig, suite: Suite, seed: int, progress: bool,
                  published: TeacherArgs | None = None) -> TeacherArgs:
    """The teacher trained for `seed`, or the cached one trained with the same settings (the
    cache key hashes the full teacher configuration). With --poison a published teacher is
    fine-tuned with the trigger, one per seed."""
    tcfg = TeacherConfig(dataset=suite.dataset, model=suite.teacher, data_root=cfg.data_root,
                         epochs=cfg.teacher_epochs, seed=seed, device=cfg.device,
                         poison=cfg.poison)
    if published:
        tcfg = dataclasses.replace(tcfg, init=published.path, mean=published.mean,
                                   std=published.std, lr=POISON_FINETUNE["lr"],
                                   epochs=cfg.teacher_epochs or POISON_FINETUNE["epochs"])
    defaults = TeacherConfig()
    key = {k: v for k, v in to_dict(tcfg).items() if k not in ("out", "device")
           and not (k in _LATER_TEACHER_OPTIONS and v == getattr(defaults, k))}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    out = teacher_cache_root(cfg) / f"{cfg.suite}-{suite.teacher}-seed{seed}-{digest}"
    if not (out / "teacher.safetensors").exists() or not (out / "report.json").exists():
        train_teacher(dataclasses.replace(tcfg, out=str(out)), resume=True, progress=progress)
    return TeacherArgs(path=str(out))


def run_bench(cfg: BenchConfig, *, progress: bool = True, command: str = "") -> list[dict]:
    """Run (or complete) a benchmark; returns the records of results.json."""
    if cfg.suite not in SUITES:
        require_one_of("suite", cfg.suite, SUITE_NAMES)
        raise DfkdError("suite 'throughput' is timed by `dfkd bench --suite throughput` "
                        "(dfkd.commands.throughput), not by run_bench")
    suite = SUITES[cfg.suite]
    cfg = dataclasses.replace(cfg, budget=cfg.budget or suite.budget)
    Budget.parse(cfg.budget)
    check_start(cfg.student_init)  # before any run, not once per failed method
    if suite.needs_data_root and not cfg.data_root:
        raise DfkdError(f"suite '{cfg.suite}' needs --data-root with the {suite.dataset} files "
                        "(its anchors and evaluation use the real data)")
    if cfg.seeds < 1:
        raise DfkdError(f"--seeds must be at least 1, got {cfg.seeds}")
    check_set_keys(cfg.method_options)
    # before any run: a missing published file is one line, not one failed record per run
    published = published_teacher(cfg, suite) if suite.published else None
    default = suite_default(suite)
    methods = resolve_methods(cfg.methods, default, anchors=not cfg.no_anchors)
    out = Path(cfg.out)
    _check_same_settings(cfg, out)
    machine = machine_info()
    write_json(out / "machine.json", machine)
    records = _load_records(out)
    if command:
        write_text(out / "command.txt", command + "\n")

    todo = [(seed, m) for seed in range(cfg.seeds) for m in methods
            if not any(r["method"] == m and r["seed"] == seed and "error" not in r
                       for r in records)]
    for i, (seed, method) in enumerate(todo):
        if published and not cfg.poison:
            teacher = published
        else:
            teacher = suite_teacher(cfg, suite, seed, progress, published)
        run_dir = out / "runs" / re.sub(r"[^\w.=-]+", "_", method).strip("_") / f"seed{seed}"
        method_name, _, update, defense = parse_entry(method)
        settings = entry_settings(method)
        dcfg = DistillConfig(teacher=teacher, method=method_name,
                             update=update, defense=defense, eval_trigger=cfg.poison,
                             defense_options=_set_options(cfg, defense),
                             method_options=options_for(method, cfg, suite),
                             loss="" if method in ANCHORS else cfg.loss,
                             student=suite.student, student_init=cfg.student_init,
                             **{"schedule": cfg.schedule, "relabel": cfg.relabel,
                                "compile": cfg.compile, **settings},
                             out=str(run_dir), budget=cfg.budget,
                             seed=seed, device=cfg.device, eval_dataset=suite.dataset,
                             data_root=cfg.data_root, eval_points=cfg.eval_points)
        black_box = cfg.access in method_class(method_name).black_box
        if progress:
            tqdm.write(f"[{i + 1}/{len(todo)}] {method}, seed {seed}"
                       + (f", through a {cfg.access} API" if black_box else ""))
        try:
            with (served(teacher, cfg.access, run_dir / "serve.log") if black_box
                  else contextlib.nullcontext()) as url:
                if url:
                    dcfg = dataclasses.replace(dcfg, teacher=TeacherArgs(path=url),
                                               query_budget=cfg.query_budget)
                report = distill(dcfg, resume=(run_dir / "config.yaml").exists(),
                                 progress=progress, command=command)
            record = _record(report, method, run_dir, command)
        except DfkdError as e:
            record = {"method": method, "seed": seed, "error": str(e)}
        records = [r for r in records if not (r["method"] == method and r["seed"] == seed)]
        records.append(record)
        records = with_gaps(records)
        write_outputs(records, cfg, suite, machine, out, command, default)
        if progress:
            tqdm.write(_summary_line(record))
    if not todo:
        write_outputs(with_gaps(records), cfg, suite, machine, out, command, default)
    return records


def _check_same_settings(cfg: BenchConfig, out: Path) -> None:
    saved = out / "bench.yaml"
    if saved.exists():
        old = load_config(BenchConfig, saved)
        changed = [k for k in _FIXED if getattr(old, k) != getattr(cfg, k)]
        if changed:
            raise DfkdError(f"'{out}' holds a benchmark with different {', '.join(changed)}; "
                            f"rerun with the settings in {saved} or choose another --out")
        # the folder holds every invocation's rows: its bench.yaml names them all
        cfg = dataclasses.replace(
            cfg, methods=",".join(dict.fromkeys([*method_entries(old.methods),
                                                 *method_entries(cfg.methods)])),
            seeds=max(old.seeds, cfg.seeds), no_anchors=old.no_anchors and cfg.no_anchors)
    save_config(cfg, saved)


def _load_records(out: Path) -> list[dict]:
    path = out / "results.json"
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DfkdError(f"cannot read '{path}': {e}; move it away to start over") from None


def _record(report: dict, entry: str, run_dir: Path, command: str) -> dict:
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("student_acc") is not None]
    curve = [{k: r[k] for k in ("seconds", "teacher_passes", "student_acc", "queries") if k in r}
             for r in evals]
    cls = method_class(parse_entry(entry)[0])
    return {**report, "method": entry, "family": cls.family,
            "uses_real_data": cls.uses_real_data, "run_dir": str(run_dir), "curve": curve,
            "command": command or None}


def with_gaps(records: list[dict]) -> list[dict]:
    """gap = kd_real_acc - student_acc against the kd_real run of the same seed (None until
    that anchor has finished)."""
    ceiling = {r["seed"]: r["student_acc"] for r in records
               if r["method"] == "kd_real" and r.get("student_acc") is not None}
    for r in records:
        if "error" not in r:
            kd, acc = ceiling.get(r["seed"]), r.get("student_acc")
            r["gap"] = None if kd is None or acc is None else round(kd - acc, 6)
    return records


def _summary_line(r: dict) -> str:
    if "error" in r:
        return f"  {r['method']} seed {r['seed']}: FAILED: {r['error']}"
    gap = "" if r.get("gap") is None else f", gap to kd_real {100 * r['gap']:+.2f} points"
    return f"  {r['method']} seed {r['seed']}: student {100 * r['student_acc']:.2f}%{gap}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def summarize(records: list[dict]) -> list[dict]:
    """One row per method: mean and std over seeds of the headline numbers."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in records):
        ok = [r for r in records if r["method"] == method and "error" not in r]
        failed = [r for r in records if r["method"] == method and "error" in r]
        row = {"method": method, "runs": len(ok), "failed": len(failed),
               "error": failed[0]["error"] if failed else None,
               "uses_real_data": bool(ok and ok[0].get("uses_real_data")),
               "family": ok[0]["family"] if ok else None}
        for key in ("student_acc", "student_init_acc", "gap", "agreement", "teacher_acc",
                    "synthesis_seconds", "train_seconds", "teacher_passes", "steps",
                    "student_asr", "teacher_asr", "queries", "machine_gflops"):
            values = [r[key] for r in ok if r.get(key) is not None]
            row[key] = _mean_std(values) if values else None
        rows.append(row)
    anchors = [r for r in rows if r["uses_real_data"]]
    others = sorted((r for r in rows if not r["uses_real_data"]),
                    key=lambda r: -(r["student_acc"] or (-1.0, 0))[0])
    return anchors + others


def results_markdown(records: list[dict], cfg: BenchConfig, suite: Suite, machine: dict,
                     command: str) -> str:
    seeds = sorted({r["seed"] for r in records})
    lines = [f"# dfkd bench: {cfg.suite}", "",
             f"{suite.teacher} -> {suite.student} on {suite.dataset}; budget {cfg.budget} per "
             f"method and seed (synthesis + training, evaluation excluded); seeds "
             f"{', '.join(map(str, seeds))}; the same teacher per seed for every method."
             + (" Every student but scratch_real's starts from the teacher's weights where it "
                f"is a slimmer copy (--student-init {cfg.student_init})."
                if cfg.student_init != "random" else ""), "",
             f"Machine: {machine_line(machine)}.", ""]
    # a folder filled by several invocations names each; records older than this field
    # fall back to the latest command
    commands = list(dict.fromkeys(r["command"] for r in records if r.get("command"))) or (
        [command] if command else [])
    if len(commands) == 1:
        lines += [f"Command: `{commands[0]}`", ""]
    elif commands:
        lines += ["Commands (results.json gives each row its own):", "",
                  *[f"- `{c}`" for c in commands], ""]
    columns = ["method", "student acc", "at start", "gap to kd_real", "agreement", "teacher acc",
               *(["student ASR", "teacher ASR"] if cfg.poison else []),
               *(["queries"] if cfg.access else []), "synthesis s",
               "train s", "teacher passes", "steps", "matmul GFLOP/s", "runs"]
    notes = (f" Every teacher carries the backdoor `{cfg.poison}`; ASR = the share of test "
                "images of other classes that its trigger sends to the target class (evaluation "
                "only)." if cfg.poison else "")
    notes += (f" Rows with queries distilled from the suite teacher behind `dfkd serve` "
                 f"({cfg.access} access"
                 + (f", at most {cfg.query_budget} queries each" if cfg.query_budget else "")
                 + "); queries = images sent to it; (white box) rows ran on its weights."
                 if cfg.access else "")
    lines += ["Accuracies in %, mean +- std over seeds. gap = kd_real accuracy - student "
              "accuracy (points, same seed). kd_real and scratch_real see the real training "
              "data; every other row is data-free. at start: the student before its first "
              "step. matmul GFLOP/s: the machine's fp32 rate, measured after each run (one "
              "machine's speed varies from day to day; read wall-clock rows against it)."
              + notes, "",
              "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    blanks = " |" * (len(columns) - 2)  # closes the error cell and the empty cells after it
    for row in summarize(records):
        if not row["runs"]:
            lines.append(f"| {row['method']} | failed: {row['error']}{blanks} 0 |")
            continue
        name = f"{row['method']} (real data)" if row["uses_real_data"] else row["method"]
        if cfg.access and not row["uses_real_data"] and row["queries"] is None:
            name += " (white box)"
        extra = ([_pm(row["student_asr"], 100), _pm(row["teacher_asr"], 100)] if cfg.poison
                 else []) + ([_passes(row["queries"])] if cfg.access else [])
        lines.append("| " + " | ".join([
            name, _pm(row["student_acc"], 100), _pm(row["student_init_acc"], 100),
            _pm(row["gap"], 100), _pm(row["agreement"], 100),
            _pm(row["teacher_acc"], 100), *extra, _pm(row["synthesis_seconds"], 1, 1),
            _pm(row["train_seconds"], 1, 1), _passes(row["teacher_passes"]),
            _pm(row["steps"], 1, 0), _pm(row["machine_gflops"], 1, 0),
            str(row["runs"]) + (f" ({row['failed']} failed)" if row["failed"] else "")]) + " |")
    return "\n".join(lines) + "\n"


def _pm(value, scale: float, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    mean, std = value
    return f"{scale * mean:.{digits}f} +- {scale * std:.{digits}f}"


def _passes(value) -> str:
    return "n/a" if value is None else f"{value[0]:.3g}"


def write_outputs(records, cfg, suite, machine, out: Path, command: str, default: str) -> None:
    write_json(out / "results.json", records)
    write_text(out / "results.md", results_markdown(records, cfg, suite, machine, command))
    title = f"{cfg.suite}: {suite.teacher} -> {suite.student}, {cfg.budget} per method"
    save_comparison(records, "seconds", out / "curves.png", "wall time in budget (s)", title)
    shown = default_and_strongest(records, default)
    if shown and len(shown) < len(records):  # a zoo: its figure has too many curves to read
        save_comparison(shown, "seconds", out / "default-curves.png", "wall time in budget (s)",
                        f"{title}\nthe default ({default}) and the {STRONGEST} strongest others")
    save_comparison(records, "teacher_passes", out / "passes.png",
                    "teacher image passes (forward or forward+backward)", title, log_x=True)
    if cfg.access:
        save_comparison(records, "queries", out / "queries.png",
                        f"queries to the teacher API ({cfg.access} access)", title)


STRONGEST = 3  # data-free methods drawn beside the default in default-curves.png


def default_and_strongest(records: list[dict], default: str) -> list[dict]:
    """The records of the anchors, the suite's default and the STRONGEST data-free methods with
    the best mean accuracy at the end of the budget; none while the default has no row."""
    rows = [r for r in summarize(records) if r["runs"]]
    if default not in {r["method"] for r in rows}:
        return []
    others = [r["method"] for r in rows if not r["uses_real_data"] and r["method"] != default]
    keep = {r["method"] for r in rows if r["uses_real_data"]} | {default, *others[:STRONGEST]}
    return [r for r in records if r["method"] in keep]


def save_comparison(records: list[dict], key: str, path: Path, xlabel: str, title: str,
                    log_x: bool = False) -> None:
    """Student accuracy against `key` for every method on one figure: the mean over seeds,
    interpolated onto a common grid, with a +-1 std band."""
    import numpy as np

    from dfkd.report import distinct_colors, pyplot, save_figure

    plt = pyplot()
    rows = summarize(records)
    wide = len(rows) > 8  # the legend moves beside the axes, where it hides no curve
    fig, ax = plt.subplots(figsize=(10.5 if wide else 8, 5))
    for row, color in zip(rows, distinct_colors(len(rows)), strict=True):
        curves = [r["curve"] for r in records if r["method"] == row["method"] and r.get("curve")]
        curves = [[p for p in c if key in p and (not log_x or p[key] > 0)] for c in curves]
        curves = [c for c in curves if c]
        if not curves:
            continue
        lo = max(c[0][key] for c in curves)
        hi = min(c[-1][key] for c in curves)
        if hi <= lo:
            grid = np.array([hi])
        else:
            grid = np.geomspace(lo, hi, 40) if log_x else np.linspace(lo, hi, 40)
        ys = np.stack([np.interp(grid, [p[key] for p in c], [p["student_acc"] for p in c])
                       for c in curves])
        mean, std = ys.mean(0), ys.std(0)
        style = "--" if row["uses_real_data"] else "-"
        ax.plot(grid, mean, style, color=color, marker="o" if len(grid) == 1 else None,
                label=f"{row['method']} ({len(curves)} seed{'s' * (len(curves) > 1)})")
        if len(curves) > 1:
            ax.fill_between(grid, mean - std, mean + std, alpha=0.15, color=color)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("student test accuracy")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        where = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if wide else {"loc": "best"}
        ax.legend(fontsize=8, **where)
    ax.set_title(title + ("\n(methods without teacher passes are not shown)" if log_x else ""),
                 fontsize=10)
    save_figure(fig, path)
