"""Pictures of the self-guidance benchmark: the grid of edits and Move's strength trade-off."""
from __future__ import annotations

from pathlib import Path

from . import data

# ---------------------------------------------------------------------------------------------- pictures
def picture_grid(columns: list, labels: list, path: Path, rows: int = 8, scale: int = 4, marks=None) -> Path:
    """``columns[c]``: images ``[N, 3, 32, 32]`` in [0, 1]; the first ``rows`` images of each column, upscaled,
    with a label per column; ``marks[c]`` (optional): per image an (x, y) in [0, 1]² drawn as a cross (targets)."""
    from PIL import Image, ImageDraw

    from benchmarks.digits.plot import _text_w, font

    f = font(13)
    side, gap, top, pad = data.SIZE * scale, 6, 40, 10
    n = min(rows, columns[0].shape[0])
    width = pad * 2 + len(columns) * (side + gap)
    img = Image.new("RGB", (width, top + n * (side + gap) + pad), "white")
    d = ImageDraw.Draw(img)
    for c, (col, label) in enumerate(zip(columns, labels)):
        x0 = pad + c * (side + gap)
        for k, line in enumerate(label.split("\n")[:2]):
            d.text((x0 + max(0, (side - _text_w(d, line, f)) // 2), 4 + 16 * k), line, fill="black", font=f)
        for r in range(n):
            arr = (col[r].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((side, side), Image.NEAREST)
            y0 = top + r * (side + gap)
            img.paste(tile, (x0, y0))
            if marks is not None and marks[c] is not None:
                tx, ty = marks[c][r]
                cx, cy = x0 + tx * side, y0 + ty * side
                d.line([(cx - 6, cy), (cx + 6, cy)], fill="white", width=3)
                d.line([(cx, cy - 6), (cx, cy + 6)], fill="white", width=3)
                d.line([(cx - 5, cy), (cx + 5, cy)], fill="black", width=1)
                d.line([(cx, cy - 5), (cx, cy + 5)], fill="black", width=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def tradeoff_plot(sweeps: dict, path: Path, title: str = "") -> Path:
    """Move's strength sweep: error reduction (y) against class kept (x), one line per strength mode, each point
    labelled with its strength, area growth and extra-blob rate; dashed bars at 3× and 95 %."""
    from PIL import Image, ImageDraw

    from benchmarks.digits.plot import _text_w, font

    f, fs, ft = font(14), font(12), font(16)
    left, top, pw, ph = 80, 60, 620, 400
    img = Image.new("RGB", (left + pw + 300, top + ph + 70), "white")
    d = ImageDraw.Draw(img)
    d.text((16, 10), title, fill="black", font=ft)
    pts = [p for rows in sweeps.values() for p in rows if p.get("error_reduction")]
    xmin = min([0.8] + [p["class_kept"] for p in pts]) - 0.02
    ymax = max([4.0] + [p["error_reduction"] for p in pts]) * 1.1
    X = lambda v: left + (v - xmin) / (1.0 - xmin + 0.01) * pw
    Y = lambda v: top + ph - v / ymax * ph
    d.rectangle([left, top, left + pw, top + ph], outline=(120, 120, 120))
    for g in range(6):
        v = xmin + (1.0 - xmin) * g / 5
        d.line([(X(v), top), (X(v), top + ph)], fill=(235, 235, 235))
        d.text((X(v) - 14, top + ph + 4), f"{v:.2f}", fill=(80, 80, 80), font=fs)
    step = 1 if ymax < 8 else 2 if ymax < 16 else 5
    for v in range(0, int(ymax) + 1, step):
        d.line([(left, Y(v)), (left + pw, Y(v))], fill=(235, 235, 235))
        d.text((left - 8 - _text_w(d, f"{v}x", fs), Y(v) - 7), f"{v}x", fill=(80, 80, 80), font=fs)
    for x in range(left, left + pw, 12):
        d.line([(x, Y(3.0)), (x + 6, Y(3.0))], fill=(20, 150, 60), width=2)
    for y in range(top, top + ph, 12):
        d.line([(X(0.95), y), (X(0.95), y + 6)], fill=(20, 150, 60), width=2)
    d.text((left + 6, Y(3.0) - 18), "3x", fill=(20, 130, 50), font=fs)
    d.text((X(0.95) + 4, top + 4), "95 %", fill=(20, 130, 50), font=fs)
    d.text((left + pw / 2 - 170, top + ph + 24), "class kept (same shape as the unguided twin)", fill="black",
           font=f)
    d.text((8, top - 22), "position error: unguided / guided", fill="black", font=f)
    colours = [(50, 100, 190), (200, 40, 40), (235, 130, 20), (40, 150, 80)]
    ly = top
    for n, (mode, rows) in enumerate(sweeps.items()):
        col = colours[n % len(colours)]
        rows = [p for p in rows if p.get("error_reduction")]
        xy = [(X(p["class_kept"]), Y(p["error_reduction"])) for p in rows]
        for a, b in zip(xy, xy[1:]):
            d.line([a, b], fill=col, width=2)
        for (x, y), p in zip(xy, rows):
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=col)
            d.text((x + 6, y - 14), f"{p['strength']:g}", fill=col, font=fs)
        d.text((left + pw + 16, ly), f"{mode}:", fill=col, font=f)
        ly += 18
        for p in rows:
            d.text((left + pw + 24, ly), f"{p['strength']:g}: {p['error_reduction']:.1f}x, kept "
                   f"{p['class_kept']:.3f}, area x{p['size_ratio']:.2f}, blobs {p['extra_blobs']:.2f}",
                   fill="black", font=fs)
            ly += 16
        ly += 10
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


