"""What compiling costs when a run's batch size changes from round to round.

A planned run's rounds differ in size (nayer's first round is 400 samples, the re-planned ones
180, 360, 540, ...), and torch.compile specializes on the first batch size it sees, then builds
a dynamic-shape graph at the second. This times an inversion step (the teacher's forward and
backward to the input) of a zoo architecture at such a sequence of batch sizes, twice per size
(the first call includes any compiling), eager, compiled as dfkd compiles (`static`: torch's
default), or compiled with every dimension dynamic from the start (`dynamic`). Run each mode in
its own process, with a fresh TORCHINDUCTOR_CACHE_DIR to time a first compile:

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/compile_shapes.py --mode static
"""

from __future__ import annotations

import argparse
import time

import torch

from dfkd.models.classifier import InputSpec, new_classifier


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet56a", help="a zoo architecture (`dfkd models`)")
    p.add_argument("--mode", choices=["eager", "static", "dynamic"], required=True)
    p.add_argument("--sizes", default="400,180,360,540,180,400")
    a = p.parse_args()
    torch.manual_seed(0)
    spec = InputSpec((3, 32, 32), (0.5,), (0.5,), 10)
    net = new_classifier(a.arch, spec).net.eval().requires_grad_(False)
    if a.mode != "eager":
        net = torch.compile(net, dynamic=True if a.mode == "dynamic" else None)
    for batch in map(int, a.sizes.split(",")):
        x = torch.randn(batch, *spec.shape, requires_grad=True)
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            net(x).logsumexp(1).sum().backward()
            seconds.append(time.perf_counter() - start)
        print(f"{a.mode} batch {batch}: first call {seconds[0]:.2f} s, second {seconds[1]:.2f} s "
              f"({1000 * seconds[1] / batch:.2f} ms per image)", flush=True)


if __name__ == "__main__":
    main()
