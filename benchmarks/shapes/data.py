"""Synthetic scenes: one or two coloured shapes on a plain grey background, 32×32 RGB, rendered from a seed.

Every scene is a list of ``Obj`` (colour, shape, centre and *equivalent radius* in pixels: all three shapes of the
same radius ``r`` have the same area ``π r²``). Objects of one scene never overlap and have distinct colours.
Rendering is anti-aliased by 4×4 supersampling (exact coverage on a 128×128 sub-grid, averaged per pixel).

Coordinates: pixel ``j`` covers ``[j, j+1)``; a position ``u`` in pixels is ``u / 32`` in [0, 1]² (x right,
y down), so a pixel centre is ``(j + 0.5) / 32``. Ground truth (``truth``) gives per object the centroid of its
rendered coverage in [0, 1]² and its area as a fraction of the image.

Captions use a 11-word vocabulary: ``"red circle"`` or ``"blue square left of green triangle"`` (relations
``left of``, ``right of``, ``above``, ``below``, always true of the layout: the axis of the larger centre offset).
Tokens: ``[SOT, words…, PAD…]`` of fixed length ``MAX_TOKENS`` (8); the null caption (CFG) is ``[SOT, PAD…]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SIZE = 32                    # image side, pixels
SUPER = 4                    # supersampling factor per axis (anti-aliasing)
BACKGROUND = 0.5             # grey level of the background, in [0, 1]
COLOURS = ("red", "green", "blue")
RGB = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
PAD, SOT = 0, 1
WORDS = COLOURS + SHAPES + ("left", "right", "of", "above", "below")
VOCAB = ("<pad>", "<sot>") + WORDS
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
MAX_TOKENS = 8               # SOT + at most 6 words + at least one PAD
RADIUS_ONE = (4.0, 7.5)      # equivalent radius range (pixels), one-object scenes
RADIUS_TWO = (4.0, 6.0)      # two-object scenes
MARGIN = 1.0                 # minimum gap (pixels) to the border and between the two bounding boxes
TWO_OBJECT_FRACTION = 0.5    # share of two-object scenes in ``sample_scenes``

# Shape geometry in units of the equivalent radius r (area π r² for all three).
SQUARE_HALF = float(np.sqrt(np.pi) / 2)                    # half side: 0.886 r
TRI_SIDE = float(np.sqrt(4 * np.pi / np.sqrt(3)))          # side of the equilateral triangle: 2.694 r
TRI_HEIGHT = TRI_SIDE * np.sqrt(3) / 2                      # 2.333 r; the centroid is 1/3 up from the base


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cx: float                # centre (centroid of the shape), pixels from the left edge
    cy: float                # pixels from the top edge
    r: float                 # equivalent radius, pixels

    def extent(self) -> tuple[float, float, float, float]:
        """Bounding box ``(left, top, right, bottom)`` in pixels."""
        if self.shape == "circle":
            return self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r
        if self.shape == "square":
            h = SQUARE_HALF * self.r
            return self.cx - h, self.cy - h, self.cx + h, self.cy + h
        half, height = TRI_SIDE * self.r / 2, TRI_HEIGHT * self.r
        return self.cx - half, self.cy - 2 * height / 3, self.cx + half, self.cy + height / 3


Scene = tuple  # tuple[Obj, ...] (one or two objects)


# ---------------------------------------------------------------------------------------------- layouts
def _place(rng: np.random.Generator, colour: str, shape: str, r: float) -> Obj:
    """A uniformly random position that keeps the shape ``MARGIN`` pixels inside the image."""
    probe = Obj(colour, shape, 0.0, 0.0, r)
    left, top, right, bottom = probe.extent()
    cx = rng.uniform(MARGIN - left, SIZE - MARGIN - right)
    cy = rng.uniform(MARGIN - top, SIZE - MARGIN - bottom)
    return Obj(colour, shape, float(cx), float(cy), r)


def _apart(a: Obj, b: Obj) -> bool:
    """Bounding boxes separated by at least ``MARGIN`` pixels along some axis."""
    al, at, ar, ab = a.extent()
    bl, bt, br, bb = b.extent()
    return al >= br + MARGIN or bl >= ar + MARGIN or at >= bb + MARGIN or bt >= ab + MARGIN


def random_scene(rng: np.random.Generator, n_objects: int) -> Scene:
    """One scene of ``n_objects`` (1 or 2) objects with distinct colours, non-overlapping."""
    colours = rng.permutation(len(COLOURS))[:n_objects]
    lo, hi = RADIUS_ONE if n_objects == 1 else RADIUS_TWO
    while True:
        objs = tuple(_place(rng, COLOURS[c], SHAPES[rng.integers(len(SHAPES))], float(rng.uniform(lo, hi)))
                     for c in colours)
        if n_objects == 1 or _apart(*objs):
            return objs


def sample_scenes(n: int, seed: int, two_fraction: float = TWO_OBJECT_FRACTION) -> list:
    """``n`` scenes from ``np.random.default_rng(seed)``; each has two objects with probability ``two_fraction``."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng, 2 if rng.random() < two_fraction else 1) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- rendering
