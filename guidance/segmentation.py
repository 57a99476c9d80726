"""Segmentation guidance (Bansal et al. 2023): per-pixel cross-entropy of a torchvision segmentation network on the
decoded image against a target class map.

Networks: torchvision DeepLabV3-ResNet50/101, DeepLabV3-MobileNetV3, FCN-ResNet50/101 and LRASPP-MobileNetV3
(the paper's), 21 Pascal-VOC classes, built with ``weights=None, weights_backbone=None`` (no download) and loaded
from a file. Whether the auxiliary head exists is read from the file (torchvision's published DeepLabV3/FCN
checkpoints have one, LRASPP has none), so those state dicts load strictly; the loaded model then drops the
auxiliary head, which the loss never uses (it costs a forward pass in eval mode).

Preprocessing as torchvision's ``SemanticSegmentation`` transform, differentiable: shorter side resized
(bilinear, anti-aliased) to ``input_size`` (520, as the published weights and the paper), ImageNet mean/std. The
logits are resized bilinearly back to the decoded image size and compared there with the target map.

Target maps: ``LongTensor [B or 1, H, W]`` of class indices; ``255`` (``IGNORE_INDEX``) marks "don't care"
pixels. A map of another size than the decoded image is resized with nearest neighbour (once per size).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .download import load_into, load_state_dict_file
from .objective import NetworkLoss
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, match_batch, normalize, resize_shorter

IGNORE_INDEX = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
_VOC_ALIASES = {"__background__": "background", "airplane": "aeroplane", "plane": "aeroplane",
                "bike": "bicycle", "table": "diningtable", "motorcycle": "motorbike", "people": "person",
                "plant": "pottedplant", "couch": "sofa", "tv": "tvmonitor", "monitor": "tvmonitor"}

SEGMENTATION_ARCHS = ("deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large",
                      "fcn_resnet50", "fcn_resnet101", "lraspp_mobilenet_v3_large")
_HAS_AUX = {a: not a.startswith("lraspp") for a in SEGMENTATION_ARCHS}


def voc_palette(n: int = 256) -> torch.Tensor:
    """The Pascal-VOC colour map: ``uint8 [n, 3]``; entry ``i`` is the colour of class ``i`` (0 black,
    1 (128,0,0), …); entry 255 is the "void"/boundary colour (224,224,192)."""
    pal = torch.zeros(n, 3, dtype=torch.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = torch.tensor([r, g, b], dtype=torch.uint8)
    return pal


VOC_PALETTE = voc_palette()


def voc_class_index(name: Union[str, int]) -> int:
    """Index (0–20) of a VOC class given by name (case-, space- and underscore-insensitive; a few aliases such as
    "airplane", "motorcycle", "tv") or by index."""
    if isinstance(name, int) or (isinstance(name, str) and name.strip().isdigit()):
        idx = int(name)
        if not 0 <= idx < len(VOC_CLASSES):
            raise ValueError(f"VOC class index {idx} out of range 0..{len(VOC_CLASSES) - 1}")
        return idx
    key = name.strip().lower()
    key = _VOC_ALIASES.get(key, key)
    key = "".join(ch for ch in key if ch.isalnum())
    key = _VOC_ALIASES.get(key, key)
    for i, cls in enumerate(VOC_CLASSES):
        if cls == key:
            return i
    raise ValueError(f"unknown VOC class {name!r}; known classes: {', '.join(VOC_CLASSES)}")


def _image_bhwc(image: torch.Tensor, what: str) -> torch.Tensor:
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[-1] not in (3, 4):
        raise ValueError(f"{what} must be an RGB image [H,W,3] or [B,H,W,3], got shape {tuple(image.shape)}")
    image = image[..., :3]
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    return image.float()


def colors_to_class_map(image: torch.Tensor, *, tolerance: float = 0.1,
                        palette: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Colour-coded segmentation image → class map ``LongTensor [B,H,W]``.

    ``image``: ``[H,W,3]`` or ``[B,H,W,3]`` (ComfyUI IMAGE), floats in [0, 1] (or uint8). Each pixel takes the
    class of the nearest palette colour (default: the 21 VOC colours) when it lies within ``tolerance``
    (Euclidean distance in [0, 1] RGB units; VOC colours are ≥ 0.25 apart, so the default 0.1 tolerates JPEG-like
    noise without ambiguity). Any other colour — including VOC's void colour (224,224,192) — becomes 255,
    "don't care". ``palette``: ``[K,3]`` colours (uint8 0–255 or floats in [0, 1]) for classes 0..K-1.
    """
    img = _image_bhwc(image, "segmentation image")
    if palette is None:
        palette = VOC_PALETTE[:len(VOC_CLASSES)]
    pal = palette.float() / 255.0 if palette.dtype == torch.uint8 or palette.max() > 1.0 else palette.float()
    if pal.dim() != 2 or pal.shape[1] != 3:
        raise ValueError(f"palette must be [K,3], got {tuple(pal.shape)}")
    pal = pal.to(img.device)
    flat = img.reshape(-1, 3)
    dist = torch.cdist(flat, pal)  # [N, K]
    best, idx = dist.min(dim=1)
    idx = torch.where(best <= tolerance, idx, torch.full_like(idx, IGNORE_INDEX))
    return idx.view(img.shape[:-1]).long()


