"""Soft-targeted transfer-set synthesis (Wang, AAAI 2021): the project's core method.

Model a hidden layer of the teacher (default: the input of its classifier head) as a
multivariate normal, sample feature vectors from it, push them through the rest of the teacher
to get soft targets, and synthesize inputs whose teacher output matches those targets. Because
the targets come from the teacher's own head, they are consistent with it by construction,
unlike ZSKD's Dirichlet targets in softmax space (see `label_mismatch` in the report).

What the paper states is followed; what it leaves open (no official code) is reconstructed, and
every such choice is an option with its default documented here and in METHODS.md:

- the space: `layer` ("" = the input of the last nn.Linear; a module path = that module's output).
- per-unit centre and scale (`mean`): from the BatchNorm that produces the layer's
  pre-activation (its output is N(beta, gamma^2) per unit), else from the features of a batch of
  noise inputs (`bootstrap`), or zero/unit.
- correlation (`cov`): from the head's weights (cosine similarity of its columns: units that vote
  for the same classes co-vary), the identity scaled per unit (`bn`), or the shrunk covariance of
  the bootstrap features. Sigma = sigma^2 * S R S, repaired to positive semi-definite by
  eigenvalue clipping; a non-finite one is an error.
- classes: each sample is drawn for a class k from N(c_k, Sigma), where the class centre c_k is
  the point near the layer's mean that the rest of the teacher maps to k (a short optimization,
  `center_steps`); ReLU spaces are rectified (`nonneg`).
- synthesis: Adam on the input for tau^2 KL(y || softmax(T(x)/tau)) + lambda_a * (-mean |f(x)|)
  (+ feature_weight * ||f(x) - h||^2/dim, the optional term that matches the sampled vector).

Departure from the paper, by evidence (BENCHMARKS.md, the mvn ablation): the paper's loss alone
gives inputs the teacher labels as asked but that teach a student far less than with image
priors, so by default the DeepInversion priors are added: the BatchNorm-statistics term, a
total-variation term and random jitter. The BN weight is 1, not DeepInversion's 10: at 10 the
prior drowns the soft-target term (the teacher's argmax on x agrees with the drawn class far
less often), for no gain in the student. `bn_weight=0 tv_weight=0 view=none` is the paper's
loss. A teacher without BatchNorm runs without the BN term (`bn_prior: false` in the report)
instead of failing.

`view=affine` (each step the teacher sees every sample rotated, scaled and shifted on its own,
not one roll of the whole batch) makes smooth, centred strokes instead of high-frequency
patterns, but it did not make a better student on the 3-seed bench (BENCHMARKS.md, "Per-sample
affine views"), so the default stays DeepInversion's roll.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfkd.data.augment import INVERSION_VIEWS, inversion_view, jitter_pixels
from dfkd.errors import DfkdError
from dfkd.hooks import bn_layers, bn_stats_hooks
from dfkd.losses import soft_target_loss, total_variation
from dfkd.synthesis.base import (
    CountsLabelMismatch,
    Options,
    Synthesizer,
    balanced_targets,
    register_method,
    require_choice,
)
from dfkd.synthesis.feature_space import FeatureSpace


@dataclass
class MVNOptions(Options):
    layer: str = ""  # modeled layer: "" = input of the classifier head; else a module's output
    cov: str = "bn"  # bn | weights | bootstrap (see the module docstring; bn: lowest mismatch)
    mean: str = "auto"  # auto (bn if a BatchNorm feeds the layer, else bootstrap) | bn |
    # bootstrap | zero
    sigma: float = 1.5  # Sigma = sigma^2 S R S; paper: 1.5 MNIST, 2.0 CIFAR-10 (unverified)
    nonneg: str = "auto"  # relu | none | auto (relu when the layer's features are >= 0)
    center_steps: int = 100  # Adam steps placing the class centres (0: all at the mean)
    center_weight: float = 0.1  # pull of the class centres toward the layer's mean
    temperature: float = 20.0  # tau of the soft targets and the synthesis loss (ZSKD convention)
    lambda_a: float = 0.05  # activation term weight (paper: 0.05 LeNet-5, 0.1 AlexNet)
    feature_weight: float = 0.0  # match f(x) to the sampled feature vector (0 = off)
    bn_weight: float = 1.0  # DeepInversion BN prior (not in the paper; 0 = the paper's loss)
    tv_weight: float = 0.001  # total-variation prior (as DeepInversion; 0 = the paper's loss)
    batch_size: int = 256  # samples per round, balanced over classes
    samples_per_class: int = 0  # transfer-set size per class, then synthesis stops (0: the set
    # grows for the whole budget)
    steps: int = 200  # Adam steps per round
    lr: float = 0.1  # Adam learning rate on normalized pixels
    view: str = "roll"  # what the teacher sees each step: roll (DeepInversion's jitter) |
    # affine (each sample rotated, scaled, shifted on its own) | crop | none; see the docstring
    jitter: int = -1  # shift in pixels per step (-1: 1/16 of the side; 0: off)
    bootstrap_size: int = 512  # noise inputs for bootstrap statistics


def repair_psd(cov: torch.Tensor, what: str = "covariance") -> tuple[torch.Tensor, int]:
    """A symmetric PSD square root factor L (cov ~= L L^T) with negative eigenvalues clipped;
    returns L and how many eigenvalues were clipped. Non-finite input is a one-line error."""
    if not torch.isfinite(cov).all():
        raise DfkdError(f"the {what} has non-finite entries (NaN or inf in the teacher's "
                        "weights or statistics); try cov=bn or mean=zero")
    sym = 0.5 * (cov + cov.t()).double()
    evals, evecs = torch.linalg.eigh(sym)
    clipped = int((evals < 0).sum())
    return (evecs * evals.clamp(min=0).sqrt()).float(), clipped


def shrunk_covariance(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrinkage toward a scaled identity: well-conditioned from few samples."""
    n, d = x.shape
    xc = x - x.mean(0)
    s = xc.t() @ xc / n
    mu = s.trace() / d
    delta = (s - mu * torch.eye(d, device=x.device)).pow(2).sum() / d
    beta = ((xc.pow(2).t() @ xc.pow(2)) / n - s.pow(2)).sum() / (d * n)
    shrink = float((beta / delta).clamp(0, 1)) if delta > 0 else 1.0
    return shrink * mu * torch.eye(d, device=x.device) + (1 - shrink) * s


