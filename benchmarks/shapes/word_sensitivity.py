"""How much a shapes model's prediction depends on each word of its caption.

    python -m benchmarks.shapes.word_sensitivity [--model shipped|cosine|mmdit] [--weights DIR] [--out DIR]

For ``--scenes`` one-object scenes (``data.sample_scenes(…, SCENE_SEED)``), each rendered clean and noised to the
same signal-to-noise for every model family (flow time t: ``x = (1 − t)·x0 + t·n`` for the flow model, σ = t / (1 − t)
on the UNets' VE scale, ``x = x0 + σ·n``), the denoiser (``adapter.make_denoiser``, CFG 1) predicts x̂0 with the
true caption, with its shape word swapped for the two other shapes, and with its colour word swapped for the two
other colours. Reported per t: the mean squared difference of x̂0 (data units, [-1, 1]) between the true caption and
a swapped one, for shape and for colour. A model that draws the caption's shape has a shape figure well above zero
where the shape is not yet visible. Writes ``word_sensitivity[_MODEL].json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import adapter, data, models
from .edits import MODELS
from .selfguidance import SCENE_SEED

TIMES = (0.5, 0.7, 0.8, 0.9)


def _swapped(scene, field: str) -> list:
    """The scene's caption with its object's ``field`` ("shape" or "colour") replaced by each other value."""
    obj = scene[0]
    values = data.SHAPES if field == "shape" else data.COLOURS
    return [data.caption((data.Obj(**{**obj.__dict__, field: v}),)) for v in values if v != getattr(obj, field)]


def sensitivity(model, scenes, times=TIMES, seed: int = 0) -> dict:
    """``{t: {"shape": mse, "colour": mse}}`` averaged over the scenes and the swapped captions."""
    x0 = data.to_latent(data.render(scenes))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    flow = getattr(model, "prediction", "eps") == "flow"
    null = data.tokens([""])
    out = {}
    for t in times:
        sigma = t if flow else t / (1 - t)
        x = (1 - t) * x0 + t * noise if flow else x0 + sigma * noise
        row = {}
        for field in ("shape", "colour"):
            diffs = []
            for b, scene in enumerate(scenes):
                captions = [data.caption(scene)] + _swapped(scene, field)
                denoise = adapter.make_denoiser(model, data.tokens(captions), null, 1.0)
                xb = x[b:b + 1].expand(len(captions), -1, -1, -1)
                with torch.no_grad():
                    pred = denoise(xb, torch.full((len(captions),), sigma))
                diffs += [float((pred[i] - pred[0]).pow(2).mean()) for i in range(1, len(captions))]
            row[field] = round(sum(diffs) / len(diffs), 7)
        row["shape_over_colour"] = round(row["shape"] / max(row["colour"], 1e-12), 4)
        out[str(t)] = row
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="shipped")
    ap.add_argument("--weights", type=Path, default=None, help="folder of the weights (default: the shipped ones)")
    ap.add_argument("--scenes", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = MODELS[args.model](args.weights or models.WEIGHTS)
    scenes = [s for s in data.sample_scenes(4 * args.scenes, SCENE_SEED) if len(s) == 1][:args.scenes]
    report = {"model": args.model, "weights": str(args.weights or models.WEIGHTS), "scenes": len(scenes),
              "by_time": sensitivity(model, scenes)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "word_sensitivity" + ("" if args.model == "shipped" else f"_{args.model}")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    for t, row in report["by_time"].items():
        print(f"t {t}: shape {row['shape']:.2e}  colour {row['colour']:.2e}  shape/colour {row['shape_over_colour']}")
    return report


if __name__ == "__main__":
    main()
