"""Would self-retrospection's unlearning remove the backdoor if its surrogate were the trigger?
(docs/backdoor.md)

A student that inherited the backdoor (a finished `dfkd distill` run without a defence, with its
transfer set) trains on for `--steps` steps on that set: KD to the teacher on each batch, plus ABD's
consistency term on a share `--rows` of it, the student's answer on the perturbed rows pulled toward
its own answer on the clean ones (temperature 20). The perturbation is the true trigger (an oracle,
for diagnosis only: the defence never sees the trigger), ABD's dense surrogate
(`ABD.trigger_surrogate`, recomputed every step), the triggers the `nc` defence's search flags on 64
samples of the set (`reversed`, the mask scaled by each `--strengths`), or none (the control: the
same steps without the term). Clean accuracy and ASR on the suite's test images after 100 and
`--steps` steps.

    python benchmarks/unlearning_oracle.py --teacher runs/t-digits-badnets --run runs/abd/none \\
        --dataset digits --poison badnets:target=0
"""

from __future__ import annotations

import argparse

import torch

from dfkd.backdoor import Trigger
from dfkd.evaluate import load_eval_data
from dfkd.losses import kd_loss
from dfkd.models.classifier import load_classifier
from dfkd.student.defense import ABD, ABDOptions
from dfkd.student.trigger_reversal import ReversalOptions, TriggerReversal
from dfkd.synthesis.transfer_set import TransferSet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--run", required=True, help="a finished distill run, its transfer_set kept")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default="")
    ap.add_argument("--poison", default="badnets:target=0")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lrs", default="0.0005,0.01")
    ap.add_argument("--rows", default="0.02,0.5")
    ap.add_argument("--kinds", default="none,trigger,dense,reversed")
    ap.add_argument("--strengths", default="1,3")
    args = ap.parse_args()
    teacher = load_classifier(args.teacher).eval().requires_grad_(False)
    pool = TransferSet.open(f"{args.run}/transfer_set").tensors()["x"].float()
    data = load_eval_data(args.dataset, teacher, args.data_root or None)
    trigger = Trigger.parse(args.poison)
    others = data.y != trigger.target

    def measure(student) -> tuple[float, float]:
        student.eval()
        with torch.no_grad():
            acc = student(data.x).argmax(1).eq(data.y).float().mean().item()
            asr = student(trigger.stamp(data.x[others])).argmax(1).eq(trigger.target)
        return round(100 * acc, 2), round(100 * asr.float().mean().item(), 2)

    print(f"{len(pool)} stored samples; the student before: clean acc, ASR "
          f"{measure(load_classifier(args.run))}")
    found = []
    if "reversed" in args.kinds:
        search = TriggerReversal(ReversalOptions(), teacher)
        search.search(pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))])
        found = search.flagged()
        print("reversed triggers flagged:", [(r.shape, cls, round(float(r.sizes[cls]), 4))
                                             for r, cls in found])
    kinds = [k for k in args.kinds.split(",") if k != "reversed" or found]
    kinds = [f"{k}x{s}" if k == "reversed" else k for k in kinds
             for s in (args.strengths.split(",") if k == "reversed" else [""])]
    print("| perturbation | student lr | rows | after 100 steps: acc, ASR | "
          f"after {args.steps}: acc, ASR |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        for lr in map(float, args.lrs.split(",")):
            for rows in map(float, args.rows.split(",")):
                torch.manual_seed(0)
                student = load_classifier(args.run)
                opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9)
                abd = ABD(ABDOptions(), teacher, 0)
                after = []
                for step in range(1, args.steps + 1):
                    x = pool[torch.randint(len(pool), (128,))]
                    k = max(1, int(rows * len(x)))
                    with torch.no_grad():
                        target = teacher(x)
                        own = student.eval()(x[:k])
                    loss = kd_loss(student.train()(x), target, 4.0)
                    if kind.startswith("reversed"):
                        r, cls = found[step % len(found)]
                        moved = r.stamp(x[:k], cls, float(kind.partition("x")[2]))
                    elif kind == "trigger":
                        moved = trigger.stamp(x[:k])
                    elif kind == "dense":
                        moved = x[:k] + abd.trigger_surrogate(teacher, x) * abd.pixel_scale(x)
                    if kind != "none":
                        loss = loss + kd_loss(student(moved), own, 20.0)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if step in (100, args.steps):
                        after.append(measure(student))
                print(f"| {kind} | {lr:g} | {rows:g} | {after[0]} | {after[-1]} |", flush=True)


if __name__ == "__main__":
    main()