def mask_to_class_map(mask: torch.Tensor, class_name: Union[str, int], *, outside: str = "background",
                      threshold: float = 0.5) -> torch.Tensor:
    """MASK + class → class map ``LongTensor [B,H,W]``: pixels with ``mask > threshold`` get the class; the others
    get background (0) when ``outside="background"`` or 255 "don't care" when ``outside="ignore"``.

    ``mask``: ``[H,W]``, ``[B,H,W]`` or ``[B,1,H,W]`` in [0, 1]. ``class_name``: a VOC class name or index.
    """
    if outside not in ("background", "ignore"):
        raise ValueError(f"outside must be 'background' or 'ignore', got {outside!r}")
    mask = _as_bhw(mask, "mask must be [H,W], [B,H,W] or [B,1,H,W]")
    cls = voc_class_index(class_name)
    fill = 0 if outside == "background" else IGNORE_INDEX
    inside = mask.float() > threshold
    return torch.where(inside, torch.full(mask.shape, cls, dtype=torch.long, device=mask.device),
                       torch.full(mask.shape, fill, dtype=torch.long, device=mask.device))


def class_map_to_colors(class_map: torch.Tensor) -> torch.Tensor:
    """Class map ``[B,H,W]`` → colour image ``[B,H,W,3]`` in [0, 1] with the VOC palette (for previews)."""
    return VOC_PALETTE.to(class_map.device)[class_map.long().clamp(0, 255)].float() / 255.0


def build_segmentation_model(arch: str, *, num_classes: int = 21, aux_loss: bool = False) -> torch.nn.Module:
    """A randomly initialised torchvision segmentation network (no download)."""
    from torchvision.models import segmentation as seg

    if arch not in SEGMENTATION_ARCHS:
        raise ValueError(f"unknown segmentation architecture {arch!r}; known: {', '.join(SEGMENTATION_ARCHS)}")
    builder = getattr(seg, arch)
    kwargs = dict(weights=None, weights_backbone=None, num_classes=num_classes)
    if _HAS_AUX[arch]:
        kwargs["aux_loss"] = aux_loss
    elif aux_loss:
        raise ValueError(f"{arch} has no auxiliary head")
    with torch.inference_mode(False):
        return builder(**kwargs)


def load_segmentation_model(arch: str, weights_path: Optional[str] = None, device="cpu", *,
                            num_classes: int = 21, keep_aux: bool = False) -> torch.nn.Module:
    """Build ``arch`` and load ``weights_path`` strictly (``None``: random init, for tests). Returned frozen
    (``eval()``, no parameter grads) on ``device``; the auxiliary head is dropped unless ``keep_aux``."""
    if arch not in SEGMENTATION_ARCHS:
        raise ValueError(f"unknown segmentation architecture {arch!r}; known: {', '.join(SEGMENTATION_ARCHS)}")
    aux = False
    sd = None
    if weights_path is not None:
        sd = load_state_dict_file(weights_path)
        aux = any(k.startswith("aux_classifier.") for k in sd)
        if aux and not _HAS_AUX.get(arch, False):
            raise RuntimeError(f"{weights_path!r} has an auxiliary head, which {arch} does not have: "
                               f"wrong architecture?")
    model = build_segmentation_model(arch, num_classes=num_classes, aux_loss=aux)
    if sd is not None:
        load_into(model, sd, weights_path, arch)
    if not keep_aux and getattr(model, "aux_classifier", None) is not None:
        model.aux_classifier = None
    model.eval().requires_grad_(False)
    with torch.inference_mode(False):
        return model.to(device)


def _num_classes(model: torch.nn.Module) -> Optional[int]:
    convs = [m for m in model.classifier.modules() if isinstance(m, torch.nn.Conv2d)] \
        if hasattr(model, "classifier") else []
    return convs[-1].out_channels if convs else None