@register_method
class MVN(CountsLabelMismatch, Synthesizer):
    """MVN (Wang 2021): soft targets sampled in the teacher's feature space, inputs matched."""

    name = "mvn"
    family = "transfer_set"
    Options = MVNOptions
    temperature = 20.0

    def __init__(self, teacher, options, seed):
        super().__init__(teacher, options, seed)
        o = options
        require_choice(o, "cov", ("weights", "bn", "bootstrap"))
        require_choice(o, "mean", ("auto", "bn", "bootstrap", "zero"))
        require_choice(o, "nonneg", ("auto", "relu", "none"))
        require_choice(o, "view", INVERSION_VIEWS)
        if o.sigma <= 0 or o.temperature <= 0:
            raise DfkdError(f"sigma and temperature must be positive, got {o.sigma}, "
                            f"{o.temperature}")
        self.space = FeatureSpace(teacher.net, teacher.spec.shape, o.layer)
        # the BN prior is an extra: a teacher without BatchNorm runs the paper's loss instead
        use_bn = o.bn_weight > 0 and bool(bn_layers(teacher.net))
        self.bn_hooks = bn_stats_hooks(teacher.net, self.name) if use_bn else []
        self.jitter = jitter_pixels(o.jitter, teacher.spec.shape[1])
        self.black = teacher.normalize(torch.zeros(1, device=self.device))
        self._fit(torch.Generator(self.device).manual_seed(self.batch_seed(-1)))

    def _fit(self, gen: torch.Generator) -> None:
        """Centre, scale, correlation and class centres of the modeled space (once)."""
        o, space = self.opts, self.space
        boot = self._bootstrap_features(gen)
        bn = space.batchnorm_before()
        nonneg = o.nonneg == "relu" or (o.nonneg == "auto" and bool((boot >= 0).all()))
        mean_source = ("bn" if bn is not None else "bootstrap") if o.mean == "auto" else o.mean
        if mean_source == "bn" and bn is None:
            raise DfkdError(f"mean=bn needs a BatchNorm with {space.dim} features before the "
                            f"{space.describes}; use mean=bootstrap")
        if mean_source == "bn":  # the pre-activation: BN output is N(beta, gamma^2) per unit
            center, scale = bn.bias.detach().float(), bn.weight.detach().float().abs()
        elif mean_source == "bootstrap":
            center, scale = boot.mean(0), boot.std(0)
        else:
            center = torch.zeros(space.dim, device=self.device)
            scale = torch.ones(space.dim, device=self.device)
        scale = scale.clamp(min=1e-3 * float(scale.max().clamp(min=1e-6)))
        if o.cov == "weights":
            corr = space.weight_correlation().to(self.device)
        elif o.cov == "bn":
            corr = torch.eye(space.dim, device=self.device)
        else:
            cov = shrunk_covariance(boot)
            sd = cov.diagonal().clamp(min=1e-12).sqrt()
            corr = cov / (sd[:, None] * sd[None, :])
        cov = o.sigma**2 * scale[:, None] * corr * scale[None, :]
        self.factor, self.clipped_eigenvalues = repair_psd(cov)
        self.nonneg, self.mean_source = nonneg, mean_source
        self.class_centers = self._class_centers(center, scale)

    @torch.no_grad()
    def _bootstrap_features(self, gen: torch.Generator) -> torch.Tensor:
        """The modeled layer's features on Gaussian inputs (normalized space)."""
        n = self.opts.bootstrap_size
        z = torch.randn((n, *self.teacher.spec.shape), generator=gen, device=self.device)
        self.teacher.net(z)
        self.teacher_passes += n
        return self.space.features().float()

    def _activate(self, u: torch.Tensor) -> torch.Tensor:
        return F.relu(u) if self.nonneg else u

    def _class_centers(self, center: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """c_k: the point near the centre that the rest of the teacher maps to class k, found by
        minimizing CE(rest(c_k), k) + w * ||(c_k - centre) / scale||^2 / dim."""
        k = self.teacher.spec.num_classes
        c = center.repeat(k, 1).clone().requires_grad_(True)
        if self.opts.center_steps <= 0:
            return c.detach()
        y = torch.arange(k, device=self.device)
        opt = torch.optim.Adam([c], lr=0.1)
        for _ in range(self.opts.center_steps):
            opt.zero_grad(set_to_none=True)
            ce = F.cross_entropy(self.space.rest(self._activate(c)), y)
            pull = ((c - center) / scale).pow(2).sum(1).mean() / self.space.dim
            (ce + self.opts.center_weight * pull).backward()
            opt.step()
        self.teacher_passes += k * self.opts.center_steps
        return c.detach()

    @torch.no_grad()
    def sampled_features(self, y: torch.Tensor, gen: torch.Generator):
        """Feature vectors h drawn for classes y, and the teacher's logits for them."""
        eps = torch.randn((len(y), self.factor.shape[1]), generator=gen, device=self.device)
        h = self._activate(self.class_centers[y] + eps @ self.factor.t())
        logits = self.space.rest(h).float()
        self.teacher_passes += len(y)
        self.count_mismatch(logits, y)
        return h, logits

    def synthesize(self, student, index):
        o, t = self.opts, self.teacher
        gen = self.rng(index)
        y = balanced_targets(o.batch_size, t.spec.num_classes, gen)
        h, target_logits = self.sampled_features(y, gen)
        target = F.softmax(target_logits / o.temperature, dim=1)
        z = torch.randn((o.batch_size, *t.spec.shape), generator=gen, device=self.device)
        z.requires_grad_(True)
        opt = torch.optim.Adam([z], lr=o.lr, betas=(0.5, 0.99))
        self.invert(z, opt, o.steps,
                    lambda: self._loss(inversion_view(z, o.view, self.jitter, gen, self.black),
                                       h, target), o.batch_size)
        return self.inverted_batch(index, z, y)

    def _loss(self, x, h, target) -> torch.Tensor:
        """The synthesis objective on a view x of the batch, for sampled features h and targets."""
        o = self.opts
        logits = self.teacher.net(x)
        f = self.space.features()
        loss = soft_target_loss(logits, target, o.temperature)
        if o.lambda_a:
            loss = loss - o.lambda_a * f.abs().mean()
        if o.feature_weight:
            loss = loss + o.feature_weight * (f - h).pow(2).sum(1).mean() / f.shape[1]
        if self.bn_hooks:
            loss = loss + o.bn_weight * sum(hk.loss for hk in self.bn_hooks)
        if o.tv_weight:
            loss = loss + o.tv_weight * total_variation(x, p=2)
        return loss

    def report(self) -> dict:
        return {**super().report(), "feature_space": self.space.describes,
                "feature_dim": self.space.dim, "mean_source": self.mean_source,
                "nonneg": self.nonneg, "bn_prior": bool(self.bn_hooks),
                "clipped_eigenvalues": self.clipped_eigenvalues}
