"""DFME (Truong, Maini, Walls, Papernot, CVPR 2021, "Data-Free Model Extraction"; code
cake-lab/datafree-model-extraction): a student from a teacher that only answers with
probabilities, with no gradient from it.

As DFAD, a generator G plays against the student: it seeks inputs on which the student's logits
are far (L1) from the teacher's, and the student learns to close the gap on them. A black-box
teacher's logits are recovered from its probabilities (log p less its mean over the classes, the
logits up to the constant a softmax ignores: dfkd.blackbox.teacher.recovered_logits); a white-box
teacher gives its true logits. G cannot backpropagate through a black box, so the gradient of the
disagreement with respect to G's output g is estimated by forward differences along `directions`
random unit vectors u at step `epsilon`, dim/eps * mean_u[(L(g + eps u) - L(g)) u], each
direction one extra query per image. G's output passes through tanh to pixels, (tanh(g) + 1) / 2.

Queries per cycle of one G step and `g_every` student steps: batch_size * (directions + 1 +
g_every) (the paper's cost_per_iteration).

`replay` (4; 0 is the paper's) spends a query budget further: after each fresh batch the student
takes `replay` steps on batches drawn from a memory of the last `memory` answered samples, which
cost no query. Queries per cycle stay the same; the student steps per cycle grow (replay + 1)
times. The memory is part of the checkpoint, so a resumed run replays exactly.

G left to the teacher's answers covers the classes unevenly (a 2M-query mnist run remembered
37% of its samples as 8s and 0.9% as 9s, and its student recognised 76% of the 9s), so two
options aim at balance without a query: `balanced` draws the replayed batches evenly over the
classes the teacher answered, and `diversity` adds to G's loss the negative entropy of the
student's mean answer over G's batch, differentiated through the white-box student (the class
diversity loss of DFMS, Sanyal et al. CVPR 2022, and DisGUIDE, Rosenthal et al. AAAI 2023).

Departures from the reference: the student's learning rate follows the engine's cosine decay
instead of steps at 10/30/50% of the budget, and the G learning rate stays constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfkd.errors import DfkdError
from dfkd.synthesis.base import register_method, require_positive, student_as_judge
from dfkd.synthesis.generative import GeneratorMethod, GeneratorOptions


@dataclass
class DFMEOptions(GeneratorOptions):
    nz: int = 256  # latent size (reference: 256)
    lr_g: float = 1e-4  # Adam learning rate of G (reference: 1e-4)
    g_every: int = 5  # one G step per 5 student steps (paper: n_G = 1, n_S = 5)
    bn_weight: float = 0.0  # no BatchNorm prior: a black box has no BatchNorm to read
    directions: int = 1  # random directions of the gradient estimate (paper: m = 1)
    epsilon: float = 1e-3  # forward-difference step in G's output space (paper: 1e-3)
    replay: int = 4  # student steps on remembered answers per step on a fresh batch (paper: 0;
    # 4: 9-12 points more on the same queries, mnist and digits, docs/blackbox.md)
    memory: int = 65536  # answered samples kept for replay, the oldest dropped first
    balanced: bool = False  # replay draws every class the teacher answered equally often
    diversity: float = 0.0  # weight of G's class-diversity term on the student (DFMS, DisGUIDE)


def forward_difference_gradient(losses: torch.Tensor, u: torch.Tensor, epsilon: float,
                                num_classes: int) -> torch.Tensor:
    """The estimate of d(mean loss)/dg from losses (n, m + 1) at g + eps u_1..u_m and at g
    (last column), u (n, m, *shape) unit directions: dim / eps * mean_m[(L_i - L_0) u_i],
    scaled by 1 / (K n) as in the reference."""
    n, m = u.shape[:2]
    dim = u[0, 0].numel()
    diff = (losses[:, :m] - losses[:, m:]).view(n, m, *([1] * (u.dim() - 2)))
    return dim / epsilon * (diff * u).mean(1) / (num_classes * n)


@register_method
class DFME(GeneratorMethod):
    """DFME (Truong et al., CVPR 2021): DFAD against a black box, with zero-order gradients."""

    name = "dfme"
    Options = DFMEOptions
    temperature = 1.0  # unused by its L1 student loss
    student_loss = "l1"
    adversarial = True
    black_box = ("soft", "topk")

    def __init__(self, teacher, options, seed):
        if options.bn_weight:
            raise DfkdError("dfme asks only the teacher's answers; bn_weight needs its BatchNorm "
                            "layers (use dfad for a BatchNorm prior)")
        super().__init__(teacher, options, seed)
        require_positive(options, "directions", "epsilon", "memory")
        for name in ("replay", "diversity"):
            if getattr(options, name) < 0:
                raise DfkdError(f"{name} must be >= 0, got {getattr(options, name)}")
        self.memory: dict[str, torch.Tensor] = {}  # a ring of answered samples, on the CPU
        self.remembered = 0  # samples ever stored (the ring's write position, mod its size)

    def synthesize(self, student, index):
        """Every (replay + 1)-th student batch is fresh: G's samples, answered by the teacher
        (a query) and remembered; the others are drawn from the memory and cost no query."""
        cycle = self.opts.replay + 1
        if index % cycle and self.remembered:
            return self.replayed(torch.Generator().manual_seed(self.batch_seed(index)))
        batch = super().synthesize(student, index // cycle)
        if self.opts.replay:
            self.remember(batch)
        return batch

    def remember(self, batch: dict) -> None:
        size, n = self.opts.memory, len(batch["x"])
        if not self.memory:
            self.memory = {"x": torch.empty((size, *batch["x"].shape[1:]), dtype=torch.float16),
                           "target_logits": torch.empty((size, batch["target_logits"].shape[1]))}
        slots = (self.remembered + torch.arange(n)) % size
        self.memory["x"][slots] = batch["x"].detach().cpu().half()
        self.memory["target_logits"][slots] = batch["target_logits"].detach().cpu().float()
        self.remembered += n

    def replayed(self, gen: torch.Generator) -> dict:
        n = min(self.remembered, self.opts.memory)
        if self.opts.balanced:  # each sample weighs 1 / (remembered samples of its class)
            answer = self.memory["target_logits"][:n].argmax(1)
            weight = 1.0 / torch.bincount(answer).float()[answer]
            idx = torch.multinomial(weight, min(n, self.opts.batch_size), generator=gen)
        else:
            idx = torch.randperm(n, generator=gen)[:self.opts.batch_size]
        x = self.memory["x"][idx].float().to(self.device)
        return {"x": x, "target_logits": self.memory["target_logits"][idx].to(self.device),
                "classes": torch.full((len(idx),), -1, dtype=torch.long, device=self.device),
                "seeds": torch.full((len(idx),), -1, dtype=torch.long)}

    def state_dict(self) -> dict:
        n = min(self.remembered, self.opts.memory)
        kept = {k: v[:n].clone() for k, v in self.memory.items()}
        return {**super().state_dict(), "memory": kept, "remembered": self.remembered}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.remembered, self.memory = int(state.get("remembered", 0)), {}
        kept = state.get("memory") or {}
        if kept:
            size = self.opts.memory
            self.memory = {k: torch.empty((size, *v.shape[1:]), dtype=v.dtype)
                           for k, v in kept.items()}
            for k, v in kept.items():
                self.memory[k][:len(v)] = v

    @staticmethod
    def pixels(g: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(g) + 1) / 2

    def generator_step(self, student, gen):
        o, k = self.opts, self.teacher.spec.num_classes
        g = self.G(self.latent(gen, o.batch_size))
        with torch.no_grad(), student_as_judge(student) as judge:
            u = torch.randn((len(g), o.directions, *g.shape[1:]), generator=gen,
                            device=g.device)
            u = u / u.flatten(2).norm(dim=2).view(*u.shape[:2], *([1] * (g.dim() - 1)))
            points = torch.cat([g.detach().unsqueeze(1) + o.epsilon * u, g.detach().unsqueeze(1)],
                               dim=1).flatten(0, 1)
            x = self.pixels(points)
            t = self.teacher(x).float()
            self.teacher_passes += len(x)
            losses = -(judge(x).float() - t).abs().mean(1).view(len(g), o.directions + 1)
            grad = forward_difference_gradient(losses, u, o.epsilon, k)
        if o.diversity:
            grad = grad + o.diversity * self.diversity_gradient(student, g)
        self.g_opt.zero_grad(set_to_none=True)
        g.backward(grad)
        self.g_opt.step()
        self.g_steps += 1
        return losses[:, -1].mean()

    def diversity_gradient(self, student, g: torch.Tensor) -> torch.Tensor:
        """d/dg of the negative entropy of the student's mean answer over G's batch: low when G
        covers the classes evenly. The student is white box, so this costs no query; the
        teacher's answers alone would leave G drawing mostly a few classes."""
        g = g.detach().requires_grad_(True)
        with student_as_judge(student) as judge:
            mean = judge(self.pixels(g)).float().softmax(1).mean(0)
            (grad,) = torch.autograd.grad((mean * mean.clamp_min(1e-8).log()).sum(), g)
        return grad

    def batch(self, g, index):
        x = self.pixels(g.detach())
        n = x.shape[0]
        return {"x": x, "target_logits": self.label(x),
                "classes": torch.full((n,), -1, dtype=torch.long, device=x.device),
                "seeds": self.seeds(index, n)}
