"""Pillow-only drawing (matplotlib is not a dependency): bar charts of the benchmark and labelled image grids."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


def font(size: int = 14):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def _text_w(draw: ImageDraw.ImageDraw, text: str, f) -> int:
    box = draw.textbbox((0, 0), text, font=f)
    return box[2] - box[0]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and v == v and abs(v) != float("inf")


def bar_charts(records: list, path: Path, title: str = "") -> Path:
    """Two horizontal bar charts side by side — validity (0..1, higher is better) and per-class Fréchet distance
    (lower is better) — one row per record, with the value written at the end of each bar."""
    f, ft = font(15), font(17)
    row_h, top, pad = 30, 78, 16
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_w(probe, r["name"], f) for r in records) + 2 * pad
    panel_w = 470
    width = label_w + 2 * panel_w + 3 * pad
    height = top + row_h * len(records) + 40
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 10), title, fill="black", font=ft)
    # The FD axis ends a little past the largest *guided* FD: the unguided samples aim at no class, so their
    # per-class FD is off the scale; such bars are drawn clipped (with a break mark) and labelled.
    finite = [r["fd"] for r in records if _finite(r["fd"]) and r["name"] != "unguided"] or \
        [r["fd"] for r in records if _finite(r["fd"])] or [1.0]
    fd_max = max(max(finite) * 1.15, 1e-6)
    panels = [("validity: evaluator accuracy on target (higher = better)", "validity", 1.0, "{:.3f}"),
              ("per-class Frechet distance, mean (lower = better)", "fd", fd_max, "{:.1f}")]
    for i, r in enumerate(records):
        if i % 2:
            d.rectangle([0, top + i * row_h, label_w - 6, top + (i + 1) * row_h], fill=(246, 246, 246))
        d.text((pad, top + i * row_h + 6), r["name"], fill="black", font=f)
    for p, (head, key, vmax, fmt) in enumerate(panels):
        x0 = label_w + p * (panel_w + pad)
        bar_w = panel_w - 70
        d.text((x0, 44), head, fill="black", font=f)
        for g in range(5):  # grid lines at 0, 25, 50, 75, 100 % of the axis
            gx = x0 + int(bar_w * g / 4)
            d.line([(gx, top - 4), (gx, top + row_h * len(records))], fill=(225, 225, 225))
            d.text((gx - 8, top + row_h * len(records) + 4), fmt.format(vmax * g / 4), fill=(90, 90, 90),
                   font=font(12))
        for i, r in enumerate(records):
            y = top + i * row_h
            v = r.get(key)
            colour = (150, 150, 150) if r.get("kind") == "reference" else (
                (230, 140, 40) if r["name"].startswith("best") else (60, 110, 190))
            if r["name"] == "unguided":
                colour = (120, 160, 200)
            if not _finite(v):
                d.text((x0 + 5, y + 6), "n/a", fill="black", font=f)
                continue
            w = int(bar_w * min(max(v / vmax, 0.0), 1.0))
            d.rectangle([x0, y + 5, x0 + max(w, 1), y + row_h - 5], fill=colour)
            if v > vmax:  # clipped: a white break mark near the end of the bar
                for dx in (-22, -14):
                    d.line([(x0 + w + dx, y + row_h - 4), (x0 + w + dx + 6, y + 4)], fill="white", width=3)
            d.text((x0 + w + 5, y + 6), fmt.format(v), fill="black", font=f)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def grid(rows: list, col_labels: list, row_labels: list, path: Path, scale: int = 8, gap: int = 4,
         group_gap: int = 24) -> Path:
    """``rows[r][c]`` is a ``[n, 1, 8, 8]`` tensor in [-1, 1]: for each row (target digit) and column group
    (method), ``n`` samples side by side, upscaled ``scale``× (nearest), with column and row labels."""
    f = font(15)
    n = rows[0][0].shape[0]
    h, w = rows[0][0].shape[-2:]
    cell_w, cell_h = w * scale, h * scale
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    samples_w = n * cell_w + (n - 1) * gap
    widths = [max(samples_w, max(_text_w(probe, line, f) for line in label.split("\n")[:2]) + 8)
              for label in col_labels]
    left, top = 40, 56
    xs = [left + sum(widths[:c]) + c * group_gap for c in range(len(col_labels))]
    width = xs[-1] + widths[-1] + 12
    height = top + len(rows) * (cell_h + gap) + 8
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    for c, label in enumerate(col_labels):
        for k, line in enumerate(label.split("\n")[:2]):
            d.text((xs[c] + max(0, (widths[c] - _text_w(d, line, f)) // 2), 6 + 20 * k), line, fill="black", font=f)
    for r, groups in enumerate(rows):
        y = top + r * (cell_h + gap)
        d.text((14, y + cell_h // 2 - 9), row_labels[r], fill="black", font=f)
        for c, samples in enumerate(groups):
            gx = xs[c] + (widths[c] - samples_w) // 2
            for j in range(samples.shape[0]):
                arr = ((samples[j, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
                tile = Image.fromarray(arr, mode="L").resize((cell_w, cell_h), Image.NEAREST)
                img.paste(tile.convert("RGB"), (gx + j * (cell_w + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
