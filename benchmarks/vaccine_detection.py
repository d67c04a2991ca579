"""Does ABD's shuffling vaccine tell triggered inputs from clean ones, for a suite's poisoned
teacher? (docs/backdoor.md; the authors check the same with `compare_shuffle`.)

The vaccine's premise: copies of a backdoored teacher whose last convolutions read their input
channels in a random order lose their clean accuracy but keep the trigger's response, so they
agree with the teacher more often, and diverge from it less, on triggered inputs than on clean
ones. This measures both on the suite's test images (clean) and the same images stamped with the
trigger (non-target classes only), for several numbers of shuffled layers. AUC: the chance that a
triggered image's divergence is below a clean image's (1: the vaccine separates them, 0.5: it
cannot, below 0.5: it flags the wrong ones). The poisoned teacher is the bench's (trained or
fine-tuned once and cached, as `dfkd bench --poison` does).

    python benchmarks/vaccine_detection.py --suite mnist --poison badnets:target=0 \\
        --data-root ../shared/data/mnist
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from poisoned_suite import parser, poisoned_suite

from dfkd.student.defense import ABD, ABDOptions


def divergence(shuffled: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_shuffled) per sample, the authors' `divergence`."""
    return F.kl_div(F.log_softmax(shuffled, 1), F.softmax(teacher, 1), reduction="none").sum(1)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--layers", default="1,3,5,9")
    args = ap.parse_args()
    teacher, data, trigger = poisoned_suite(args)
    x, y = data.x, data.y
    stamped = trigger.stamp(x[y != trigger.target])
    with torch.no_grad():
        t_clean, t_stamped = teacher(x), teacher(stamped)
    acc = t_clean.argmax(1).eq(y).float().mean()
    asr = t_stamped.argmax(1).eq(trigger.target).float().mean()
    print(f"{args.suite}, {args.poison}: teacher acc {acc:.4f}, ASR {asr:.4f}")
    print("| layers | shuffled copies' clean acc | suspect share, clean | suspect share, "
          "triggered | KL clean | KL triggered | AUC |")
    print("|---|---|---|---|---|---|---|")
    for layers in map(int, args.layers.split(",")):
        abd = ABD(ABDOptions(layers=layers), teacher, seed=args.seed)
        with torch.no_grad():
            s_clean = torch.stack([m(x) for m in abd.shuffled]).mean(0)
            s_stamped = torch.stack([m(stamped) for m in abd.shuffled]).mean(0)
        kl_clean, kl_stamped = divergence(s_clean, t_clean), divergence(s_stamped, t_stamped)
        auc = (kl_stamped.view(-1, 1) < kl_clean.view(1, -1)).float().mean().item()
        agree = lambda s, t: s.argmax(1).eq(t.argmax(1)).float().mean().item()  # noqa: E731
        print(f"| {layers} | {s_clean.argmax(1).eq(y).float().mean():.3f} | "
              f"{agree(s_clean, t_clean):.3f} | {agree(s_stamped, t_stamped):.3f} | "
              f"{kl_clean.mean():.3f} | {kl_stamped.mean():.3f} | {auc:.3f} |", flush=True)


if __name__ == "__main__":
    main()
