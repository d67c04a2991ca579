"""Command line: argument parsing only; every command calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import typing

from dfkd import __version__
from dfkd.errors import DfkdError

S = argparse.SUPPRESS  # options left out keep the config's (or --config file's) value


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.5 or 0.5,0.4,0.3, got '{text}'"
                                         ) from None


def _shape(text: str) -> list[int]:
    try:
        shape = [int(v) for v in text.lower().replace("x", ",").split(",")]
    except ValueError:
        shape = []
    if len(shape) != 3 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"expected C,H,W like 3,32,32, got '{text}'")
    return shape


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    return key.strip(), value.strip()


def _parse_as(kind) -> object:
    """How argparse reads a flag of this annotation (the part that is not None)."""
    if kind == list[float]:
        return _floats
    if kind == list[int]:
        return _shape
    return kind


def add_options(p: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    """One flag per field of the config dataclass `cls` declared with `config.option`, named,
    typed and explained by the field alone (`prefix` before each name: `--teacher-arch`). A field
    holding a TeacherArgs is the flag for its path (`--teacher`, `--model`) plus TeacherArgs'
    own; a dict field takes KEY=VALUE, repeated."""
    from dfkd.config import TeacherArgs

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("cli")
        if meta is None:
            continue
        kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)),
                    hints[f.name])
        name = prefix + f.name
        flag = meta["flag"] or "--" + name.replace("_", "-")
        kw = {"dest": name, "default": S, "help": _with_default(meta["help"], f)}
        if kind is TeacherArgs:  # required, unless --config names it (`_with_teacher`)
            p.add_argument(flag, dest=name, default=S, help=meta["help"])
            add_options(p, TeacherArgs)
            continue
        if kind is bool:  # unset (None) means "decided by a rule": --flag / --no-flag
            kw["action"] = argparse.BooleanOptionalAction if f.default is None else "store_true"
        elif kind is dict:
            kw.update(type=_key_value, action="append", metavar=meta["metavar"] or "KEY=VALUE")
        else:
            kw["type"] = _parse_as(kind)
            if kind == list[int]:
                kw["metavar"] = "C,H,W"
        if meta["choices"]:
            kw["choices"] = meta["choices"]
        if meta["metavar"] and kind is not dict:
            kw["metavar"] = meta["metavar"]
        p.add_argument(flag, **kw)


def _with_default(help_text: str, f: dataclasses.Field) -> str:
    """The help, with the field's default where the help does not already say it."""
    if "default" in help_text or any(f.default is v for v in (None, False, dataclasses.MISSING)) \
            or f.default == "":
        return help_text
    return f"{help_text} (default {f.default})"


def _common(p: argparse.ArgumentParser, config_of: str = "a run's config.yaml") -> None:
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--config", help=f"YAML config ({config_of}); flags override it")