def _grid(device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-pixel centres in pixel units, ``[S·SUPER]`` each for x and y."""
    u = (torch.arange(SIZE * SUPER, dtype=torch.float32, device=device) + 0.5) / SUPER
    return u.view(1, -1), u.view(-1, 1)


def coverage(obj: Obj) -> torch.Tensor:
    """Anti-aliased coverage ``[32, 32]`` in [0, 1] of one object (fraction of the pixel's area it covers)."""
    x, y = _grid()
    dx, dy = x - obj.cx, y - obj.cy
    if obj.shape == "circle":
        inside = dx * dx + dy * dy <= obj.r ** 2
    elif obj.shape == "square":
        inside = torch.maximum(dx.abs(), dy.abs()) <= SQUARE_HALF * obj.r
    else:
        height = TRI_HEIGHT * obj.r
        y_rel = dy + 2 * height / 3  # 0 at the apex, `height` at the base
        inside = (y_rel <= height) & (dx.abs() <= y_rel / np.sqrt(3))
    sub = inside.float().view(SIZE, SUPER, SIZE, SUPER)
    return sub.mean(dim=(1, 3))


def render(scenes) -> torch.Tensor:
    """RGB images ``[N, 3, 32, 32]`` in [0, 1]: grey background, each object painted over it by its coverage."""
    out = torch.full((len(scenes), 3, SIZE, SIZE), BACKGROUND)
    for i, scene in enumerate(scenes):
        for obj in scene:
            a = coverage(obj)
            rgb = torch.tensor(RGB[obj.colour]).view(3, 1, 1)
            out[i] = out[i] * (1 - a) + rgb * a
    return out


def to_latent(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] → the model's [-1, 1] (the latent is the image itself)."""
    return image * 2.0 - 1.0


def decode(latent: torch.Tensor) -> torch.Tensor:
    """Latent ``[B,3,32,32]`` in [-1, 1] → RGB in [0, 1] (not clamped, so gradients survive)."""
    return (latent + 1.0) * 0.5


# ---------------------------------------------------------------------------------------------- ground truth
def truth(scene: Scene) -> list[dict]:
    """Per object: colour, shape, centroid ``(x, y)`` in [0, 1]² of its rendered coverage, area (image fraction)."""
    x, y = (torch.arange(SIZE, dtype=torch.float32) + 0.5) / SIZE, (torch.arange(SIZE, dtype=torch.float32) + 0.5) / SIZE
    out = []
    for obj in scene:
        a = coverage(obj)
        m = float(a.sum())
        out.append({"colour": obj.colour, "shape": obj.shape,
                    "centroid": (float((a.sum(0) * x).sum()) / m, float((a.sum(1) * y).sum()) / m),
                    "area": m / SIZE ** 2})
    return out


# ---------------------------------------------------------------------------------------------- captions
def relation(a: Obj, b: Obj) -> str:
    """Where ``a`` is relative to ``b``: along the axis of the larger centre offset."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def caption(scene: Scene, colourless=()) -> str:
    """``"red circle"`` or ``"red circle left of blue square"`` (objects in scene order); the objects whose index is
    in ``colourless`` are named by their shape only (``"circle left of blue square"``)."""
    names = [o.shape if i in colourless else f"{o.colour} {o.shape}" for i, o in enumerate(scene)]
    if len(scene) == 1:
        return names[0]
    return f"{names[0]} {relation(scene[0], scene[1])} {names[1]}"


def tokenize(text: str) -> list[int]:
    """``[SOT, word ids…, PAD…]`` of length ``MAX_TOKENS``; ``""`` gives the null caption."""
    words = text.split()
    if len(words) > MAX_TOKENS - 1:
        raise ValueError(f"caption {text!r} has {len(words)} words; at most {MAX_TOKENS - 1} fit")
    unknown = [w for w in words if w not in WORD_ID]
    if unknown:
        raise ValueError(f"unknown words {unknown} in {text!r}; vocabulary: {WORDS}")
    ids = [SOT] + [WORD_ID[w] for w in words]
    return ids + [PAD] * (MAX_TOKENS - len(ids))


def tokens(captions) -> torch.Tensor:
    """``[N, MAX_TOKENS]`` int64 token ids of the captions."""
    return torch.tensor([tokenize(c) for c in captions], dtype=torch.long)


def object_positions(scene: Scene, colourless=()) -> list[dict]:
    """Per object of ``caption(scene, colourless)``: token positions ``{"colour": i, "shape": j}`` (SOT is position
    0; ``"colour"`` is None for an object named by its shape only)."""
    n = len(caption(scene, colourless).split())
    shapes = [1 if 0 in colourless else 2] + ([n] if len(scene) > 1 else [])
    return [{"colour": None if i in colourless else p - 1, "shape": p} for i, p in enumerate(shapes)]


def word_positions(text: str, word: str) -> list[int]:
    """Token positions of ``word`` in the tokenized ``text`` (SOT is position 0)."""
    return [i + 1 for i, w in enumerate(text.split()) if w == word]


def batch(n: int, seed: int, two_fraction: float = TWO_OBJECT_FRACTION):
    """``(latents [n,3,32,32] in [-1,1], tokens [n,8], scenes)`` — the training / evaluation unit."""
    scenes = sample_scenes(n, seed, two_fraction)
    return to_latent(render(scenes)), tokens([caption(s) for s in scenes]), scenes
