"""Object-detection guidance (Bansal et al. 2023): the training losses of torchvision's Faster R-CNN
(ResNet50-FPN-v2, COCO) on the decoded image against user-given target boxes.

Target boxes are text, one box per entry, entries separated by ``;`` or new lines::

    x0,y0,x1,y1,label; x0,y0,x1,y1,label

- coordinates: pixels of an image of ``image_size = (height, width)``, or relative coordinates in [0, 1].
  ``relative=None`` (default) decides per box: a box whose four numbers are all ≤ 1 is relative, any other box is
  in pixels (so a pixel box "0,0,1,1" cannot be written — use ``relative=False``). ``relative=True`` / ``False``
  forces one reading for every box.
- label: a COCO category name of torchvision's 91-entry list (case-insensitive; "N/A" entries excluded) or its
  integer id (1–90).
- An unknown label, a box that is empty (``x1 <= x0`` or ``y1 <= y0``) or reaches outside the image raises a
  ``ValueError`` naming the entry.

Boxes are stored relative to the image they were given for and scaled to the decoded image's size at every call,
so a target drawn for 512×512 guides a 768×768 generation at the same relative place.

The loss per image is ``loss_classifier + loss_objectness + loss_rpn_box_reg`` (the paper's; ``+ loss_box_reg``
with ``box_regression=True``), computed with the detector in training mode but every BatchNorm in eval mode (frozen
statistics) and all parameters frozen; images are evaluated one at a time to get one loss per image. The random
proposal sampling of the training losses runs under a forked RNG seeded per call, so a run is reproducible and the
global RNG (the sampler's noise) is not disturbed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .download import load_into, load_state_dict_file
from .objective import NetworkLoss


def coco_categories() -> list:
    """torchvision's 91-entry COCO category list (index = label id; "__background__" at 0, "N/A" gaps)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_V2_Weights

    return list(FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1.meta["categories"])


COCO_CATEGORIES = tuple(coco_categories())


def coco_label_id(label: Union[str, int]) -> int:
    """Label id (1–90) of a COCO category name (case-insensitive, spaces collapsed) or id; ``ValueError`` if none."""
    if isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit()):
        idx = int(label)
        if 1 <= idx < len(COCO_CATEGORIES) and COCO_CATEGORIES[idx] != "N/A":
            return idx
        raise ValueError(f"COCO label id {idx} is not a category (valid: 1–90 except the N/A gaps)")
    key = " ".join(str(label).lower().replace("_", " ").split())
    for i, name in enumerate(COCO_CATEGORIES):
        if i > 0 and name != "N/A" and name.lower() == key:
            return i
    raise ValueError(f"unknown COCO category {label!r}")


@dataclass(frozen=True)
class BoxTarget:
    """Target boxes ``[N,4]`` (x0, y0, x1, y1) relative to the image size (in [0, 1]) and COCO label ids ``[N]``."""

    boxes: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())

    def to_pixels(self, height: int, width: int) -> torch.Tensor:
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        return self.boxes.float() * scale

    def names(self) -> list:
        return [COCO_CATEGORIES[int(i)] for i in self.labels]


def _parse_box(entry: str, n: int, relative: Optional[bool], size: Optional[tuple]):
    """``(relative box, label id)`` of one ``"x0,y0,x1,y1,label"`` entry (the ``n``-th); errors name the entry."""
    where = f"box {n} ({entry!r})"
    parts = [p.strip() for p in entry.split(",", 4)]
    if len(parts) != 5 or not parts[4]:
        raise ValueError(f"{where}: expected 'x0,y0,x1,y1,label'")
    try:
        x0, y0, x1, y1 = (float(p) for p in parts[:4])
    except ValueError:
        raise ValueError(f"{where}: the four coordinates must be numbers") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"{where}: the four coordinates must be finite numbers (not nan or inf)")
    try:
        label = coco_label_id(parts[4])
    except ValueError as e:
        raise ValueError(f"{where}: {e}; use a COCO category name such as 'person', 'dog', 'car', "
                         f"'teddy bear', or its id 1–90") from None
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{where}: empty box (need x1 > x0 and y1 > y0)")
    is_rel = relative if relative is not None else max(abs(x0), abs(y0), abs(x1), abs(y1)) <= 1.0
    if is_rel:
        if min(x0, y0) < 0 or max(x1, y1) > 1:
            raise ValueError(f"{where}: relative coordinates must lie in [0, 1]")
        return (x0, y0, x1, y1), label
    if size is None:
        raise ValueError(f"{where}: pixel coordinates need the image size (height, width) they refer to")
    height, width = size
    if min(x0, y0) < 0 or x1 > width or y1 > height:
        raise ValueError(f"{where}: box reaches outside the {width}x{height} image "
                         f"(x in [0, {width}], y in [0, {height}])")
    return (x0 / width, y0 / height, x1 / width, y1 / height), label


