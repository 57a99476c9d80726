"""A picture of a guided run: each term's loss per step (and per recurrence / backward step), the guidance window
shaded, and the run's summary lines as the caption. Pillow only; returned as a ComfyUI IMAGE ``[1, H, W, 3]``."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
          (227, 119, 194), (127, 127, 127)]
# The picture is 720 px wide and the example workflows preview it about 520 px wide (PREVIEW_WIDTH): the fonts are
# sized so that the smallest text is still ≥ 12 px high there.
WIDTH, PANEL, PAD, LEFT = 720, 200, 16, 96
PREVIEW_WIDTH = 520
FONT_TITLE, FONT_TEXT, FONT_TICK = 24, 20, 18
LINE = 28
WINDOW_GREY = (232, 232, 232)


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


def _vertical_text(img: Image.Image, xy: tuple, text: str, font, fill="black"):
    """``text`` rotated 90° (reading upwards), its top-left corner at ``xy``."""
    box = font.getbbox(text)
    w, h = box[2] - box[0] + 2, box[3] + 4
    label = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(label).text((0, 0), text, fill=fill, font=font)
    img.paste(label.rotate(90, expand=True), xy)


def _wrap(text: str, font, width: float) -> list:
    """``text`` broken at spaces into lines no wider than ``width`` px."""
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line]


def render(trace: list, lines: list, *, steps: int, window: tuple = (0.0, 1.0), repeats: int = 1,
           backward_steps: int = 0, term_windows: dict | None = None, title: str = "Universal Guidance run",
           layout: dict | None = None):
    """The report picture as a float tensor ``[1, H, W, 3]`` in [0, 1]. One panel per guidance term: its loss
    per step (line; backward steps as grey dots), the steps where guidance ran shaded grey, the term's own window
    as a coloured bar under the panel; a legend explains both. ``layout``, when given, receives the boxes drawn
    (``plots``, ``labels``: ``[x0, y0, x1, y1]``) and the font sizes, for tests."""
    names = []
    for entry in trace:
        for name in entry["terms"]:
            if name not in names:
                names.append(name)
    f, fs, ft = _font(FONT_TEXT), _font(FONT_TICK), _font(FONT_TITLE)
    caption = list(lines) + [f"{steps} steps, k = {repeats}"
                             + (f", {backward_steps} backward steps (grey dots)" if backward_steps else "")]
    caption = [part for text in caption for part in _wrap(str(text), f, WIDTH - 2 * PAD)]
    label_h = LINE + 4
    height = PAD + LINE + 6 + LINE * len(caption) + LINE + 8 + max(len(names), 1) * (label_h + PANEL + 14 + PAD) \
        + LINE + PAD
    img = Image.new("RGB", (WIDTH, height), "white")
    d = ImageDraw.Draw(img)
    boxes = {"plots": [], "labels": [], "fonts": (FONT_TITLE, FONT_TEXT, FONT_TICK)}
    y = PAD
    d.text((PAD, y), title, fill="black", font=ft)
    y += LINE + 6
    for text in caption:
        d.text((PAD, y), text, fill="black", font=f)
        y += LINE
    # Legend: the grey band and the coloured bar.
    d.rectangle([PAD, y + 6, PAD + 28, y + 22], fill=WINDOW_GREY, outline=(160, 160, 160))
    d.text((PAD + 36, y + 2), "guided steps", fill="black", font=fs)
    lx = PAD + 36 + int(fs.getlength("guided steps")) + 24
    d.rectangle([lx, y + 16, lx + 28, y + 22], fill=COLORS[0])
    d.text((lx + 36, y + 2), "the term's own window", fill="black", font=fs)
    y += LINE + 8
    if not names:
        d.text((LEFT, y + 40), "no guided evaluation in this run", fill="gray", font=f)
        d.text((LEFT, y + 40 + LINE), "(window empty, or strength 0)", fill="gray", font=f)
    x0, x1 = LEFT, WIDTH - PAD

    def px(step_pos: float) -> float:
        return x0 + (x1 - x0) * step_pos / max(steps, 1)

    for k, name in enumerate(names):
        color = COLORS[k % len(COLORS)]
        label = f"{name}: loss"
        d.text((x0, y), label, fill=color, font=f)
        boxes["labels"].append([x0, y, x0 + f.getlength(label), y + LINE])
        top = y + label_h
        bottom = top + PANEL
        d.rectangle([px(window[0] * steps), top, px(window[1] * steps), bottom], fill=WINDOW_GREY)
        if term_windows and name in term_windows:
            a, b = term_windows[name]
            d.rectangle([px(a * steps), bottom + 4, px(b * steps), bottom + 10], fill=color)
        d.rectangle([x0, top, x1, bottom], outline=(160, 160, 160))
        boxes["plots"].append([x0, top, x1, bottom])
        points = [(_position(e, repeats, backward_steps), e["terms"][name], e["phase"]) for e in trace
                  if name in e["terms"] and np.isfinite(e["terms"][name])]
        values = [v for _, v, _ in points]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5 * (abs(lo) + 1e-6), hi + 0.5 * (abs(hi) + 1e-6)

        def py(v: float) -> float:
            return bottom - 8 - (bottom - top - 16) * (v - lo) / (hi - lo)

        for t in range(4):  # y ticks and grid lines: lo, two between, hi
            v = lo + (hi - lo) * t / 3
            d.line([(x0, py(v)), (x1, py(v))], fill=(215, 215, 215))
            text = _fmt(v)
            d.text((x0 - 6 - fs.getlength(text), py(v) - FONT_TICK / 2 - 2), text, fill="black", font=fs)
        forward = [(px(p), py(v)) for p, v, ph in points if ph == "forward"]
        if len(forward) > 1:
            d.line(forward, fill=color, width=3)
        for p, v, ph in points:
            r = 3 if ph == "forward" else 2
            d.ellipse([px(p) - r, py(v) - r, px(p) + r, py(v) + r], fill=color if ph == "forward" else (90, 90, 90))
        y = bottom + 14 + PAD
    if names:
        _vertical_text(img, (2, int(PAD + LINE * (len(caption) + 2) + 8 + label_h + PANEL // 2 - 20)), "loss", fs)
        n_ticks = min(steps, 5)
        for i in range(n_ticks + 1):
            s = round(steps * i / max(n_ticks, 1))
            text = str(s)
            d.text((px(s) - fs.getlength(text) / 2, y - PAD + 2), text, fill="black", font=fs)
        d.text((x1 - fs.getlength("step"), y + LINE - 4), "step", fill="black", font=fs)
    if layout is not None:
        layout.update(boxes)
    arr = np.asarray(img).astype(np.float32) / 255.0
    return torch.from_numpy(arr)[None]


class RunLog:
    """The reports of the runs of one SAMPLER, for ``UG Run Report`` (newest last; a few kept)."""

    def __init__(self, keep: int = 4):
        self.keep, self.runs = keep, []

    def add(self, entry: dict) -> None:
        self.runs.append(entry)
        del self.runs[:-self.keep]
