"""Evaluators of the shapes benchmark: a colour-mask detector and the independent shape classifier.

Detector (no learning): for colour c (channel i), the score ``clamp(img_i - max_{j≠i} img_j, 0, 1)`` equals the
object's coverage on a clean render (grey background scores 0). The hard mask is ``score > 0.5``; its
8-connected components of at least ``MIN_BLOB`` pixels are the colour's blobs. Centroid ([0, 1]², x right,
y down, pixel centres at (j+0.5)/32) and area (fraction of the image) are the score-weighted moments over the
hard mask grown by one pixel (so anti-aliased edges count). A colour is *present* when its area ≥ ``MIN_AREA``.

Shape: the largest blob of the colour, its soft score cropped to a square around the blob (side = larger bbox
side + 2 px) and resampled to 16×16 (``crop``), classified by ``models.ShapeClassifier``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from . import data
from .models import CROP, ShapeClassifier

THRESHOLD = 0.5          # hard-mask threshold on the colour score
MIN_BLOB = 4             # pixels: smaller components are specks, not blobs
MIN_AREA = 10 / 1024     # image fraction: below this a colour counts as absent (the smallest object is ~50 px)
_EIGHT = np.ones((3, 3), dtype=bool)


def colour_scores(image: torch.Tensor) -> torch.Tensor:
    """RGB ``[B,3,H,W]`` in [0, 1] → per-colour score ``[B,3,H,W]`` in [0, 1] (order of ``data.COLOURS``)."""
    img = image.float().clamp(0, 1)
    out = []
    for i in range(3):
        others = torch.cat([img[:, :i], img[:, i + 1:]], 1).amax(1)
        out.append((img[:, i] - others).clamp(0, 1))
    return torch.stack(out, 1)


@dataclass
class Detection:
    """One colour in one image: area (image fraction), centroid (x, y) in [0, 1]² (None if absent), blob count,
    the 16×16 crop of its largest blob (None if none) and that blob's own area (score-weighted over the blob grown
    by one pixel, image fraction; 0 if none)."""

    area: float
    centroid: tuple | None
    blobs: int
    crop: torch.Tensor | None
    largest_area: float = 0.0

    @property
    def present(self) -> bool:
        return self.area >= MIN_AREA


def _moments(score: np.ndarray, region: np.ndarray) -> tuple[float, tuple | None]:
    w = score * region
    m = float(w.sum())
    if m <= 0:
        return 0.0, None
    n = score.shape[0]
    u = (np.arange(n) + 0.5) / n
    return m / score.size, (float((w.sum(0) * u).sum() / m), float((w.sum(1) * u).sum() / m))


def crop(score: torch.Tensor, region: np.ndarray) -> torch.Tensor:
    """Soft score ``[H,W]`` inside ``region`` (bool [H,W]) → ``[1, 16, 16]``: the square around the region's bbox
    (side = larger side + 2 px, centred), bilinear resampling, zeros outside the image."""
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0) + 2.0
    cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
    h, w = score.shape
    lin = (torch.arange(CROP, dtype=torch.float32) + 0.5) / CROP - 0.5          # [-0.5, 0.5) of the side
    gy = ((cy + lin * side) / h) * 2 - 1                                         # align_corners=False coordinates
    gx = ((cx + lin * side) / w) * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]          # [1, CROP, CROP, 2] as (x, y)
    masked = (score.float() * torch.from_numpy(region).float())[None, None]
    return F.grid_sample(masked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def detect_colour(score: torch.Tensor) -> Detection:
    """Detection of one colour from its score map ``[H, W]``."""
    s = score.detach().cpu().float().numpy()
    hard = s > THRESHOLD
    labels, n = ndimage.label(hard, structure=_EIGHT)
    sizes = ndimage.sum_labels(hard, labels, index=np.arange(1, n + 1)) if n else np.zeros(0)
    blobs = int((sizes >= MIN_BLOB).sum())
    area, centroid = _moments(s, ndimage.binary_dilation(hard, structure=_EIGHT))
    if n == 0:
        return Detection(area, centroid, 0, None)
    largest = ndimage.binary_dilation(labels == (int(np.argmax(sizes)) + 1), structure=_EIGHT)
    return Detection(area, centroid, blobs, crop(torch.from_numpy(s), largest), _moments(s, largest)[0])


def detect(image: torch.Tensor) -> list[dict]:
    """Per image (RGB ``[B,3,H,W]`` in [0, 1]): ``{colour: Detection}`` for the three colours."""
    scores = colour_scores(image)
    return [{c: detect_colour(scores[b, i]) for i, c in enumerate(data.COLOURS)} for b in range(image.shape[0])]


def classify(classifier: ShapeClassifier, crops: list) -> list[str]:
    """Shape names for a list of ``[1,16,16]`` crops (one batch)."""
    if not crops:
        return []
    with torch.no_grad():
        idx = classifier(torch.stack(crops)).argmax(1).tolist()
    return [data.SHAPES[i] for i in idx]


def judge(classifier: ShapeClassifier, image: torch.Tensor, scenes) -> list[dict]:
    """Score images against the scenes they were asked for (caption objects).

    Per image: ``colour_ok`` (every caption colour present, no other colour present), ``shape_ok`` (the largest
    blob of every caption colour is classified as its caption shape), ``ok`` (both), ``extra_blobs`` (some caption
    colour has more than one blob), and per caption object the detected centroid / area / shape / blob count.
    """
    dets = detect(image)
    crops, where = [], []
    for b, scene in enumerate(scenes):
        for k, obj in enumerate(scene):
            d = dets[b][obj.colour]
            if d.crop is not None and d.present:
                crops.append(d.crop)
                where.append((b, k))
    shapes = dict(zip(where, classify(classifier, crops)))
    out = []
    for b, scene in enumerate(scenes):
        wanted = {o.colour for o in scene}
        colour_ok = all(dets[b][c].present == (c in wanted) for c in data.COLOURS)
        objs = [{"colour": o.colour, "shape": shapes.get((b, k)), "centroid": dets[b][o.colour].centroid,
                 "area": dets[b][o.colour].area, "blobs": dets[b][o.colour].blobs} for k, o in enumerate(scene)]
        shape_ok = all(r["shape"] == o.shape for r, o in zip(objs, scene))
        out.append({"colour_ok": colour_ok, "shape_ok": shape_ok, "ok": colour_ok and shape_ok,
                    "extra_blobs": any(r["blobs"] > 1 for r in objs), "objects": objs})
    return out


def relation_ok(scene, judged: dict) -> bool | None:
    """For a two-object scene: whether the detected centroids keep the caption's relation (None otherwise)."""
    if len(scene) != 2 or any(o["centroid"] is None for o in judged["objects"]):
        return None
    (ax, ay), (bx, by) = (o["centroid"] for o in judged["objects"])
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[data.relation(*scene)]


def summary(judged: list[dict]) -> dict:
    """Fractions over a list of ``judge`` results (``both_single_blob``: correct and one blob per caption colour)."""
    n = max(len(judged), 1)
    frac = lambda key: round(sum(bool(j[key]) for j in judged) / n, 4)
    strict = round(sum(j["ok"] and not j["extra_blobs"] for j in judged) / n, 4)
    return {"n": len(judged), "colour": frac("colour_ok"), "shape": frac("shape_ok"), "both": frac("ok"),
            "extra_blobs": frac("extra_blobs"), "both_single_blob": strict}
