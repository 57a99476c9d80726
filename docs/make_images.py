"""Regenerate the pictures of the documentation (``docs/images/*.png``) from the benchmarks' shipped models.

    .venv/bin/python docs/make_images.py [--only digits,report,selfguidance,pareto] [--work out/docs-images]

(``make docs-images``.) Every picture is made by a benchmark of this repository on the small models it ships —
nothing here uses Stable Diffusion weights:

* ``digits-demo.png``: ``make demo`` (``benchmarks/digits/demo.py``, 8×8 digits model, 50 samples per digit, 5 shown);
* ``run-report.png``: the run report of ``nodes/run_report.py`` (what the samplers' ``report`` output shows), drawn
  from the engine's trace of one guided run on the digits model with the quality benchmark's best recipe;
* ``selfguidance-grid.png``: ``benchmarks/shapes/selfguidance.py`` on the shipped 32×32 shapes model, a short run
  (8 scenes, seed 0, the four edits of the grid only);
* ``pareto.png``: ``benchmarks/digits/quality.py --quick`` (10 samples per digit, seed 0; the figures in the docs
  come from the full run: 50 samples, seeds 0–2).

About 13 minutes on a shared 2-core CPU (the Pareto run takes most of it). The pictures are written as palette PNGs (each must stay under 300 KB).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
LIMIT = 300 * 1024
JOBS = ("digits", "report", "selfguidance", "pareto")


def save_small(src: Path, dst: Path, max_width: int = 2400) -> Path:
    """Copy ``src`` to ``dst`` as an optimized PNG (≤ 256 colours where that keeps it exact enough), ≤ 300 KB."""
    from PIL import Image

    img = Image.open(src).convert("RGB")
    if img.width > max_width:
        img = img.resize((max_width, round(img.height * max_width / img.width)), Image.LANCZOS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(dst, optimize=True)
    size = dst.stat().st_size
    if size > LIMIT:
        raise SystemExit(f"{dst} is {size // 1024} KB (> {LIMIT // 1024} KB): lower max_width in docs/make_images.py")
    print(f"wrote {dst.relative_to(ROOT)} ({img.width}×{img.height}, {size // 1024} KB)", flush=True)
    return dst


def module(*args: str) -> None:
    cmd = [sys.executable, "-m", *args]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def digits(work: Path) -> None:
    module("benchmarks.digits.demo", "--out", str(work / "demo"))
    save_small(work / "demo" / "grid.png", IMAGES / "digits-demo.png")


def selfguidance(work: Path) -> None:
    module("benchmarks.shapes.selfguidance", "--out", str(work / "shapes"), "--scenes", "8", "--seeds", "0",
           "--rows", "move,resize,appearance,move_keep", "--grid-rows", "6")
    save_small(work / "shapes" / "selfguidance_grid.png", IMAGES / "selfguidance-grid.png")


def pareto(work: Path) -> None:
    module("benchmarks.digits.quality", "--quick", "--out", str(work / "quality"))
    save_small(work / "quality" / "pareto.png", IMAGES / "pareto.png")


def report(work: Path) -> None:
    """One guided run of the digits model (one sample per digit, the best recipe) drawn by the nodes' renderer."""
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from benchmarks.digits import metrics
    from benchmarks.digits.quality import BEST

    # nodes/run_report.py needs Pillow and torch only; loaded by path so that no ComfyUI is imported.
    spec = importlib.util.spec_from_file_location("ug_run_report", ROOT / "nodes" / "run_report.py")
    run_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_report)

    torch.set_num_threads(1)
    bundle = metrics.load_bundle()
    targets = metrics.targets_for(1)
    settings = BEST.settings
    started = time.perf_counter()
    _, stats, _ = metrics.generate(bundle, targets, settings, seed=0, steps=BEST.steps)
    lines = [stats.summary(time.perf_counter() - started)] + stats.notes(settings)
    image = run_report.render(stats.trace, lines, steps=stats.steps,
                              window=(settings.start_percent, settings.end_percent), repeats=settings.recurrence,
                              backward_steps=settings.backward_steps,
                              term_windows={"classifier": (0.0, 1.0)},
                              title="Universal Guidance run (digits model, best recipe)")
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "run-report.png"
    Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(raw)
    save_small(raw, IMAGES / "run-report.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(JOBS), help=f"comma-separated subset of {', '.join(JOBS)}")
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "docs-images", help="the benchmarks' raw outputs")
    args = ap.parse_args(argv)
    wanted = [j.strip() for j in args.only.split(",") if j.strip()]
    unknown = sorted(set(wanted) - set(JOBS))
    if unknown:
        raise SystemExit(f"--only: unknown {unknown}; choose from {', '.join(JOBS)}")
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    for job in wanted:
        t0 = time.time()
        globals()[job](args.work)
        print(f"{job}: {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
