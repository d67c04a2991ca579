"""The poisoned teacher of a bench suite, for the scripts that probe ABD's premises: the
command-line options they share, and the teacher (trained or fine-tuned once and cached, as
`dfkd bench --poison` does) with the suite's test images and the trigger."""

from __future__ import annotations

import argparse

from dfkd.backdoor import Trigger
from dfkd.commands.bench import SUITES, BenchConfig, published_teacher, suite_teacher
from dfkd.evaluate import EvalData, load_eval_data
from dfkd.models.classifier import Classifier


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--suite", default="digits", choices=sorted(SUITES))
    ap.add_argument("--poison", default="badnets:target=0")
    ap.add_argument("--data-root", default="")
    ap.add_argument("--models-root", default="../shared/models/cifar10")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def poisoned_suite(args: argparse.Namespace) -> tuple[Classifier, EvalData, Trigger]:
    """The suite's poisoned teacher of `args.seed` (frozen), its test images and the trigger."""
    suite = SUITES[args.suite]
    cfg = BenchConfig(suite=args.suite, poison=args.poison, data_root=args.data_root,
                      models_root=args.models_root)
    published = published_teacher(cfg, suite) if suite.published else None
    teacher = suite_teacher(cfg, suite, args.seed, False, published).load()
    teacher = teacher.eval().requires_grad_(False)
    data = load_eval_data(suite.dataset, teacher, args.data_root or None)
    return teacher, data, Trigger.parse(args.poison)
