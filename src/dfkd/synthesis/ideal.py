"""IDEAL (Zhang, Chen, Lyu, ICLR 2023, "IDEAL: Query-Efficient Data-Free Learning from Black-box
Models"; code SonyResearch/IDEAL): a student from a teacher asked once per sample, for its
answer only, top-1 included.

The student stands in for the teacher while samples are made, so making them costs no query. A
round re-initialises the generator G (from the round's seed), fixes one latent batch z with
classes y balanced over it, and takes `steps` Adam steps on G against the student (in eval mode),
G's output through a sigmoid to pixels x (as the reference's generator ends), after a scale and
shift per channel that are learnt with G and carried over from round to round (the zoo's generator
ends in a BatchNorm without them, which pins every image's mean pixel near grey, where an MNIST
teacher's inputs are mostly black):

    CE(S(view(x)), y) + entropy_weight * mean(p log p),   p = softmax(S(view(x)))

so the samples are ones the student puts in y, yet not confidently: near its decision
boundaries, where it is most likely wrong. The batch of the step with the lowest loss is kept,
the teacher answers each of its samples once (the round's only queries), and the samples join the
transfer set with those answers. The student then trains on the whole set between rounds, so
every query is paid once and used for the rest of the run.

Departures from the reference code: G is the zoo's generator for the teacher's input
(`generator_<side>`, as the other generator methods here) rather than its Generator_2; its view
is by default the inversion methods' random roll of up to `jitter` pixels (flip only for
mirror-symmetric classes) where the reference uses kornia's random crop with padding 4 and a
horizontal flip on every dataset (`view=crop`, `jitter=4`, `flip=true`); the student learns
by KD at temperature 1 on the teacher's answer (the reference's cross-entropy on its top-1 label
when the API gives only that, the full answer when it gives more); and each stored sample is
asked once, where the reference code relabels the whole pool every epoch (its issue #1; the
paper counts one query per sample, as here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfkd.data.augment import check_view, inversion_view, jitter_pixels
from dfkd.errors import DfkdError
from dfkd.synthesis.base import (
    CountsLabelMismatch,
    Options,
    Synthesizer,
    balanced_targets,
    device_default,
    register_method,
    require_positive,
    student_as_judge,
)
from dfkd.synthesis.deepinversion import flip_choice
from dfkd.synthesis.generative import build_generator


@dataclass
class IDEALOptions(Options):
    batch_size: int = 250  # samples per round (reference, MNIST and CIFAR-10: 250)
    steps: int = 30  # G steps per round against the student (reference: 30; 5 for CIFAR-10)
    nz: int = 256  # latent size (reference: 256)
    ngf: int = 0  # generator width; 0 = 64 on a GPU, 16 on a CPU (as the generator methods)
    generator: str = ""  # zoo generator; "" = generator_<side> for the teacher's input
    lr_g: float = 1e-3  # Adam learning rate of G, betas (0.5, 0.999) (reference: 1e-3)
    lr_tone: float = 1e-2  # Adam learning rate of the pixels' scale and shift per channel,
    # which carry over from round to round (the reference's generator has no such pair)
    entropy_weight: float = 5.0  # weight of mean(p log p) (reference: 5)
    jitter: int = -1  # max random roll in pixels per step; -1: 1/16 of the side
    view: str = "roll"  # the student's view of G's output: roll | affine | crop (the
    # reference's: each sample shifted by up to `jitter` px over black, flipped on its own) | none
    flip: str = "auto"  # random horizontal flip: true | false | auto (off for digit datasets)
    samples_per_class: int = 0  # stop synthesizing at this many per class (0: never)


def ideal_loss(s_logits: torch.Tensor, targets: torch.Tensor,
               entropy_weight: float) -> torch.Tensor:
    """CE to the wanted classes plus `entropy_weight` x mean over samples and classes of p log p
    (the reference's form): low for samples the student puts in their class with little
    confidence."""
    p = s_logits.float().softmax(1)
    return (torch.nn.functional.cross_entropy(s_logits.float(), targets)
            + entropy_weight * (p * p.clamp_min(1e-12).log()).mean())


@register_method
class IDEAL(CountsLabelMismatch, Synthesizer):
    """IDEAL (Zhang et al., ICLR 2023): samples made against the student, each asked once."""

    name = "ideal"
    family = "transfer_set"
    Options = IDEALOptions
    temperature = 1.0  # KD at 1 on the answer: the reference's cross-entropy for a top-1 API
    black_box = ("top1", "topk", "soft")  # it asks the teacher only for answers

    def __init__(self, teacher, options, seed):
        super().__init__(teacher, options, seed)
        o = options
        o.ngf = device_default(o.ngf, 64, 16, self.device)
        require_positive(o, "batch_size", "steps", "nz", "ngf", "lr_g")
        if o.entropy_weight < 0 or o.batch_size < 2:
            raise DfkdError(f"entropy_weight must be >= 0 and batch_size at least 2 (G's batch "
                            f"statistics), got {o.entropy_weight} and {o.batch_size}")
        check_view(o.view)
        build_generator(teacher, o.generator, o.nz, o.ngf, seed)  # a bad generator fails now
        c, h, _ = teacher.spec.shape  # an image: the generator has made one of this shape
        self.jitter = jitter_pixels(o.jitter, h)
        self.flip = flip_choice(o.flip, teacher.spec.dataset)
        self.black = torch.zeros(1, device=self.device)  # the border's fill, in pixels
        self.g_steps = 0  # G steps over all rounds
        self.tone = torch.zeros((2, 1, c, 1, 1), device=self.device)  # log-scale, shift

    def synthesize(self, student, index):
        if student is None:
            raise DfkdError("method 'ideal' makes its samples against the student and needs "
                            "one (use dfkd distill, not dfkd synthesize)")
        o = self.opts
        gen = self.rng(index)
        G = build_generator(self.teacher, o.generator, o.nz, o.ngf, self.batch_seed(index))
        tone = self.tone.requires_grad_(True)
        opt = torch.optim.Adam([{"params": G.parameters()},
                                {"params": [tone], "lr": o.lr_tone}], lr=o.lr_g, betas=(0.5, 0.999))
        y = balanced_targets(o.batch_size, self.teacher.spec.num_classes, gen)
        z = torch.randn((o.batch_size, o.nz), generator=gen, device=self.device)
        best, best_loss = None, float("inf")
        with student_as_judge(student) as judge, torch.enable_grad():  # G learns, always
            for _ in range(o.steps):
                if self.should_stop() and best is not None:
                    break
                x = torch.sigmoid(G(z) * tone[0].exp() + tone[1])  # pixels
                seen = inversion_view(x, o.view, self.jitter, gen, self.black, self.flip)
                loss = ideal_loss(judge(seen), y, o.entropy_weight)
                if loss.item() < best_loss:
                    best, best_loss = x.detach(), loss.item()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self.g_steps += 1
        x = best.half().float()  # answered exactly as stored
        target = self.label(x)
        self.count_mismatch(target, y)  # how often the teacher disagrees with the student
        return {"x": x, "target_logits": target, "classes": y, "seeds": self.seeds(index, len(x))}

    def report(self) -> dict:
        return {**super().report(), "generator_steps": self.g_steps}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "g_steps": self.g_steps, "tone": self.tone.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.g_steps = int(state.get("g_steps", 0))
        if "tone" in state:
            self.tone = state["tone"].to(self.device).clone()