def parse_boxes(text: str, *, image_size: Optional[Sequence[int]] = None,
                relative: Optional[bool] = None) -> BoxTarget:
    """Parse ``"x0,y0,x1,y1,label; ..."`` (see the module doc) into a ``BoxTarget``.

    ``image_size``: ``(height, width)`` of the image pixel coordinates refer to (needed for pixel boxes).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("no target boxes given: expected 'x0,y0,x1,y1,label; ...'")
    if image_size is not None:
        if len(image_size) != 2 or int(image_size[0]) <= 0 or int(image_size[1]) <= 0:
            raise ValueError(f"image_size must be (height, width) > 0, got {image_size}")
        height, width = int(image_size[0]), int(image_size[1])
    entries = [e.strip() for e in re.split(r"[;\n]", text) if e.strip()]
    boxes, labels, problems = [], [], []
    for n, entry in enumerate(entries, 1):
        try:
            rel, label = _parse_box(entry, n, relative, image_size and (height, width))
        except ValueError as e:
            problems.append(str(e))
            continue
        boxes.append(rel)
        labels.append(label)
    if problems:  # every bad entry at once, so one correction fixes them all
        raise ValueError("; ".join(problems))
    return BoxTarget(torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels, dtype=torch.long))


def build_detection_model(*, num_classes: int = 91, min_size: int = 800, max_size: int = 1333,
                          **kwargs) -> torch.nn.Module:
    """A randomly initialised torchvision ``fasterrcnn_resnet50_fpn_v2`` (no download).

    ``min_size`` / ``max_size``: the detector's internal resize (shorter side to ``min_size`` unless the longer
    would exceed ``max_size``); torchvision's defaults 800 / 1333. Other ``kwargs`` go to ``FasterRCNN`` (e.g.
    ``box_batch_size_per_image``, ``rpn_batch_size_per_image``: how many proposals the training losses sample).
    """
    from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2

    with torch.inference_mode(False):
        return fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes,
                                          min_size=min_size, max_size=max_size, **kwargs)


def load_detection_model(weights_path: Optional[str] = None, device="cpu", *, min_size: int = 800,
                         max_size: int = 1333, **kwargs) -> torch.nn.Module:
    """``build_detection_model`` + weights from ``weights_path`` (e.g. torchvision's
    ``fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth``; ``None``: random init, for tests), loaded strictly; frozen
    (``eval()``, no parameter grads) on ``device``."""
    model = build_detection_model(min_size=min_size, max_size=max_size, **kwargs)
    if weights_path is not None:
        load_into(model, load_state_dict_file(weights_path), weights_path, "fasterrcnn_resnet50_fpn_v2")
    model.eval().requires_grad_(False)
    with torch.inference_mode(False):
        return model.to(device)


LOSS_TERMS = ("loss_classifier", "loss_objectness", "loss_rpn_box_reg")


class DetectionLoss(NetworkLoss):
    """``loss_b = Σ Faster R-CNN training losses of image b`` against the target boxes (see module doc).

    ``model``: ``load_detection_model(...)``. ``target``: a ``BoxTarget`` or the box text (then ``image_size`` and
    ``relative`` are passed to ``parse_boxes``). ``box_regression``: also add ``loss_box_reg``. ``seed``: seeds the
    proposal sampling (call ``i`` of a run uses ``seed + i``; ``reset()`` restarts the count).
    """

    def __init__(self, model: torch.nn.Module, target: Union[BoxTarget, str], *,
                 image_size: Optional[Sequence[int]] = None, relative: Optional[bool] = None,
                 box_regression: bool = False, seed: int = 0):
        if isinstance(target, str):
            target = parse_boxes(target, image_size=image_size, relative=relative)
        if not isinstance(target, BoxTarget):
            raise TypeError(f"target must be a BoxTarget or box text, got {type(target)}")
        if len(target) == 0:
            raise ValueError("no target boxes given")
        if not hasattr(model, "roi_heads") or not hasattr(model, "rpn"):
            raise TypeError(f"expected a torchvision Faster R-CNN model, got {type(model)}")
        self.model = model.eval().requires_grad_(False)
        with torch.inference_mode(False):  # normal tensors even if given under inference_mode
            self.target = BoxTarget(target.boxes.detach().clone(), target.labels.detach().clone())
        self.terms = LOSS_TERMS + (("loss_box_reg",) if box_regression else ())
        self.seed = int(seed)
        self.calls = 0

    def reset(self) -> None:
        self.calls = 0

    def _loss_mode(self) -> None:
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"decoded image must be [B,3,H,W], got shape {tuple(image.shape)}")
        if self.device != image.device:
            self.prepare(image.device)
        h, w = image.shape[-2:]
        tgt = {"boxes": self.target.to_pixels(h, w).to(device=image.device, dtype=self.dtype),
               "labels": self.target.labels.to(image.device)}
        devices = [image.device] if image.device.type == "cuda" else []
        losses = []
        self._loss_mode()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.default_generator.manual_seed(self.seed + self.calls)
                if devices:
                    with torch.cuda.device(image.device):
                        torch.cuda.manual_seed(self.seed + self.calls)
                for b in range(image.shape[0]):
                    parts = self.model([image[b].to(self.dtype)], [tgt])
                    losses.append(sum(parts[k].float() for k in self.terms))
        finally:
            self.model.eval()
            self.calls += 1
        return torch.stack(losses).to(image.device)