def build_parser() -> argparse.ArgumentParser:
    from dfkd.commands.bench import BenchConfig
    from dfkd.commands.quantize import QuantizeConfig
    from dfkd.commands.serve import ServeConfig
    from dfkd.commands.synthesize import SynthesizeConfig
    from dfkd.commands.train_teacher import TeacherConfig
    from dfkd.config import SOURCE, DistillConfig, TeacherArgs
    from dfkd.fed.task import FedConfig

    parser = argparse.ArgumentParser(prog="dfkd", description="Data-free knowledge distillation: "
                                     "a student from a teacher, without the teacher's data.")
    parser.add_argument("--version", action="version", version=f"dfkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quickstart", help="offline demo on scikit-learn's digits, end to end")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--budget", default="60s", help="distillation budget (default 60s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-epochs", type=int, default=None, help="default 40")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("methods", help="list the synthesis methods")
    p.add_argument("--markdown", action="store_true", help="as the README's table")
    sub.add_parser("models", help="list the model zoo")

    p = sub.add_parser("train-teacher", help="train a teacher with supervision")
    add_options(p, TeacherConfig)
    _common(p)

    p = sub.add_parser("distill", help="distill a student from a teacher without data")
    add_options(p, DistillConfig)
    _common(p)

    p = sub.add_parser("synthesize", help="write a transfer set for later distillation")
    add_options(p, SynthesizeConfig)
    _common(p)

    p = sub.add_parser("bench", help="every method side by side on one suite, with anchors")
    add_options(p, BenchConfig)
    p.add_argument("--steps", type=int, default=3, help="throughput: optimization steps timed")
    p.add_argument("--batch-size", type=int, default=256, help="throughput: images per batch")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--config", help="YAML config (a benchmark's bench.yaml); flags override it")

    p = sub.add_parser("quantize", help="an integer model from a float one, calibrated without "
                       "data (torchao)")
    add_options(p, QuantizeConfig)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--config", help="YAML config (a run's config.yaml); flags override it")

    p = sub.add_parser("fed", help="federated learning with data-free distillation on Flower "
                       "(FedAvg, FedProx, FedGen, FedFTG, FedD2S)")
    add_options(p, FedConfig)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--config", help="YAML config (a run's config.yaml); flags override it")

    p = sub.add_parser("serve", help="a model behind a black-box HTTP API, to distill from "
                       "with --teacher http://HOST:PORT")
    add_options(p, ServeConfig)
    p.add_argument("--config", help="YAML config; flags override it")

    p = sub.add_parser("evaluate", help="accuracy of a model on a labelled split")
    p.add_argument("--model", required=True, help=f"model: {SOURCE}")
    add_options(p, TeacherArgs)
    p.add_argument("--dataset", default=None, help="default: the dataset the model records")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--teacher", default=None, help="also report agreement with this teacher (a "
                   "black-box API's URL too)")
    add_options(p, TeacherArgs, prefix="teacher_")  # --teacher-arch, ...: as --arch for --model
    p.add_argument("--trigger", default=None, metavar="SPEC", help="also report the attack "
                   "success rate of this backdoor trigger, e.g. badnets:target=0 (dfkd.backdoor)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _config(cls, args, flags: dict):
    """A config from --config (if any), then the flags the user actually gave."""
    from dfkd.config import load_config

    cfg = load_config(cls, args.config) if getattr(args, "config", None) else cls()
    cfg = dataclasses.replace(cfg, **flags)
    return _with_teacher(cfg, args, flags)


def _with_teacher(cfg, args, flags: dict):
    """`cfg` with its model (`--teacher`, `--model`) from the flags or else the --config file,
    the spec flags given alone (`--arch`, `--mean`...) applied to the file's; a one-line error
    where neither names one."""
    from dfkd.config import TeacherArgs

    for f in dataclasses.fields(cfg):
        model, meta = getattr(cfg, f.name), f.metadata.get("cli")
        if not isinstance(model, TeacherArgs) or meta is None:
            continue
        if f.name not in flags:
            spec = {g.name: getattr(args, g.name) for g in dataclasses.fields(TeacherArgs)
                    if g.name != "path" and hasattr(args, g.name)}
            model = dataclasses.replace(model, **spec)
            cfg = dataclasses.replace(cfg, **{f.name: model})
        if not model.path:
            flag = meta["flag"] or "--" + f.name.replace("_", "-")
            raise DfkdError(f"{flag} is required (or --config with a config that names it)")
    return cfg


def _flags(args, cls) -> dict:
    """The options the user gave for the config dataclass `cls`: a flag's dest is its field's
    name and a flag left out is absent (SUPPRESS), so no list repeats the names."""
    from dfkd.config import TeacherArgs

    hints = typing.get_type_hints(cls)
    flags = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            if hints[f.name] is TeacherArgs:
                value = _teacher_args(args, f.name)
            elif hints[f.name] is dict:
                value = dict(value)
            flags[f.name] = value
    return flags


def _teacher_args(args, dest: str, prefix: str = ""):
    from dfkd.config import TeacherArgs

    return TeacherArgs(path=getattr(args, dest), **{
        f.name: getattr(args, prefix + f.name, None) for f in dataclasses.fields(TeacherArgs)
        if f.name != "path"})


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    command = "dfkd " + shlex.join(argv)
    progress = not getattr(args, "no_progress", False)
    if args.command == "quickstart":
        from dfkd.commands.quickstart import quickstart

        quickstart(args.out, args.budget, args.seed, progress, args.teacher_epochs)
    elif args.command == "methods":
        from dfkd.engine.method_choice import RULE
        from dfkd.student.update import LRA
        from dfkd.synthesis import list_methods, method_class, methods_markdown

        if args.markdown:
            print(methods_markdown(RULE), end="")
            return 0
        print(f"{'auto':<13} {'default':<13} {RULE}")
        for name, doc in list_methods(anchors=True).items():
            print(f"{name:<13} {method_class(name).family:<13} {doc}")
        print(f"{LRA.name:<13} {'update':<13} {LRA.__doc__.splitlines()[0]} For any online "
              f"method: --update {LRA.name} (bench: METHOD+{LRA.name}).")
        print("\n(auto is the default of `dfkd distill`; `dfkd bench --methods default` selects "
              "the method it chooses for the suite's teacher)")
    elif args.command == "models":
        from dfkd.models import list_families, list_models

        for kind in ("classifier", "generator"):
            print(f"{kind}s: {', '.join(list_models(kind))}")
        print(f"classifier families (widths in the name): {', '.join(list_families())}")
    elif args.command == "train-teacher":
        from dfkd.commands.train_teacher import TeacherConfig, train_teacher

        cfg = _config(TeacherConfig, args, _flags(args, TeacherConfig))
        report = train_teacher(cfg, resume=args.resume, progress=progress, command=command)
        print(f"teacher {report['model']} on {report['dataset']}: test accuracy "
              f"{100 * report['test_acc']:.2f}% -> {cfg.out}")
    elif args.command == "distill":
        from dfkd.config import DistillConfig
        from dfkd.engine.distill import distill

        cfg = _config(DistillConfig, args, _flags(args, DistillConfig))
        r = distill(cfg, resume=args.resume, progress=progress, command=command)
        print(f"{r['method']}: student {_pct(r['student_acc'])} (teacher "
              f"{_pct(r['teacher_acc'])}) -> {cfg.out}")
    elif args.command == "synthesize":
        from dfkd.commands.synthesize import SynthesizeConfig, synthesize_set

        cfg = _config(SynthesizeConfig, args, _flags(args, SynthesizeConfig))
        meta = synthesize_set(cfg, resume=args.resume, progress=progress, command=command)
        print(f"{meta['samples']} samples ({meta['method']}) in {meta['seconds']:.1f} s "
              f"-> {cfg.out}")
    elif args.command == "quantize":
        from dfkd.commands.quantize import QuantizeConfig, quantize

        cfg = _config(QuantizeConfig, args, _flags(args, QuantizeConfig))
        r = quantize(cfg, progress=progress, command=command)
        print(f"{r['scheme']} ({r['calibration']}): {_pct(r['quant_acc'])} (fp32 "
              f"{_pct(r['fp32_acc'])}, real calibration {_pct(r['real_calibration_acc'])}), "
              f"{r['size_ratio']}x smaller -> {cfg.out}")
    elif args.command == "fed":
        from dfkd.fed.run import federate
        from dfkd.fed.task import FedConfig

        cfg = _config(FedConfig, args, _flags(args, FedConfig))
        r = federate(cfg, progress=progress, command=command)
        print(", ".join(f"{a} {100 * v['acc_mean']:.2f}%" for a, v in r["summary"].items())
              + f" -> {cfg.out}")
    elif args.command == "serve":
        from dfkd.commands.serve import ServeConfig, run_server

        run_server(_config(ServeConfig, args, _flags(args, ServeConfig)))
    elif args.command == "bench":
        _bench(args, progress, command)
    elif args.command == "evaluate":
        _evaluate(args)
    return 0


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _bench(args, progress: bool, command: str) -> None:
    if args.suite == "throughput":
        from dfkd.commands.throughput import run_throughput, throughput_markdown

        records = run_throughput(getattr(args, "out", "runs/throughput"), steps=args.steps,
                                 batch_size=args.batch_size, compile=args.compile is True,
                                 progress=progress)
        print(throughput_markdown(records))
        return
    from dfkd.commands.bench import BenchConfig, run_bench

    cfg = _config(BenchConfig, args, _flags(args, BenchConfig))
    run_bench(cfg, progress=progress, command=command)
    print(f"results in {cfg.out}: results.json, results.md, curves.png, passes.png")


def _evaluate(args) -> None:
    from dfkd.evaluate import load_eval_data, metrics, predict_logits

    model = _teacher_args(args, "model").load()
    dataset = args.dataset or model.spec.dataset
    if not dataset:
        raise DfkdError("the model does not record its dataset; pass --dataset NAME")
    data = load_eval_data(dataset, model, args.data_root, args.split)
    ref = None
    if args.teacher:
        ref = predict_logits(_teacher_args(args, "teacher", prefix="teacher_").load(), data.x)
    result = {"dataset": dataset, "split": args.split, "samples": len(data.y),
              **metrics(predict_logits(model, data.x), data.y, ref)}
    if args.trigger:
        from dfkd.backdoor import Trigger
        from dfkd.evaluate import model_asr

        trigger = Trigger.parse(args.trigger)
        result.update(trigger=trigger.spec(), asr=model_asr(model, data, trigger))
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model} on {dataset}/{args.split} ({len(data.y)} images): accuracy "
          f"{100 * result['acc']:.2f}%, ECE {result['ece']:.4f}" +
          (f", agreement with teacher {100 * result['agreement']:.2f}%" if ref is not None else "")
          + (f", attack success {100 * result['asr']:.2f}% ({result['trigger']})"
             if args.trigger else ""))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except DfkdError as e:
        print(f"dfkd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        how = "the same command" if argv[:1] == ["bench"] else "the same command with --resume"
        print(f"\ndfkd: interrupted; rerun {how} to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
