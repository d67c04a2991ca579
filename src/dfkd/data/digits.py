"""scikit-learn's bundled 8x8 digits: a real dataset that needs no download, for quick runs."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from dfkd.data.dataset import ImageDataset, channel_stats

CLASSES = [str(d) for d in range(10)]


def load_digits_split(split: str) -> ImageDataset:
    """One side of a fixed stratified 75/25 split (same every call), as uint8 1x8x8 images.

    The 0..16 intensities are rescaled to 0..255 so every dataset shares one pixel range;
    mean/std come from the training side.
    """
    bunch = load_digits()
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.25,
                                           stratify=labels, random_state=0)
    mean, std = channel_stats(torch.from_numpy(images[train_idx]))
    idx = train_idx if split == "train" else test_idx
    return ImageDataset(
        name="digits",
        images=torch.from_numpy(images[idx]),
        labels=torch.from_numpy(labels[idx]),
        classes=list(CLASSES),
        mean=mean,
        std=std,
    )
