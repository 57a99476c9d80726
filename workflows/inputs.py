"""Example input images for the workflows that need one, generated (no photographs, no licences to track).

* ``segmentation_map.png``: a VOC-coloured map for ``segmentation.json`` — a standing person ((192,128,128), VOC
  class 15) on background (black), 512×512.
* ``style.png``: a swirling, brush-like colour pattern for ``style.json``, 512×512.

Face guidance needs a photo of a real face, which is not shipped: its workflow's note says which file to load.
``python workflows/build.py`` writes them into ``workflows/inputs/``; copy them into ``ComfyUI/input/``.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inputs")
PERSON = (192, 128, 128)


def segmentation_map(size: int = 512) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / size
    head = (x - 0.5) ** 2 + (y - 0.27) ** 2 <= 0.1 ** 2
    body = (np.abs(x - 0.5) <= 0.15) & (y >= 0.36) & (y <= 0.95)
    arms = (np.abs(x - 0.5) <= 0.24) & (y >= 0.38) & (y <= 0.62)
    img = np.zeros((size, size, 3), np.uint8)
    img[head | body | arms] = PERSON
    return Image.fromarray(img, "RGB")


def style_image(size: int = 512) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / size - 0.5
    r, a = np.hypot(x, y), np.arctan2(y, x)
    swirl = a + 6.0 * r + 0.6 * np.sin(18 * r)
    strokes = 0.5 + 0.5 * np.sin(40 * (x * np.cos(swirl) + y * np.sin(swirl)))
    rgb = np.stack([0.25 + 0.55 * strokes * (0.6 + 0.4 * np.sin(swirl)),
                    0.30 + 0.40 * (1 - r) * strokes,
                    0.55 + 0.45 * np.cos(swirl + r * 3)], axis=-1)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")


EXAMPLES = {"segmentation_map.png": segmentation_map, "style.png": style_image}


def write(folder: str = FOLDER) -> list:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, make in EXAMPLES.items():
        path = os.path.join(folder, name)
        make().save(path, optimize=True)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write():
        print(f"wrote {p}")
