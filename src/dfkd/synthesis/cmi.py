"""CMI, contrastive model inversion (Fang et al., IJCAI 2021): inversion that is told to be diverse.

Each round builds a fresh generator G (weights N(0, 0.02)) and a learnable latent batch z, and
optimizes both jointly with Adam on

    bn * BN(x) + oh * CE(T(x), y) + adv * (-KL(p_T || p_S) on the samples where S and T agree)
    + cr * InfoNCE,

where x = G(z) seen through a *global view* (a random crop with black padding). The InfoNCE term
is what CMI adds: an instance's embedding (the per-instance channel means of the inputs of every
teacher BatchNorm, concatenated, through a 2-layer MLP head and L2-normalized) must be closer
for a *local view* of the same image (a random resized crop) than for any other image of the
batch or of the memory bank of earlier rounds. Mode-collapsed or repeated samples cannot tell
themselves apart, so the loss pushes them apart. The head is trained alongside (its own Adam),
and lives across rounds, like the bank. The batch with the lowest loss of the round is kept, its
features go into the bank, and the student trains by KD at T = 20 on everything kept.

Choices the paper leaves open, or this toolkit makes differently:
- G is the toolkit's generator (generators.py): its last layer is a non-affine BatchNorm, so it
  writes in the teacher's normalized input space; values are clamped to the [0, 1] pixel range
  in the forward pass with the gradient passed straight through (the stored image is what the
  teacher saw, and clamped pixels can still be pulled back). The reference ends in a sigmoid.
- Views stay differentiable and on the device (one affine grid per view): the global view is a
  shift by up to `crop_padding` pixels (-1: 1/8 of the side, the paper's 4 px at 32 px) filled
  with black; the local view crops a random 25-100% of the area at aspect 3/4-4/3 and resizes it
  back. Flips follow deepinv's `flip` rule (off for digit-like data).
- The adversarial KL is at temperature 1 and averaged over the whole batch (disagreeing samples
  count as zeros), as in the reference.
- Every BatchNorm (1d, 2d, 3d) of the teacher feeds both the BN prior and the features; a
  teacher without BatchNorm is refused unless bn_weight=0 and cr_weight=0.
- Memory bank: a FIFO ring of at most `bank_size` rows (paper: 40,960): once full, each round's
  rows overwrite the oldest. Its rows are raw features (local and global view side by side) and
  are re-projected by the current head at every step, so they follow the head as it trains.
  Memory: bank_size x 2 x feature_dim floats at most (115 MB for digits_cnn's 352 features at
  the paper's cap); the checkpoint holds only the rows filled so far.
- Classes are balanced over the batch (the reference draws them at random).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.data.augment import global_view, local_view
from dfkd.errors import DfkdError
from dfkd.hooks import BNStatsHook, FeatureHook, bn_layers, muted
from dfkd.models.generators import Generator
from dfkd.synthesis.base import (
    Options,
    Synthesizer,
    balanced_targets,
    register_method,
    student_as_judge,
)
from dfkd.synthesis.deepinversion import flip_choice


@dataclass
class CMIOptions(Options):
    batch_size: int = 256  # samples per round, balanced over classes (paper, CIFAR: 256)
    samples_per_class: int = 0  # transfer-set size per class, then synthesis stops (0: the set
    # grows for the whole budget)
    steps: int = 20  # Adam steps per round. Paper: 200 on a GPU; on a 2-core CPU a round of 200
    # outlasts a 60 s budget, and 20 was the best of 10/20/50 on digits (docs/methods.md, cmi)
    lr: float = 1e-3  # Adam learning rate of G, z and the head, betas 0.5/0.999 (paper: 1e-3)
    nz: int = 256  # latent size of G (paper code: 256)
    ngf: int = 64  # width of G (paper code: 64; 32 is cheaper per step on a CPU, and no better
    # on digits)
    bn_weight: float = 1.0  # bn, BatchNorm-statistics prior (paper: 1)
    oh_weight: float = 0.5  # oh, cross-entropy to the round's classes (paper: 0.5-1)
    adv_weight: float = 0.5  # adv, masked adversarial term (paper: 0.5; 0 = off)
    cr_weight: float = 0.8  # cr, InfoNCE term (paper: 0.8; 0 = off)
    cr_temperature: float = 0.1  # InfoNCE temperature (paper: 0.1-0.2)
    head_dim: int = 256  # output size of the projection head (paper code: 256)
    bank_size: int = 40960  # memory bank cap in rows, FIFO (paper: 40,960)
    negatives: int = 4096  # bank rows drawn as extra negatives each step (paper: 4096)
    local_scale: float = 0.25  # smallest area fraction of the local crop (paper code: 0.25)
    crop_padding: int = -1  # global view: random shift with black fill; -1: 1/8 of the side
    # (4 px at 32 px, as the paper)
    flip: str = "auto"  # random horizontal flip of both views: true | false | auto (as deepinv)


def masked_adversarial(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """-KL(p_T || p_S) on the samples where student and teacher pick the same class, zero on the
    others, mean over the whole batch: it drives G toward inputs the student has not yet learned
    to match, without dragging it into regions where the two already disagree (paper, eq. 6)."""
    log_p_t = F.log_softmax(teacher_logits.float(), dim=1)
    log_p_s = F.log_softmax(student_logits.float(), dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    return -(kl * agree).mean()


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float,
             n_current: int) -> torch.Tensor:
    """InfoNCE over L2-normalized rows: row i of `query` (local view) must pick row i of `key`
    (global view of the same image) among all keys. Keys are targets (no gradient). The first
    `n_current` rows are this batch, the rest come from the bank: each part is averaged on its
    own and the two added, so a large bank does not shrink the gradient that reaches G."""
    logits = query @ key.detach().t() / temperature
    loss = F.cross_entropy(logits, torch.arange(len(query), device=query.device), reduction="none")
    current = loss[:n_current].mean()
    return current + loss[n_current:].mean() if len(query) > n_current else current


def instance_means(x: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (N, C): each instance's mean per channel (a BatchNorm1d input is already
    (N, C))."""
    return x.float().flatten(2).mean(2) if x.ndim > 2 else x.float()


