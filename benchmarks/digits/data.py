"""sklearn's bundled 8×8 digits (1797 images, no download) as 1×8×8 latents in [-1, 1].

The latent *is* the image: ``decode`` maps it to the engine's RGB ``[B,3,H,W]`` in [0, 1] without clamping
(so guidance gradients survive values outside the data range).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

TEST_SIZE = 0.3
SPLIT_SEED = 0
NUM_CLASSES = 10


@dataclass(frozen=True)
class Split:
    x_train: torch.Tensor  # [N, 1, 8, 8] float32 in [-1, 1]
    y_train: torch.Tensor  # [N] int64
    x_test: torch.Tensor
    y_test: torch.Tensor


@lru_cache(maxsize=1)
def load_split() -> Split:
    """The fixed stratified split: 1257 training and 540 test digits (``random_state=0``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 8.0 - 1.0  # pixel values 0..16 → [-1, 1]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return Split(t(x_tr).unsqueeze(1), t(y_tr), t(x_te).unsqueeze(1), t(y_te))


def decode(latent: torch.Tensor) -> torch.Tensor:
    """Latent ``[B,1,8,8]`` in [-1, 1] → RGB ``[B,3,8,8]`` in [0, 1] (grey repeated, not clamped)."""
    return ((latent + 1.0) * 0.5).expand(-1, 3, -1, -1)


def image_to_input(image: torch.Tensor) -> torch.Tensor:
    """RGB ``[B,3,H,W]`` in [0, 1] → the classifiers' input ``[B,1,H,W]`` in [-1, 1] (mean over channels)."""
    return image.mean(dim=1, keepdim=True) * 2.0 - 1.0
