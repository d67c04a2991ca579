"""Does the trigger surrogate of ABD's self-retrospection find the backdoor of a suite's
poisoned teacher? (docs/backdoor.md)

Self-retrospection unlearns one perturbation delta, the one that most changes the teacher's
output on a batch. It can only unlearn the backdoor if delta acts like the trigger: sends the
batch to the attacker's class, and points where the trigger moves the pixels. This computes
delta as the defence does (`ABD.trigger_surrogate`, Adam at lr 0.1 for `--steps` steps) on a
batch of the suite's clean test images, and reports where the teacher sends the perturbed batch
and the cosine between delta and the trigger's mean displacement (stamped minus clean pixels,
averaged over the batch). The images only probe the premise; no run trains on them. The
poisoned teacher is the bench's (`dfkd bench --poison`, cached), as in vaccine_detection.py.

    python benchmarks/trigger_surrogate.py --suite digits --poison badnets:target=0
"""

from __future__ import annotations

import torch
from poisoned_suite import parser, poisoned_suite

from dfkd.student.defense import ABD, ABDOptions


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", default="10,50")
    args = ap.parse_args()
    teacher, data, trigger = poisoned_suite(args)
    x = data.x[torch.randperm(len(data.x), generator=torch.Generator().manual_seed(args.seed))
               [:args.batch]]
    displacement = (trigger.stamp(x) - x).mean(0).flatten()
    k = teacher.spec.num_classes
    print(f"{args.suite}, {args.poison}, {len(x)} clean test images")
    print("| surrogate steps | delta's largest pixel change | to the target class | "
          "to its most frequent class | cosine with the trigger's displacement |")
    print("|---|---|---|---|---|")
    for steps in map(int, args.steps.split(",")):
        abd = ABD(ABDOptions(sr_steps=steps), teacher, seed=args.seed)
        delta = abd.trigger_surrogate(teacher, x) * abd.pixel_scale(x)  # in pixels
        with torch.no_grad():
            sent = teacher(x + delta).argmax(1)
        counts = torch.bincount(sent, minlength=k)
        top = int(counts.argmax())
        cos = torch.nn.functional.cosine_similarity(delta.flatten(), displacement, dim=0)
        print(f"| {steps} | {delta.abs().max():.2f} | "
              f"{(sent == trigger.target).float().mean():.3f} | "
              f"{top} ({counts[top] / len(x):.3f}) | {cos:.3f} |", flush=True)


if __name__ == "__main__":
    main()
