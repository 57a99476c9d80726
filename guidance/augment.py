"""Views of the decoded image for an image term: random augmentation (Shen et al. 2024, Alg. 1) and Gaussian
smoothing of the objective (TFG's implicit dynamics), both batched after ONE decode into one network call.

* Augmentation (the set of Shen et al.'s DiffAugment): colour — brightness +U(−0.5, 0.5), saturation ×U(0, 2),
  contrast ×U(0.5, 1.5), as DiffAugment's linear maps *without clamping* (kornia's colour jitter clamps to [0, 1],
  which zeroes the gradient of every saturated pixel) — then, for terms whose target does not live on the image
  grid (CLIP text, style), kornia's differentiable translation by up to 1/8 of the side, resize ×U(0.8, 1.2) and a
  cutout of a quarter of the area. Terms with a spatial target (segmentation maps, boxes, a reference image, a face
  crop) get the colour part only, so the target stays aligned. The parameters come from seeded generators: a run
  is reproducible, and the global RNG is left as it was.
* Smoothing: K copies of the image plus Gaussian noise of std ``σ̄·sqrt(1 − ᾱ(σ))`` (TFG's σ_t = σ̄·√(1−ᾱ_t);
  ``noise_fraction`` below), in the image's [0, 1] units.

``views(image, term)`` returns ``[V·B, 3, H, W]`` (views outermost) and ``reduce(values, V)`` folds the term's
``[V·B]`` losses back to ``[B]``: the mean, or TFG's log-mean-exp ``−log mean exp(−L)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "logmeanexp")


@dataclass(frozen=True)
class Smoothing:
    """``samples`` Gaussian perturbations of std ``strength·noise_fraction`` (0 samples or strength 0: off)."""

    strength: float = 0.0
    samples: int = 0
    reduction: str = "mean"

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"smoothing reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.samples < 0 or not math.isfinite(self.strength) or self.strength < 0:
            raise ValueError(f"smoothing needs samples >= 0 and strength >= 0, got {self.samples}, {self.strength}")

    @property
    def active(self) -> bool:
        return self.samples > 0 and self.strength > 0


def noise_fraction(a: float, b: float) -> float:
    """``sqrt(1 − ᾱ)`` of the point ``x = a·x0 + b·n`` (VE: σ/sqrt(1 + σ²); flow: σ/sqrt((1 − σ)² + σ²))."""
    return b / math.sqrt(a * a + b * b) if (a or b) else 0.0


class Augmenter:
    """``count`` random augmentations of an image batch, seeded; ``spatial=True`` keeps to colour changes."""

    def __init__(self, count: int, spatial: bool, seed: int = 0):
        if count < 0:
            raise ValueError(f"augment count must be >= 0, got {count}")
        self.count, self.spatial, self.seed = int(count), bool(spatial), int(seed)
        self.calls = 0
        self._pipeline = None

    def reset(self) -> None:
        self.calls = 0

    def pipeline(self):
        """kornia's geometric part: translation, resize, cutout (None for spatial terms)."""
        if self._pipeline is None and not self.spatial:
            import kornia.augmentation as K
            self._pipeline = K.AugmentationSequential(
                K.RandomAffine(degrees=0.0, translate=(0.125, 0.125), scale=(0.8, 1.2), padding_mode="zeros", p=1.0),
                K.RandomErasing(scale=(0.25, 0.25), ratio=(1.0, 1.0), value=0.0, p=1.0))
        return self._pipeline

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """``[count·B, 3, H, W]``: ``count`` augmented copies of ``image`` (copies outermost)."""
        seed = (self.seed * 1000003 + self.calls) % (2 ** 63)
        self.calls += 1
        batch = colour(image.repeat(self.count, 1, 1, 1), torch.Generator().manual_seed(seed))
        geometric = self.pipeline()
        if geometric is None:
            return batch
        devices = [image.device] if image.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return geometric(batch.float()).to(image.dtype)


def colour(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """DiffAugment's colour changes per image: brightness + U(−0.5, 0.5), saturation × U(0, 2) around the pixel's
    channel mean, contrast × U(0.5, 1.5) around the image mean. Linear in x, no clamping."""
    n = x.shape[0]
    u = torch.rand(n, 3, generator=generator, dtype=torch.float32).to(x.device, x.dtype).view(n, 3, 1, 1, 1)
    x = x + (u[:, 0] - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (u[:, 1] * 2.0) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (u[:, 2] + 0.5) + mean


def smooth(image: torch.Tensor, smoothing: Smoothing, std: float, generator: torch.Generator) -> torch.Tensor:
    """``[K·B, ...]``: K noisy copies of ``image`` (std in the image's units), noise from ``generator`` (CPU)."""
    k = smoothing.samples
    noise = torch.randn((k,) + tuple(image.shape), generator=generator, dtype=torch.float32)
    return (image.unsqueeze(0) + std * noise.to(image.device, image.dtype)).reshape(k * image.shape[0],
                                                                                      *image.shape[1:])


def reduce(values: torch.Tensor, views: int, reduction: str = "mean") -> torch.Tensor:
    """Fold ``[views·B]`` losses to ``[B]``: the mean over views, or ``−log mean exp(−L)`` (TFG)."""
    v = values.float().reshape(views, -1)
    if reduction == "logmeanexp":
        return -(torch.logsumexp(-v, dim=0) - math.log(views))
    return v.mean(dim=0)
