"""Image guidance: masked L2 / L1 distance between the decoded image and a reference image.

This is the paper's inpainting-style guidance: with a mask, only the masked pixels are pulled towards the
reference, and the diffusion model fills in the rest consistently.
"""
from __future__ import annotations

import torch

from .preprocess import match_batch, resize


class ImageLoss:
    """``loss_b = Σ mask·|img - ref|^p / (3·Σ mask)`` per image (``p = 2`` for "l2", ``1`` for "l1").

    ``reference``: ``[1 or B, 3, H, W]`` in [0, 1]. ``mask``: ``[1 or B, 1, H, W]`` in [0, 1], 1 where guidance
    applies; ``None`` guides every pixel. Both are resized (bilinear) to the decoded image's size once per size.
    """

    def __init__(self, reference: torch.Tensor, mask: torch.Tensor | None = None, kind: str = "l2"):
        if kind not in ("l2", "l1"):
            raise ValueError(f"unknown image loss {kind!r}: expected 'l2' or 'l1'")
        if reference.dim() != 4 or reference.shape[1] != 3:
            raise ValueError(f"reference image must be [B,3,H,W], got {tuple(reference.shape)}")
        if mask is not None:
            if mask.dim() == 3:
                mask = mask.unsqueeze(1)
            if mask.dim() != 4 or mask.shape[1] != 1:
                raise ValueError(f"mask must be [B,H,W] or [B,1,H,W], got {tuple(mask.shape)}")
            if float(mask.max()) <= 0:
                raise ValueError("mask is empty (all zero): nothing would be guided; paint the region to guide")
        self.reference = reference.detach().float()
        self.mask = None if mask is None else mask.detach().float()
        self.kind = kind
        self._cache = {}

    def _targets(self, image: torch.Tensor):
        key = (tuple(image.shape[-2:]), image.device, image.dtype)
        if key not in self._cache:
            ref = resize(self.reference.to(image.device), key[0]).to(image.dtype)
            mask = None
            if self.mask is not None:
                mask = resize(self.mask.to(image.device), key[0]).clamp(0, 1).to(image.dtype)
            self._cache = {key: (ref, mask)}
        return self._cache[key]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        ref, mask = self._targets(image)
        batch = image.shape[0]
        ref = match_batch(ref, batch, "reference image")
        diff = image - ref
        err = diff * diff if self.kind == "l2" else diff.abs()
        if mask is None:
            return err.float().mean(dim=(1, 2, 3))
        mask = match_batch(mask, batch, "mask")
        num = (err * mask).float().sum(dim=(1, 2, 3))
        den = mask.float().sum(dim=(1, 2, 3)) * 3.0
        return num / den.clamp_min(1e-8)
