"""Do mvn's class centres reach their classes on the published CIFAR ResNets? (no inversion)

For each teacher and each source of the modeled layer's centre (`mean`), fits mvn's feature space
once (seed 0, default options) and prints the teacher's probability of class k at the centre c_k
(min and mean over the classes), how many centres the teacher assigns to another class (the
mismatch of draws at sigma -> 0), and `label_mismatch` of 2,000 draws at the default sigma.

    python benchmarks/mvn_class_centres.py --models-root ../shared/models/cifar10
"""

import argparse

import torch

from dfkd.commands.suites import SUITES
from dfkd.models.classifier import load_classifier
from dfkd.synthesis import create_synthesizer
from dfkd.synthesis.base import balanced_targets
from dfkd.synthesis.mvn import MVNOptions

TEACHERS = [SUITES[name] for name in ("cifar10-r20", "cifar10-r56")]  # their published files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-root", default="../shared/models/cifar10")
    args = parser.parse_args()
    for suite in TEACHERS:
        pub, arch = suite.published, suite.teacher
        teacher = load_classifier(f"{args.models_root}/{pub.file}", arch=arch, mean=pub.mean,
                                  std=pub.std)
        teacher = teacher.eval().requires_grad_(False)
        k = teacher.spec.num_classes
        for mean in ("auto", "bootstrap"):
            synth = create_synthesizer("mvn", teacher, {"mean": mean}, 0)
            with torch.no_grad():
                probs = synth.space.rest(synth._activate(synth.class_centers)).softmax(1)
            p, wrong = probs.diagonal(), int((probs.argmax(1) != torch.arange(k)).sum())
            gen = torch.Generator().manual_seed(1)
            synth.sampled_features(balanced_targets(2000, k, gen), gen)
            print(f"{arch} mean={mean} (source {synth.mean_source}): p(k) at c_k min "
                  f"{p.min():.3f} mean {p.mean():.3f}; centres of another class {wrong}/{k}; "
                  f"label_mismatch {synth.report()['label_mismatch']:.3f} at the default sigma "
                  f"{MVNOptions.sigma}", flush=True)


if __name__ == "__main__":
    main()