class MemoryBank:
    """Past feature rows for negatives: a FIFO ring capped at `size` rows (the oldest are
    overwritten first), so memory stays bounded however long the run."""

    def __init__(self, size: int, dim: int, device: torch.device):
        self.size, self.dim = size, dim
        self.data = torch.zeros((0, dim), device=device)
        self.next = 0  # row overwritten next once the bank is full (the oldest)

    def __len__(self) -> int:
        return len(self.data)

    def add(self, rows: torch.Tensor) -> None:
        if self.size == 0:
            return
        rows = rows.detach().float()[-self.size:]  # more rows than the cap: the newest fit
        free = self.size - len(self.data)
        if free > 0:
            self.data = torch.cat([self.data, rows[:free]])
            rows = rows[free:]
        if len(rows):
            where = (self.next + torch.arange(len(rows), device=self.data.device)) % self.size
            self.data[where] = rows
            self.next = (self.next + len(rows)) % self.size

    def sample(self, k: int, gen: torch.Generator) -> torch.Tensor:
        """Up to k distinct rows, drawn uniformly with `gen`."""
        if k <= 0 or not len(self):
            return self.data[:0]
        return self.data[torch.randperm(len(self), generator=gen, device=gen.device)[:k]]

    def state_dict(self) -> dict:
        return {"data": self.data, "next": self.next}

    def load_state_dict(self, state: dict) -> None:
        data = state["data"].to(self.data.device)
        if data.shape[1:] != (self.dim,) or len(data) > self.size:
            raise DfkdError(f"the checkpoint's memory bank is {tuple(data.shape)}, this run's is "
                            f"at most ({self.size}, {self.dim}); resume with the same options")
        self.data, self.next = data, int(state["next"])


