"""A picture of a guided run: each term's loss per step (and per recurrence / backward step), the guidance window
shaded, and the run's summary lines as the caption. Pillow only; returned as a ComfyUI IMAGE ``[1, H, W, 3]``."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
          (227, 119, 194), (127, 127, 127)]
WIDTH, PANEL, PAD, LEFT = 720, 150, 14, 70


def _font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _position(entry: dict, repeats: int, backward_steps: int) -> float:
    """x of a trace entry in steps: step + repeat/k, backward steps spread inside their iteration."""
    x = entry["step"] + entry["repeat"] / max(repeats, 1)
    if entry["phase"] == "backward":
        x += (entry.get("inner", 0) + 1) / (max(backward_steps, 1) + 1) / max(repeats, 1)
    return x


def render(trace: list, lines: list, *, steps: int, window: tuple = (0.0, 1.0), repeats: int = 1,
           backward_steps: int = 0, term_windows: dict | None = None, title: str = "Universal Guidance run"):
    """The report picture as a float tensor ``[1, H, W, 3]`` in [0, 1]."""
    names = []
    for entry in trace:
        for name in entry["terms"]:
            if name not in names:
                names.append(name)
    f, fs, ft = _font(13), _font(11), _font(15)
    caption = [f"{title}"] + list(lines) + [
        f"steps {steps}; guided window {window[0]:g}–{window[1]:g} of the steps (shaded); k = {repeats}"
        + (f"; backward steps {backward_steps} (dots)" if backward_steps else "")]
    height = PAD + 22 * len(caption) + max(len(names), 1) * (PANEL + PAD) + 30
    img = Image.new("RGB", (WIDTH, height), "white")
    d = ImageDraw.Draw(img)
    y = PAD
    for i, text in enumerate(caption):
        d.text((PAD, y), text, fill="black", font=ft if i == 0 else f)
        y += 22
    if not names:
        d.text((LEFT, y + 40), "no guided evaluation in this run (window empty, or strength 0)", fill="gray", font=f)
    x0, x1 = LEFT, WIDTH - PAD

    def px(step_pos: float) -> float:
        return x0 + (x1 - x0) * step_pos / max(steps, 1)

    for k, name in enumerate(names):
        top, bottom = y, y + PANEL
        color = COLORS[k % len(COLORS)]
        d.rectangle([px(window[0] * steps), top, px(window[1] * steps), bottom], fill=(238, 238, 238))
        if term_windows and name in term_windows:
            a, b = term_windows[name]
            d.rectangle([px(a * steps), bottom - 5, px(b * steps), bottom], fill=tuple(int(c * 0.5 + 127) for c in color))
        d.rectangle([x0, top, x1, bottom], outline=(160, 160, 160))
        points = [(_position(e, repeats, backward_steps), e["terms"][name], e["phase"]) for e in trace
                  if name in e["terms"] and np.isfinite(e["terms"][name])]
        values = [v for _, v, _ in points]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5 * (abs(lo) + 1e-6), hi + 0.5 * (abs(hi) + 1e-6)

        def py(v: float) -> float:
            return bottom - 6 - (bottom - top - 12) * (v - lo) / (hi - lo)

        forward = [(px(p), py(v)) for p, v, ph in points if ph == "forward"]
        if len(forward) > 1:
            d.line(forward, fill=color, width=2)
        for p, v, ph in points:
            r = 2 if ph == "forward" else 1.5
            d.ellipse([px(p) - r, py(v) - r, px(p) + r, py(v) + r], fill=color if ph == "forward" else (90, 90, 90))
        d.text((x0 + 6, top + 4), f"{name}", fill=color, font=f)
        d.text((PAD, top), _fmt(hi), fill="black", font=fs)
        d.text((PAD, bottom - 14), _fmt(lo), fill="black", font=fs)
        y = bottom + PAD
    for s in range(0, steps + 1, max(1, steps // 10)):
        d.text((px(s) - 4, y - PAD + 2), str(s), fill="black", font=fs)
    d.text((x1 - 40, y + 10), "step", fill="black", font=fs)
    arr = np.asarray(img).astype(np.float32) / 255.0
    return torch.from_numpy(arr)[None]


class RunLog:
    """The reports of the runs of one SAMPLER, for ``UG Run Report`` (newest last; a few kept)."""

    def __init__(self, keep: int = 4):
        self.keep, self.runs = keep, []

    def add(self, entry: dict) -> None:
        self.runs.append(entry)
        del self.runs[:-self.keep]
