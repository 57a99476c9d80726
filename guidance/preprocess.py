"""Differentiable image preprocessing shared by the guidance networks (no ``round()``, no PIL in the graph)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_bchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[B,H,W,C]`` → ``[B,C,H,W]`` (3 channels; an alpha channel is dropped)."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4:
        raise ValueError(f"expected an image tensor [B,H,W,C], got shape {tuple(image.shape)}")
    return image[..., :3].permute(0, 3, 1, 2).contiguous()


def resize(image: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """Resize ``[B,C,H,W]`` to ``size`` (int: a square; tuple: (H, W)), differentiably."""
    if isinstance(size, int):
        size = (size, size)
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if mode == "nearest":
        return F.interpolate(image, size=size, mode="nearest")
    return F.interpolate(image, size=size, mode=mode, align_corners=False, antialias=False)


def normalize(image: torch.Tensor, mean, std) -> torch.Tensor:
    m = image.new_tensor(mean).view(1, -1, 1, 1)
    s = image.new_tensor(std).view(1, -1, 1, 1)
    return (image - m) / s


def match_batch(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Broadcast a reference with batch 1 to ``batch``; a reference batch must be 1 or equal ``batch``."""
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"{what} has a batch of {t.shape[0]} but the latent batch is {batch}: give 1 or {batch}")


def resize_shorter(image: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """Resize ``[B,C,H,W]`` so that its shorter side is ``size`` (aspect ratio kept), differentiably.

    ``antialias=True`` low-pass filters when shrinking (what PIL/torchvision do for the published preprocessing);
    its backward pass exists on CPU and CUDA.
    """
    h, w = image.shape[-2:]
    if min(h, w) == size:
        return image
    if h <= w:
        new = (size, max(size, int(w * size / h + 0.5)))
    else:
        new = (max(size, int(h * size / w + 0.5)), size)
    return F.interpolate(image, size=new, mode="bilinear", align_corners=False,
                         antialias=antialias and (new[0] < h or new[1] < w))


def resize_to(image: torch.Tensor, size, antialias: bool = True) -> torch.Tensor:
    """Bilinear resize of ``[B,C,H,W]`` to ``size`` (int: a square; tuple: (H, W)), anti-aliased when shrinking."""
    if isinstance(size, int):
        size = (size, size)
    size = (int(size[0]), int(size[1]))
    h, w = image.shape[-2:]
    if (h, w) == size:
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False,
                         antialias=antialias and (size[0] < h or size[1] < w))


def center_crop(image: torch.Tensor, size) -> torch.Tensor:
    """Central ``size`` crop of ``[B,C,H,W]`` (int: a square; tuple: (H, W)) by slicing: gradients pass through."""
    if isinstance(size, int):
        size = (size, size)
    h, w = image.shape[-2:]
    th, tw = int(size[0]), int(size[1])
    if th > h or tw > w:
        raise ValueError(f"cannot crop {th}x{tw} out of an image of {h}x{w}")
    top = (h - th) // 2
    left = (w - tw) // 2
    return image[..., top:top + th, left:left + tw]


def resize_center_crop(image: torch.Tensor, size, antialias: bool = True) -> torch.Tensor:
    """CLIP-style view: shorter side to ``size`` then central crop (int: square; tuple: (H, W)), differentiable."""
    if isinstance(size, int):
        size = (size, size)
    short = max(int(size[0]), int(size[1]))
    return center_crop(resize_shorter(image, short, antialias=antialias), size)


def random_cutouts(image: torch.Tensor, count: int, size, generator: torch.Generator,
                   min_fraction: float = 0.5, antialias: bool = True) -> torch.Tensor:
    """``count`` random square crops of every image, each resized to ``size``: ``[count·B, C, h, w]``.

    Crop ``i`` of image ``b`` is at index ``i·B + b``. The side of each crop is drawn uniformly in
    ``[min_fraction, 1]`` × the shorter image side, its position uniformly inside the image. Crop geometry comes
    from ``generator`` (a CPU ``torch.Generator``: deterministic per seed) and is shared by the batch; the pixels
    are sliced, so gradients reach the image.
    """
    if count < 1:
        raise ValueError(f"cutout count must be >= 1, got {count}")
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must lie in (0, 1], got {min_fraction}")
    h, w = image.shape[-2:]
    short = min(h, w)
    crops = []
    for _ in range(count):
        u = torch.rand(3, generator=generator).tolist()
        side = max(1, min(short, int(short * (min_fraction + (1.0 - min_fraction) * u[0]))))
        top = int((h - side) * u[1])
        left = int((w - side) * u[2])
        crops.append(resize_to(image[..., top:top + side, left:left + side], size, antialias=antialias))
    return torch.cat(crops, dim=0)


def rgb_uint8_hwc(image: torch.Tensor) -> torch.Tensor:
    """``[B,3,H,W]`` in [0, 1] → detached ``[B,H,W,3]`` float tensor holding 0–255 integer values (no gradient).

    For detectors that run without gradient on an 8-bit picture (e.g. MTCNN); never use it inside a loss graph.
    """
    with torch.no_grad():
        return (image.detach().float().clamp(0, 1) * 255.0).round().permute(0, 2, 3, 1).contiguous()
