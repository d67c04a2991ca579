"""Which classes does a teacher decide for db3kd's starting draws? (docs/blackbox.md, db3kd)

db3kd keeps a noise draw as a starting point where the teacher decides the class the slot wants,
so a class the teacher never decides for noise never enters the transfer set. This counts the
teacher's decisions over `--draws` draws of each kind: the reference's noise, blobs (what
`noise=mixed` adds), and the mixture db3kd draws by default. It asks the teacher's weights
directly: the count is what a top-1 API would answer.

    python benchmarks/starting_noise.py \\
        --teacher ~/.cache/dfkd/teachers/mnist-lenet5-seed0-611ad0e20c
"""

from __future__ import annotations

import argparse

import torch

from dfkd.models.classifier import load_classifier
from dfkd.synthesis.db3kd import DB3KD, blobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="a weights file or a run folder")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--draws", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    teacher = load_classifier(args.teacher, arch=args.arch).eval().requires_grad_(False)
    k = teacher.spec.num_classes
    print(f"{args.draws} draws each; the teacher's decisions per class 0..{k - 1}")
    for noise in ("reference", "blobs", "mixed"):
        synth = DB3KD(teacher, DB3KD.Options(noise="reference" if noise == "blobs" else noise),
                      seed=args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        counts = torch.zeros(k, dtype=torch.long)
        for start in range(0, args.draws, 1000):
            n = min(1000, args.draws - start)
            x = blobs((n, *teacher.spec.shape), gen) if noise == "blobs" else synth.noise(n, gen)
            with torch.no_grad():
                counts += torch.bincount(teacher(x).argmax(1), minlength=k)
        share = counts.float() / args.draws
        print(f"{noise:>9}: {counts.tolist()}  rarest class {int(share.argmin())} at "
              f"{100 * float(share.min()):.2f}%, classes reached {int((counts > 0).sum())}/{k}")


if __name__ == "__main__":
    main()
