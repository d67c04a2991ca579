"""Command line: argument parsing only; every command calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys

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


def _add_model_source(p: argparse.ArgumentParser, flag: str, help_text: str) -> None:
    p.add_argument(flag, required=True, help=help_text)
    p.add_argument("--arch", default=S, help="architecture: a zoo name or package.module:factory "
                   "(needed when the weights do not say)")
    p.add_argument("--input-shape", type=_shape, default=S, metavar="C,H,W",
                   help="input shape, for weights that carry no spec")
    p.add_argument("--mean", type=_floats, default=S, help="normalization mean (1 or per channel)")
    p.add_argument("--std", type=_floats, default=S, help="normalization std (one or per channel)")
    p.add_argument("--num-classes", type=int, default=S, help="number of classes (else inferred)")


def _teacher_args(args, flag: str):
    from dfkd.config import TeacherArgs

    return TeacherArgs(path=getattr(args, flag), arch=getattr(args, "arch", None),
                       input_shape=getattr(args, "input_shape", None),
                       mean=getattr(args, "mean", None), std=getattr(args, "std", None),
                       num_classes=getattr(args, "num_classes", None))


def _accel(p: argparse.ArgumentParser) -> None:
    from dfkd.config import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default=S,
                   help="bf16: synthesis and the teacher's relabelling under autocast (GPU)")
    p.add_argument("--channels-last", action="store_true", default=S,
                   help="run the teacher in channels_last memory format (GPU)")
    p.add_argument("--compile", action="store_true", default=S,
                   help="run the teacher through torch.compile")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=S, help="random seed (default 0)")
    p.add_argument("--device", default=S, help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--config", help="YAML config (a run's config.yaml); flags override it")


def build_parser() -> argparse.ArgumentParser:
    from dfkd.commands.suites import SUITE_NAMES
    from dfkd.config import AUGMENTATIONS, SCHEDULES, STUDENT_INITS
    from dfkd.data import DATASETS
    from dfkd.student.update import UPDATES

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
    p.add_argument("--dataset", default=S, choices=DATASETS)
    p.add_argument("--model", default=S, help="zoo name or package.module:factory")
    p.add_argument("--out", default=S)
    p.add_argument("--data-root", default=S)
    p.add_argument("--epochs", type=int, default=S)
    p.add_argument("--batch-size", type=int, default=S)
    p.add_argument("--lr", type=float, default=S)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=S)
    p.add_argument("--input-shape", type=_shape, default=S, metavar="C,H,W")
    _common(p)

    p = sub.add_parser("distill", help="distill a student from a teacher without data")
    _add_model_source(p, "--teacher", "teacher: run directory, .safetensors or state-dict file")
    p.add_argument("--method", default=S, help="synthesis method (see `dfkd methods`)")
    p.add_argument("--set", dest="method_options", type=_key_value, action="append", default=S,
                   metavar="KEY=VALUE", help="a method option, e.g. --set steps=500 (repeatable)")
    p.add_argument("--student", default=S, help="zoo name or package.module:factory (default: "
                   "the usual student of a zoo teacher, e.g. lenet5 -> lenet5_half)")
    p.add_argument("--student-init", choices=STUDENT_INITS, default=S,
                   help="teacher: start from the leading slices of the teacher's weights (a "
                   "student that is a slimmer or shallower copy of it), random: the "
                   "architecture's own initialization, or auto (default): teacher where the "
                   "student is such a copy, else random")
    p.add_argument("--out", default=S)
    p.add_argument("--budget", default=S, help="wall clock (90s, 10m, 1h) or steps (2000steps)")
    p.add_argument("--eval-dataset", default=S, help="report-only evaluation data; 'none' for "
                   "none (default: the teacher's training dataset if recorded)")
    p.add_argument("--data-root", default=S)
    p.add_argument("--transfer-set", default=S, help="train on a set from `dfkd synthesize`")
    p.add_argument("--temperature", type=float, default=S)
    p.add_argument("--loss", default=S, metavar="{kd,l1,at,fa,crd}",
                   help="the student's loss (default: the method's own, kd for most): kd, l1 on "
                   "logits, at (KD + attention transfer), fa (KD + feature affinity), crd (KD + "
                   "contrastive representation distillation; transfer-set methods only)")
    p.add_argument("--loss-set", dest="loss_options", type=_key_value, action="append",
                   default=S, metavar="KEY=VALUE",
                   help="a student-loss option, e.g. --loss-set weight=100 (repeatable)")
    p.add_argument("--update", choices=UPDATES, default=S,
                   help="student update of an online method: plain optimizer step (default) or "
                   "lra (meta step on the new batch + replay memory of past ones)")
    p.add_argument("--update-set", dest="update_options", type=_key_value, action="append",
                   default=S, metavar="KEY=VALUE",
                   help="a student-update option, e.g. --update-set memory=20 (repeatable)")
    p.add_argument("--batch-size", type=int, default=S)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=S,
                   help="the student's optimizer (default sgd with Nesterov momentum 0.9; adam "
                   "is AdamW)")
    p.add_argument("--lr", type=float, default=S,
                   help="the student's learning rate (default 0.1 for sgd, 1e-3 for adam), "
                   "cosine-decayed over the budget")
    p.add_argument("--augment", default=S, choices=AUGMENTATIONS,
                   help="augment stored samples and relabel them by the teacher (default "
                   "shift+mix: shift, then blend random pairs; affine adds rotation and scale)")
    p.add_argument("--schedule", choices=SCHEDULES, default=S,
                   help="transfer-set methods: planned (default: samples per round, inversion "
                   "steps and student steps between rounds planned from measured costs for the "
                   "budget) or fixed (the method's own rounds, 200 student steps apart)")
    p.add_argument("--steps-per-round", type=int, default=S,
                   help="student steps between synthesis rounds (default: the schedule's)")
    p.add_argument("--eval-points", type=int, default=S)
    _accel(p)
    _common(p)

    p = sub.add_parser("synthesize", help="write a transfer set for later distillation")
    _add_model_source(p, "--teacher", "teacher: run directory, .safetensors or state-dict file")
    p.add_argument("--method", default=S)
    p.add_argument("--set", dest="method_options", type=_key_value, action="append", default=S,
                   metavar="KEY=VALUE")
    p.add_argument("--num", type=int, default=S, help="number of samples (default 10000)")
    p.add_argument("--out", default=S)
    _accel(p)
    _common(p)

    p = sub.add_parser("bench", help="every method side by side on one suite, with anchors")
    p.add_argument("--suite", required=True, choices=SUITE_NAMES)
    p.add_argument("--methods", default=S, help="all (default), default, or names like "
                   "deepinv,noise; NAME[key=value;...] adds a variant with its own options "
                   "(a row of its own); the real-data anchors kd_real and scratch_real always run")
    p.add_argument("--budget", default=S, help="per method and seed (default: the suite's: "
                   "60s for digits, 5m for mnist, 10m for mnist-mlp and cifar10-r20, 30m for "
                   "cifar10-r56)")
    p.add_argument("--seeds", type=int, default=S, help="seeds 0..N-1 (default 3)")
    p.add_argument("--out", default=S)
    p.add_argument("--data-root", default=S, help="the suite dataset's files (not for digits)")
    p.add_argument("--teacher-epochs", type=int, default=S)
    p.add_argument("--teacher-cache", default=S,
                   help="where trained suite teachers are kept (default ~/.cache/dfkd/teachers)")
    p.add_argument("--models-root", default=S, help="where the published teachers of the "
                   "cifar10-r20/-r56 suites are (default $DFKD_MODELS or ~/.cache/dfkd/models)")
    p.add_argument("--set", dest="method_options", type=_key_value, action="append", default=S,
                   metavar="METHOD.KEY=VALUE", help="a method option, e.g. --set deepinv.steps=100")
    p.add_argument("--loss", default=S, metavar="{kd,l1,at,fa,crd}",
                   help="the student's loss for every data-free method (default: each method's "
                   "own); the anchors keep theirs")
    p.add_argument("--student-init", choices=STUDENT_INITS, default=S,
                   help="where every student starts, the kd_real anchor's too: auto (default), "
                   "teacher or random (scratch_real always starts random)")
    p.add_argument("--schedule", choices=SCHEDULES, default=S,
                   help="transfer-set rounds of every method: planned by cost (default) or fixed")
    p.add_argument("--eval-points", type=int, default=S)
    p.add_argument("--device", default=S)
    p.add_argument("--steps", type=int, default=3, help="throughput: optimization steps timed")
    p.add_argument("--batch-size", type=int, default=256, help="throughput: images per batch")
    p.add_argument("--compile", action="store_true", help="throughput: also time torch.compile "
                   "(CUDA)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--config", help="YAML config (a benchmark's bench.yaml); flags override it")

    p = sub.add_parser("quantize", help="an integer model from a float one, calibrated without "
                       "data (torchao)")
    _add_model_source(p, "--model", "model: run directory, .safetensors or state-dict file")
    p.add_argument("--calibration", default=S, help="comma-separated sources, the first one is "
                   "exported: gaussian, inception, bns (default), mixmix, any transfer-set "
                   "method (deepinv, mvn, ...), real (the anchor; added as a row when the "
                   "training files load)")
    p.add_argument("--scheme", default=S, choices=("int8-static", "int8-dynamic", "int4-weight"))
    p.add_argument("--finetune", default=S, choices=("none", "kd", "fa"),
                   help="quantization-aware fine-tuning on the calibration set, the float model "
                   "teaching: kd, or fa (KD + feature affinity, FAQD); default none")
    p.add_argument("--finetune-steps", type=int, default=S)
    p.add_argument("--finetune-lr", type=float, default=S)
    p.add_argument("--calibration-size", type=int, default=S, help="inputs per source (512)")
    p.add_argument("--extra-teachers", default=S, help="mixmix: comma-separated models inverted "
                   "together with --model")
    p.add_argument("--set", dest="method_options", type=_key_value, action="append", default=S,
                   metavar="[SOURCE.]KEY=VALUE", help="an option of the synthesis methods "
                   "behind the calibration: KEY for every source, SOURCE.KEY for one, e.g. "
                   "--set bns.steps=100")
    p.add_argument("--eval-dataset", default=S, help="report-only evaluation data (default: "
                   "the dataset the model records)")
    p.add_argument("--data-root", default=S)
    p.add_argument("--out", default=S)
    p.add_argument("--latency-batch", type=int, default=S)
    p.add_argument("--compile", action="store_true", default=S,
                   help="time latency under torch.compile (inductor lowers int8 to oneDNN)")
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--device", default=S)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--config", help="YAML config (a run's config.yaml); flags override it")

    p = sub.add_parser("fed", help="federated learning with data-free distillation on Flower "
                       "(FedAvg, FedProx, FedGen, FedFTG, FedD2S)")
    p.add_argument("--dataset", default=S, help="digits (default), mnist, fashion-mnist")
    p.add_argument("--data-root", default=S)
    p.add_argument("--model", default=S, help="zoo model (default lenet5 for mnist, "
                   "digits_cnn_quarter for digits)")
    p.add_argument("--clients", type=int, default=S, help="number of clients (10)")
    p.add_argument("--alpha", type=float, default=S, help="Dirichlet concentration of the label "
                   "split (0.1: each client holds one or two classes)")
    p.add_argument("--algo", dest="algos", default=S, help="comma-separated: fedavg, fedprox, "
                   "fedgen, fedftg, fedd2s (default all)")
    p.add_argument("--rounds", type=int, default=S)
    p.add_argument("--fraction", type=float, default=S, help="share of clients per round (0.5)")
    p.add_argument("--seeds", type=int, default=S, help="seeds 0..S-1 (split and initialisation)")
    p.add_argument("--local-steps", type=int, default=S, help="client SGD steps per round (20)")
    p.add_argument("--batch-size", type=int, default=S)
    p.add_argument("--lr", type=float, default=S, help="client SGD learning rate (0.01)")
    p.add_argument("--momentum", type=float, default=S, help="client SGD momentum (0: plain SGD, "
                   "as FedGen's authors)")
    p.add_argument("--superlink", default=S, help="HOST:PORT of a deployed SuperLink (default: "
                   "Flower's simulation engine)")
    p.add_argument("--out", default=S)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--config", help="YAML config (a run's config.yaml); flags override it")

    p = sub.add_parser("evaluate", help="accuracy of a model on a labelled split")
    _add_model_source(p, "--model", "model: run directory, .safetensors or state-dict file")
    p.add_argument("--dataset", default=None, help="default: the dataset the model records")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--teacher", default=None, help="also report agreement with this teacher")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _config(cls, args, flags: dict):
    """A config from --config (if any), then the flags the user actually gave."""
    from dfkd.config import load_config

    cfg = load_config(cls, args.config) if getattr(args, "config", None) else cls()
    return dataclasses.replace(cfg, **flags)


def _flags(args, cls) -> dict:
    """The options the user gave that are fields of the config dataclass `cls`: a flag's dest is
    its field's name, and a flag left out is absent (SUPPRESS), so no list repeats the names."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def _with_teacher(args, flags: dict) -> dict:
    """Add the teacher source and any --set method options to a command's config flags."""
    flags["teacher"] = _teacher_args(args, "teacher")
    if hasattr(args, "method_options"):
        flags["method_options"] = dict(args.method_options)
    for name in ("loss_options", "update_options"):
        if hasattr(args, name):
            flags[name] = dict(getattr(args, name))
    return flags


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    command = "dfkd " + shlex.join(argv)
    progress = not getattr(args, "no_progress", False)
    if args.command == "quickstart":
        from dfkd.commands.quickstart import quickstart

        quickstart(args.out, args.budget, args.seed, progress, args.teacher_epochs)
    elif args.command == "methods":
        from dfkd.config import DistillConfig
        from dfkd.student.update import LRA
        from dfkd.synthesis import list_methods, method_class, methods_markdown

        if args.markdown:
            print(methods_markdown(DistillConfig.method), end="")
            return 0
        for name, doc in list_methods(anchors=True).items():
            mark = "*" if name == DistillConfig.method else " "
            print(f"{name + mark:<13} {method_class(name).family:<13} {doc}")
        print(f"{LRA.name:<13} {'update':<13} {LRA.__doc__.splitlines()[0]} For any online "
              f"method: --update {LRA.name} (bench: METHOD+{LRA.name}).")
        print("\n(*: the default of `dfkd distill`; `dfkd bench --methods default` selects it)")
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

        cfg = _config(DistillConfig, args, _with_teacher(args, _flags(args, DistillConfig)))
        r = distill(cfg, resume=args.resume, progress=progress, command=command)
        print(f"{r['method']}: student {_pct(r['student_acc'])} (teacher "
              f"{_pct(r['teacher_acc'])}) -> {cfg.out}")
    elif args.command == "synthesize":
        from dfkd.commands.synthesize import SynthesizeConfig, synthesize_set

        cfg = _config(SynthesizeConfig, args, _with_teacher(args, _flags(args, SynthesizeConfig)))
        meta = synthesize_set(cfg, resume=args.resume, progress=progress, command=command)
        print(f"{meta['samples']} samples ({meta['method']}) in {meta['seconds']:.1f} s "
              f"-> {cfg.out}")
    elif args.command == "quantize":
        from dfkd.commands.quantize import QuantizeConfig, quantize

        flags = _flags(args, QuantizeConfig)
        flags["model"] = _teacher_args(args, "model")
        if hasattr(args, "method_options"):
            flags["method_options"] = dict(args.method_options)
        cfg = _config(QuantizeConfig, args, flags)
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
                                 batch_size=args.batch_size, compile=args.compile,
                                 progress=progress)
        print(throughput_markdown(records))
        return
    from dfkd.commands.bench import BenchConfig, run_bench

    flags = _flags(args, BenchConfig)
    if hasattr(args, "method_options"):
        bad = [k for k, _ in args.method_options if "." not in k]
        if bad:
            raise DfkdError(f"bench --set takes METHOD.KEY=VALUE (e.g. deepinv.steps=100), got "
                            f"'{bad[0]}'")
        flags["method_options"] = dict(args.method_options)
    cfg = _config(BenchConfig, args, flags)
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
        from dfkd.config import TeacherArgs

        ref = predict_logits(TeacherArgs(path=args.teacher).load(), data.x)
    result = {"dataset": dataset, "split": args.split, "samples": len(data.y),
              **metrics(predict_logits(model, data.x), data.y, ref)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model} on {dataset}/{args.split} ({len(data.y)} images): accuracy "
          f"{100 * result['acc']:.2f}%, ECE {result['ece']:.4f}" +
          (f", agreement with teacher {100 * result['agreement']:.2f}%" if ref is not None else ""))


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
