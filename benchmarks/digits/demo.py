"""Demo: one row per target digit 0-9, columns unguided / forward / forward+recurrence /
forward+backward+recurrence (the quality benchmark's best recipe, 20 steps), all through
``guidance.sample_universal`` (VE, Euler/DDIM steps; 50 unless the column says otherwise).

    python -m benchmarks.digits.demo --out out/demo [--quick] [--threads 1]

Writes ``grid.png`` (samples upscaled 8×, column labels) and ``metrics.json`` (validity per column and per
digit according to the evaluator, seconds and network evaluations), and prints a validity table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import guidance as ug

from . import metrics
from .plot import grid
from .quality import BEST

S = ug.Settings
COLUMNS = [  # (label, settings, sampling steps)
    ("unguided", S(forward_strength=0.0), metrics.STEPS),
    ("forward\ns=1", S(forward_strength=1.0), metrics.STEPS),
    ("forward + recurrence\ns=1, k=3", S(forward_strength=1.0, recurrence=3), metrics.STEPS),
    # The best recipe of the quality benchmark (benchmarks/digits/quality.py, BEST).
    ("forward + backward + recurrence\n" + BEST.name.split(": ", 1)[1], BEST.settings, BEST.steps),
]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/demo"))
    ap.add_argument("--quick", action="store_true", help="2 samples per digit (default: 50, of which 5 are shown)")
    ap.add_argument("--samples", type=int, default=None, help="samples per digit for the validity table")
    ap.add_argument("--show", type=int, default=None, help="samples per digit shown in the grid")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    per_class = args.samples or (2 if args.quick else 50)
    show = min(args.show or (2 if args.quick else 5), per_class)
    bundle = metrics.load_bundle()
    targets = metrics.targets_for(per_class)
    t_all = time.perf_counter()
    columns, shown = [], []
    for label, settings, steps in COLUMNS:
        samples, stats, seconds = metrics.generate(bundle, targets, settings, seed=args.seed, steps=steps)
        with torch.no_grad():
            pred = bundle.evaluator(samples).argmax(1)
        ok = pred == targets
        name = label.replace("\n", " (") + (")" if "\n" in label else "")
        columns.append({"name": name, "settings": dataclasses.asdict(settings), "steps": steps,
                        "validity": round(float(ok.float().mean()), 4),
                        "validity_per_digit": [round(float(ok[targets == c].float().mean()), 3) for c in range(10)],
                        "seconds": round(seconds, 2), "evaluations": metrics.evaluations(stats)})
        shown.append([samples[targets == c][:show] for c in range(10)])
    rows = [[shown[c][r] for c in range(len(COLUMNS))] for r in range(10)]
    args.out.mkdir(parents=True, exist_ok=True)
    grid(rows, [label for label, _, _ in COLUMNS], [str(r) for r in range(10)], args.out / "grid.png")
    result = {"samples_per_digit": per_class, "shown_per_digit": show, "steps": metrics.STEPS, "seed": args.seed,
              "total_seconds": round(time.perf_counter() - t_all, 1), "columns": columns}
    (args.out / "metrics.json").write_text(json.dumps(result, indent=1))
    print(f"validity by the evaluator ({per_class} samples per digit, {10 * per_class} per column):")
    width = max(len(c["name"]) for c in columns)
    print(f"  {'column':{width}s} {'validity':>8s} {'seconds':>8s} {'denoiser':>8s} {'guide-net':>9s}")
    for col in columns:
        ev = col["evaluations"]
        print(f"  {col['name']:{width}s} {col['validity']:8.3f} {col['seconds']:8.1f} {ev['denoiser']:8d} "
              f"{ev['guidance_network']:9d}")
    print(f"wrote {args.out / 'grid.png'} and {args.out / 'metrics.json'} ({result['total_seconds']}s)")
    return result


if __name__ == "__main__":
    main()