class ProjectionHead(nn.Module):
    """Linear -> ReLU -> Linear -> L2 normalize: the embedding the InfoNCE compares."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(), nn.Linear(dim_in, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.body(x), dim=1)


@register_method
class CMI(Synthesizer):
    """CMI (Fang 2021): a fresh generator per round, with a contrastive term for diversity."""

    name = "cmi"
    family = "transfer_set"
    Options = CMIOptions
    temperature = 20.0

    def __init__(self, teacher, options, seed):
        super().__init__(teacher, options, seed)
        o = options
        _check(o)
        c, h, w = teacher.spec.shape
        if h != w or h % 4:
            raise DfkdError(f"cmi's generator makes square images with a side divisible by 4; "
                            f"the teacher expects {h}x{w}")
        layers = bn_layers(teacher.net)
        if not layers and (o.bn_weight > 0 or o.cr_weight > 0):
            raise DfkdError("cmi reads the teacher's BatchNorm layers (BN prior and contrastive "
                            "features) but the teacher has none; set bn_weight=0 and cr_weight=0, "
                            "or choose a method without them")
        self.bn_hooks = [BNStatsHook(m) for m in layers] if o.bn_weight > 0 else []
        self.feature_hooks = [FeatureHook(m, capture="input") for m in layers] \
            if o.cr_weight > 0 else []
        self.feature_dim = sum(m.num_features for m in layers)
        self.padding = o.crop_padding if o.crop_padding >= 0 else max(1, h // 8)
        self.flip = flip_choice(o.flip, teacher.spec.dataset)
        self.black = teacher.normalize(torch.zeros(1, device=self.device))
        init = torch.Generator(self.device).manual_seed(self.batch_seed(-1))
        self.head = _build(lambda: ProjectionHead(max(self.feature_dim, 1), o.head_dim),
                           self.device, init)
        self.head_opt = torch.optim.Adam(self.head.parameters(), lr=o.lr, betas=(0.5, 0.999))
        self.bank = MemoryBank(o.bank_size, 2 * self.feature_dim, self.device)

    def synthesize(self, student, index):
        o, t = self.opts, self.teacher
        gen = self.rng(index)
        y = balanced_targets(o.batch_size, t.spec.num_classes, gen)
        c, side = t.spec.shape[0], t.spec.shape[1]
        net = _build(lambda: Generator(o.nz, c, o.ngf, side), self.device, gen)
        z = torch.randn((o.batch_size, o.nz), generator=gen, device=self.device)
        z.requires_grad_(True)
        opt = torch.optim.Adam([{"params": net.parameters()}, {"params": [z]}], lr=o.lr,
                               betas=(0.5, 0.999))
        adversary = student if o.adv_weight > 0 else None
        best_loss, best_x, best_features = math.inf, None, None
        with student_as_judge(adversary):
            for _ in range(o.steps):
                if self.should_stop():
                    break
                x = self.in_pixel_range(net(z))
                loss, features = self.loss(x, y, adversary, gen)
                if loss.item() < best_loss:  # x and its features before this step's update
                    best_loss, best_x, best_features = loss.item(), x.detach(), features
                opt.zero_grad(set_to_none=True)
                self.head_opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if self.feature_hooks:
                    self.head_opt.step()
                self.teacher_passes += o.batch_size * (2 if self.feature_hooks else 1)
        if best_x is None:  # stopped before the first step: G's first output
            with torch.no_grad():
                best_x = self.in_pixel_range(net(z))
        if best_features is not None:
            self.bank.add(best_features)
        x = self.stored_pixels(best_x)
        return {"x": x, "target_logits": self.label(x), "classes": y,
                "seeds": self.seeds(index, o.batch_size)}

    def loss(self, x: torch.Tensor, y: torch.Tensor, adversary, gen: torch.Generator):
        """The round's objective on x (normalized space), and the detached [local | global]
        features that go into the bank if this x is kept (None without the InfoNCE term)."""
        o, net = self.opts, self.teacher.net
        seen = global_view(x, gen, self.padding, self.flip, self.black)
        logits = net(seen)
        loss = o.oh_weight * F.cross_entropy(logits, y)
        if self.bn_hooks:
            loss = loss + o.bn_weight * sum(h.loss for h in self.bn_hooks)
        if adversary is not None:
            loss = loss + o.adv_weight * masked_adversarial(adversary.net(seen), logits)
        if not self.feature_hooks:
            return loss, None
        global_features = self._features()
        with muted(self.bn_hooks):  # the BN prior reads the global view only
            net(local_view(x, gen, o.local_scale, self.flip))
        local_features = self._features()
        cached = self.bank.sample(o.negatives, gen)
        cached_local, cached_global = cached.chunk(2, dim=1)
        query = self.head(torch.cat([local_features, cached_local]))
        key = self.head(torch.cat([global_features, cached_global]))
        loss = loss + o.cr_weight * info_nce(query, key, o.cr_temperature, len(x))
        return loss, torch.cat([local_features, global_features], 1).detach()

    def _features(self) -> torch.Tensor:
        return torch.cat([instance_means(h.value) for h in self.feature_hooks], 1)

    def report(self) -> dict:
        return {"feature_dim": self.feature_dim, "bank_entries": len(self.bank)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "head": self.head.state_dict(),
                "head_opt": self.head_opt.state_dict(), "bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.head.load_state_dict(state["head"])
        self.head_opt.load_state_dict(state["head_opt"])
        self.bank.load_state_dict(state["bank"])


def _build(make, device: torch.device, gen: torch.Generator) -> nn.Module:
    """A module whose weights come from `gen` alone, never from the global RNG (built on the
    meta device, then initialized): linear and conv weights N(0, 0.02), BatchNorm scales
    N(1, 0.02), biases 0, as the reference initializes G (the head gets the same)."""
    with torch.device("meta"):
        module = make()
    module = module.to_empty(device=device)
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, 0.0, 0.02, generator=gen)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            if m.affine:
                nn.init.normal_(m.weight, 1.0, 0.02, generator=gen)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    return module


def _check(o: CMIOptions) -> None:
    if o.batch_size < 2 or o.steps < 0:
        raise DfkdError(f"cmi needs batch_size >= 2 (G has BatchNorm) and steps >= 0, got "
                        f"{o.batch_size}, {o.steps}")
    if min(o.nz, o.ngf, o.head_dim) < 1 or o.bank_size < 0 or o.negatives < 0:
        raise DfkdError("cmi needs nz, ngf, head_dim >= 1 and bank_size, negatives >= 0")
    if o.cr_temperature <= 0 or not 0 < o.local_scale <= 1:
        raise DfkdError(f"cmi needs cr_temperature > 0 and 0 < local_scale <= 1, got "
                        f"{o.cr_temperature}, {o.local_scale}")
    if min(o.bn_weight, o.oh_weight, o.adv_weight, o.cr_weight) < 0:
        raise DfkdError("cmi's loss weights (bn, oh, adv, cr) must be >= 0")
