"""Pillow-only drawing (matplotlib is not a dependency): bar charts of the benchmark and labelled image grids."""
from __future__ import annotations

import math
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
            best = r.get("group") == "best" if "group" in r else r["name"].startswith("best")
            colour = (150, 150, 150) if r.get("kind") == "reference" else (
                (230, 140, 40) if best else (200, 40, 40) if r.get("group") == "paper" else
                (170, 170, 170) if r.get("group") == "rejection" else (60, 110, 190))
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


def _pareto(points: list) -> list:
    """Indices of the points (cost, value, …) no other point beats in both cost (lower) and value (higher)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -float("inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_plot(records: list, path: Path, summary: dict | None = None, title: str = "",
                cost_key: str = "sd_tflop") -> Path:
    """Validity and FD against the Stable Diffusion cost per image (log TFLOP axis), one numbered point per
    sampler row with ±spread error bars, the Pareto front of each panel (stepped line), the bar (validity ≥ 0.99,
    FD ≤ 1.5 × the real-data floor, dashed) and the numbered legend below. Paper recipes are red, the best recipe
    orange, rejection sampling grey (not guidance: left out of the front), the others blue; the red dashed line is
    1/10 of the paper recipe's cost (``summary["paper_main_sd_tflop"]``); points off the FD axis are drawn at its top
    edge with an arrow."""
    rows = [r for r in records if r.get("kind") == "sampler" and _finite(r.get(cost_key))
            and _finite(r.get("validity")) and _finite(r.get("fd"))]
    f, fs, ft = font(14), font(12), font(17)
    pw, ph, left, top, gap = 560, 360, 70, 70, 90
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cols = 2
    legend_rows = (len(rows) + cols - 1) // cols
    width = left + 2 * pw + gap + 40
    height = top + ph + 60 + 20 * legend_rows + 30
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((16, 10), title, fill="black", font=ft)
    if not rows:
        d.text((left, top), "no sampler rows with a cost", fill="black", font=f)
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        return path
    costs = [r[cost_key] for r in rows]
    lo = 10 ** math.floor(math.log10(max(min(costs), 1e-3)))
    hi = 10 ** math.ceil(math.log10(max(costs) * 1.01))
    floor = (summary or {}).get("fd_floor")
    fd_bar = (summary or {}).get("fd_bar")
    finite_fd = sorted(r["fd"] for r in rows)
    # FD axis: up to the larger of 3× the bar and the median FD, so the good rows are resolved; others clip.
    fd_top = max(3 * fd_bar if _finite(fd_bar) else 0.0, finite_fd[len(finite_fd) // 2] * 1.1, 1.0)
    panels = [("validity (higher = better)", "validity", 0.0, 1.0, True),
              ("per-class FD (lower = better)", "fd", 0.0, fd_top, False)]

    def colour(r):
        if r.get("group") == "rejection":
            return (140, 140, 140)
        if r.get("group") == "paper":
            return (200, 40, 40)
        if r.get("group") == "best" or r["name"].startswith("best:"):
            return (235, 130, 20)
        return (50, 100, 190)

    for p, (head, key, vmin, vmax, higher) in enumerate(panels):
        x0 = left + p * (pw + gap)
        y0 = top
        X = lambda c: x0 + (math.log10(c) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * pw
        Y = lambda v: y0 + ph - (min(max(v, vmin), vmax) - vmin) / (vmax - vmin) * ph
        d.rectangle([x0, y0, x0 + pw, y0 + ph], outline=(120, 120, 120))
        d.text((x0, y0 - 24), head, fill="black", font=f)
        e = int(math.log10(lo))
        while 10 ** e <= hi:
            for m in (1, 2, 5):
                c = m * 10 ** e
                if lo <= c <= hi:
                    gx = X(c)
                    d.line([(gx, y0), (gx, y0 + ph)], fill=(232, 232, 232) if m > 1 else (205, 205, 205))
                    label = f"{c:g}"
                    d.text((gx - _text_w(d, label, fs) / 2, y0 + ph + 4), label, fill=(80, 80, 80), font=fs)
            e += 1
        d.text((x0 + pw / 2 - 150, y0 + ph + 22), "SD1.5 512² TFLOP per image (log)", fill="black", font=f)
        for g in range(6):
            v = vmin + (vmax - vmin) * g / 5
            gy = Y(v)
            d.line([(x0, gy), (x0 + pw, gy)], fill=(240, 240, 240))
            label = f"{v:.2f}" if key == "validity" else f"{v:.0f}"
            d.text((x0 - 8 - _text_w(d, label, fs), gy - 7), label, fill=(80, 80, 80), font=fs)
        bar = 0.99 if key == "validity" else fd_bar
        if _finite(bar):
            by = Y(bar)
            for sx in range(int(x0), int(x0 + pw), 12):
                d.line([(sx, by), (sx + 6, by)], fill=(20, 150, 60), width=2)
            d.text((x0 + 6, by + (4 if key == "validity" else -18)),
                   "validity 0.99" if key == "validity" else f"1.5 x floor = {bar:.1f}", fill=(20, 130, 50), font=fs)
        paper = (summary or {}).get("paper_main_sd_tflop")
        if _finite(paper) and lo <= paper / 10 <= hi:
            px = X(paper / 10)
            for sy in range(int(y0), int(y0 + ph), 12):
                d.line([(px, sy), (px, sy + 6)], fill=(200, 40, 40), width=1)
            d.text((px + 4, y0 + ph - 18), "1/10 paper k=10", fill=(200, 40, 40), font=fs)
        if key == "fd" and _finite(floor):
            fy = Y(floor)
            d.line([(x0, fy), (x0 + pw, fy)], fill=(150, 150, 150))
            d.text((x0 + 6, fy - 16), f"real-data floor {floor:.1f}", fill=(110, 110, 110), font=fs)
        guided = [i for i, r in enumerate(rows) if r.get("group") != "rejection"]
        front = [guided[i] for i in _pareto([(rows[i][cost_key], rows[i][key] if higher else -rows[i][key])
                                             for i in guided])]
        fx = [(X(rows[i][cost_key]), Y(rows[i][key])) for i in front]
        for (ax, ay), (bx, by) in zip(fx, fx[1:]):
            d.line([(ax, ay), (bx, ay), (bx, by)], fill=(235, 130, 20), width=2)
        for n, r in enumerate(rows):
            cx, v = X(r[cost_key]), r[key]
            sd = r.get(f"{key}_std", 0.0) or 0.0
            cy = Y(v)
            if sd > 0:
                d.line([(cx, Y(v - sd)), (cx, Y(v + sd))], fill=colour(r), width=1)
            rad = 5 if n in front else 4
            d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=colour(r),
                      outline="black" if n in front else colour(r))
            if v > vmax:  # off the top of the FD axis
                d.polygon([(cx - 4, y0 + 8), (cx + 4, y0 + 8), (cx, y0 + 1)], fill=colour(r))
            d.text((cx + 6, cy - 15), str(n + 1), fill="black", font=fs)
    ly = top + ph + 50
    colw = (width - 32) // cols
    for n, r in enumerate(rows):
        cx, cy = 16 + (n // legend_rows) * colw, ly + 20 * (n % legend_rows)
        d.ellipse([cx, cy + 4, cx + 8, cy + 12], fill=colour(r))
        name, tail = f"{n + 1}. {r['name']}", f": {r[cost_key]:.0f} TFLOP, val {r['validity']:.3f}, FD {r['fd']:.1f}"
        while _text_w(probe, name + tail, fs) > colw - 24 and len(name) > 12:
            name = name[:-2].rstrip(" …") + "…"
        d.text((cx + 14, cy), name + tail, fill="black", font=fs)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
