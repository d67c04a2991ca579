"""Does trigger reversal (the `nc` defence's search) flag the backdoor target of a suite's
poisoned teacher, and is what it finds the trigger? (docs/backdoor.md)

For every class, the smallest patch and the smallest blend that send a batch to that class are
searched as the defence searches them (`dfkd.student.trigger_reversal.reverse`), on a batch of the
suite's test images (the premise, with the best inputs there are), of uniform noise (a worst case
for synthetic samples), or of a run's stored transfer set (`--inputs set --set DIR`, what the
defence sees), from a first mask of `--mask-start` per pixel. Reported per shape: the target's size
and its anomaly index, the classes flagged, and for a patch trigger the share of the target's patch
mask that lies on the trigger's pixels. The images only probe; no run trains on them. The poisoned
teacher is the bench's (`dfkd bench --poison`, cached), as in vaccine_detection.py.

    python benchmarks/trigger_reversal.py --suite mnist --poison badnets:target=0 \\
        --data-root DATA
"""

from __future__ import annotations

import torch
from poisoned_suite import parser, poisoned_suite

from dfkd.student.trigger_reversal import SHAPES, ReversalOptions, reverse
from dfkd.synthesis.transfer_set import TransferSet


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--inputs", default="test,noise", help="test, noise and/or set")
    ap.add_argument("--set", default="", help="a transfer_set folder, for --inputs set")
    ap.add_argument("--mask-start", type=float, default=0.5)
    args = ap.parse_args()
    teacher, data, trigger = poisoned_suite(args)
    gen = torch.Generator().manual_seed(args.seed)
    test = data.x[torch.randperm(len(data.x), generator=gen)[:args.samples]]
    trigger_mask, _ = trigger.pattern(tuple(test.shape[1:]))
    opts = ReversalOptions(samples=args.samples, steps=args.steps)
    print(f"{args.suite}, {args.poison}, {args.samples} images, {args.steps} steps, first mask "
          f"{args.mask_start}")
    print("| inputs | shape | target's size | median size | target's anomaly | flagged | "
          "patch mask on the trigger's pixels |")
    print("|---|---|---|---|---|---|---|")
    for source in args.inputs.split(","):
        if source == "set":
            pool = TransferSet.open(args.set).tensors()["x"].float()
            x = pool[torch.randperm(len(pool), generator=gen)[:args.samples]]
        else:
            x = test if source == "test" else torch.rand(test.shape, generator=gen)
        for shape in SHAPES:
            found = reverse(teacher, x, shape, opts, args.mask_start)
            anomaly = found.anomaly()
            flagged = (anomaly > opts.threshold).nonzero().flatten().tolist()
            t = trigger.target
            on_trigger = ""
            if shape == "patch" and trigger.kind == "badnets":
                m = found.masks[t, 0]
                on_trigger = f"{float((m * trigger_mask[0]).sum() / m.sum()):.2f}"
            print(f"| {source} | {shape} | {float(found.sizes[t]):.4f} | "
                  f"{float(found.sizes.clamp(max=1).median()):.4f} | {float(anomaly[t]):.2f} | "
                  f"{flagged} | {on_trigger} |", flush=True)


if __name__ == "__main__":
    main()