def _as_class_map(target: torch.Tensor) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target class map must be a tensor, got {type(target)}")
    if target.is_floating_point():
        if not torch.equal(target, target.round()):
            raise ValueError("target class map must hold integer class indices (got fractional values)")
    return _as_bhw(target, "target class map must be [H,W] or [B,H,W]").long()


def _as_bhw(t: torch.Tensor, rule: str) -> torch.Tensor:
    """``[H,W]``, ``[B,H,W]`` or ``[B,1,H,W]`` as ``[B,H,W]``; any other shape raises ``rule`` with the shape."""
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 3:
        raise ValueError(f"{rule}, got shape {tuple(t.shape)}")
    return t


REDUCTIONS = ("all", "labelled")


class SegmentationLoss(NetworkLoss):
    """``loss_b`` = the per-pixel cross-entropy ``CE(seg(x_b), target_b)`` summed over the labelled pixels and divided
    by ``reduction``'s count: ``"all"`` pixels (the official code's ``mean(dim=[1,2])``; its targets are fully
    labelled) or the ``"labelled"`` pixels only (1/f times stronger when a fraction f is labelled). Pixels labelled
    ``ignore_index`` (255) add nothing. A sample with no labelled pixel contributes 0.

    ``model``: a torchvision segmentation network (``load_segmentation_model``), output dict with ``"out"``.
    ``target``: class map (see module doc); values must be ``< num_classes`` or ``ignore_index``.
    ``input_size``: shorter side fed to the network (``None``: the decoded size as is).
    """

    def __init__(self, model: torch.nn.Module, target: torch.Tensor, *, input_size: Optional[int] = 520,
                 ignore_index: int = IGNORE_INDEX, num_classes: Optional[int] = None, reduction: str = "all"):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        target = _as_class_map(target)
        n_cls = num_classes or _num_classes(model) or len(VOC_CLASSES)
        valid = target != ignore_index
        if not bool(valid.any()):
            raise ValueError("the segmentation target has no labelled pixel (all 'don't care'): nothing to guide")
        bad = valid & ((target < 0) | (target >= n_cls))
        if bool(bad.any()):
            vals = sorted(set(target[bad].unique().tolist()))[:5]
            raise ValueError(f"target class map holds values {vals} outside 0..{n_cls - 1} (and {ignore_index} "
                             f"for don't care)")
        if input_size is not None and int(input_size) < 8:
            raise ValueError(f"input_size must be >= 8 or None, got {input_size}")
        self.model = model.eval().requires_grad_(False)
        with torch.inference_mode(False):
            self.target = target.detach().cpu().clone()  # a normal tensor even if given under inference_mode
        self.input_size = None if input_size is None else int(input_size)
        self.ignore_index = int(ignore_index)
        self.num_classes = n_cls
        self._cache = {}

    def prepare(self, device, dtype: Optional[torch.dtype] = None) -> "SegmentationLoss":
        super().prepare(device, dtype)
        self._cache = {}
        return self

    def target_for(self, size, device) -> torch.Tensor:
        """The target map at ``size`` (H, W) on ``device`` (nearest-neighbour resize, cached)."""
        key = (tuple(size), str(device))
        if key not in self._cache:
            t = self.target
            if tuple(t.shape[-2:]) != tuple(size):
                t = F.interpolate(t[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
            self._cache = {key: t.to(device)}
        return self._cache[key]

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Network logits ``[B, classes, H, W]`` at the decoded image size (differentiable)."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"decoded image must be [B,3,H,W], got shape {tuple(image.shape)}")
        if self.device != image.device:
            self.prepare(image.device)
        x = image.to(self.dtype)
        if self.input_size is not None:
            x = resize_shorter(x, self.input_size)
        out = self.model(normalize(x, IMAGENET_MEAN, IMAGENET_STD))["out"]
        if tuple(out.shape[-2:]) != tuple(image.shape[-2:]):
            out = F.interpolate(out, size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)
        return out

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.logits(image).float()
        target = match_batch(self.target_for(image.shape[-2:], image.device), image.shape[0], "target class map")
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none")  # [B,H,W]
        if self.reduction == "all":
            count = torch.full_like(ce[:, 0, 0], float(ce.shape[1] * ce.shape[2]))
        else:
            count = (target != self.ignore_index).sum(dim=(1, 2)).clamp_min(1)
        return ce.sum(dim=(1, 2)) / count
