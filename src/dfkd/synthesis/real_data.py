"""The benchmark's anchors: students that *do* see the real training images.

`kd_real` distills the teacher on the real training split (the ceiling every data-free method is
measured against: `gap = kd_real_acc - student_acc`); `scratch_real` trains the student with
plain labels and no teacher. They run through the same engine, budget and evaluation schedule as
the data-free methods, so the comparison is fair. They are not data-free, so `dfkd methods`
lists them apart and they need the training data (`--set data_root=...` for files on disk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfkd.data import fit_to_input, load_dataset
from dfkd.data.augment import FLIP_DATASETS, default_shift, mix_pairs, shift_flip
from dfkd.errors import DfkdError
from dfkd.synthesis.base import Options, Synthesizer, register_method


@dataclass
class RealDataOptions(Options):
    dataset: str = ""  # training data; "" = the dataset the teacher records
    data_root: str = ""  # where its files are; "" = the dataset's default location
    batch_size: int = 256  # real images per student step
    augment: bool = True  # random shifts (plus flips on natural images), as in train-teacher
    mix: bool = False  # kd_real: blend random pairs before the teacher labels them, as the
    # engine's default augmentation does to stored synthetic samples (--augment shift+mix)
    max_images: int = 0  # use only the first N training images (0: all): measures how many real
    # images a synthetic transfer set is worth


class RealData(Synthesizer):
    family = "online"
    uses_real_data = True
    Options = RealDataOptions
    temperature = 4.0

    def __init__(self, teacher, options, seed):
        super().__init__(teacher, options, seed)
        name = options.dataset or teacher.spec.dataset
        if not name:
            raise DfkdError(f"method '{self.name}' needs real training data: the teacher records "
                            "no dataset, so pass --set dataset=NAME (and data_root=PATH)")
        data = load_dataset(name, "train", root=options.data_root or None)
        if data.num_classes != teacher.spec.num_classes:
            raise DfkdError(f"dataset '{name}' has {data.num_classes} classes but the teacher "
                            f"predicts {teacher.spec.num_classes}")
        if options.max_images < 0:
            raise DfkdError(f"max_images must be >= 0 (0: all), got {options.max_images}")
        keep = options.max_images or len(data.labels)
        self.x = fit_to_input(data.images[:keep], teacher.spec.shape, name=name)
        self.y = data.labels[:keep]
        if len(self.y) < options.batch_size:
            raise DfkdError(f"dataset '{name}' has {len(self.y)} training images, fewer than "
                            f"batch_size={options.batch_size}")
        if options.mix and self.student_loss == "ce":
            raise DfkdError(f"{self.name} trains on the true labels, which a blend of two images "
                            "does not have; mix is for kd_real")
        self.shift = default_shift(teacher.spec.shape[1]) if options.augment else 0
        self.flip = options.augment and name in FLIP_DATASETS
        self._epoch, self._order = -1, None

    def real_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Minibatch `index` of a reshuffled-every-epoch pass over the data (drop last); a pure
        function of (seed, index), so resumed runs see the same batches."""
        bs = self.opts.batch_size
        per_epoch = len(self.y) // bs
        epoch, i = divmod(index, per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.batch_seed(-1 - epoch))
            self._epoch, self._order = epoch, torch.randperm(len(self.y), generator=gen)
        idx = self._order[i * bs:(i + 1) * bs]
        x = self.x[idx]
        gen = torch.Generator().manual_seed(self.batch_seed(index))
        if self.shift:
            x = shift_flip(x, gen, self.shift, self.flip)
        if self.opts.mix:
            x = mix_pairs(x, gen)
        return x.to(self.device), self.y[idx]


@register_method
class KDReal(RealData):
    """Anchor (uses real data): KD from the teacher on the real training images, the ceiling."""

    name = "kd_real"

    def synthesize(self, student, index):
        x, y = self.real_batch(index)
        return {"x": x, "target_logits": self.label(x), "classes": y,
                "seeds": self.seeds(index, len(y))}


@register_method
class ScratchReal(RealData):
    """Anchor (uses real data): the student trained on real labels alone, no teacher."""

    name = "scratch_real"
    student_loss = "ce"  # true labels, no teacher
    student_sees_teacher = False  # starts random under --student-init teacher too

    def synthesize(self, student, index):
        x, y = self.real_batch(index)
        return {"x": x, "labels": y, "classes": y, "seeds": self.seeds(index, len(y))}
