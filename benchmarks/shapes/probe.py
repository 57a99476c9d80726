"""Quality and attention-localization report of the shapes model (unguided sampling).

    python -m benchmarks.shapes.probe --out out/bench [--scenes 100] [--seeds 0,1,2] [--cfg 3] [--steps 50]

For ``--scenes`` benchmark scenes (``data.sample_scenes(n, SCENE_SEED)``: half one-object, half two-object) and
each sampling seed, the captions are sampled through the engine (``adapter.sample``: DDIM, ``--steps`` steps, CFG
``--cfg``, guidance off) and judged by ``metrics.judge`` (colour / shape / both correct, extra blobs, relation).

Localization: at the steps in ``--capture`` (indices of the 50-step schedule) the denoiser is called with a
capture; for every cross-attention layer and every caption object, the attention centroid of its colour word and
of its shape word (``centroid`` below; three map variants: ``raw`` probabilities, ``minmax`` normalised, and the
paper's ``soft`` threshold ``sigmoid(10·(minmax-0.5))``) is correlated (Pearson r, and the least-squares slope)
with the final object's detected centroid, x and y separately, over every object whose colour was detected.
Writes ``probe.json`` (all numbers) and ``samples.png`` (the first 32 samples of seed 0) into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from . import adapter, data, metrics, models
from .edits import FILES, MODELS

SCENE_SEED = 2024
CAPTURE_STEPS = (5, 15, 25, 35, 45)
VARIANTS = ("raw", "minmax", "soft")


# ---------------------------------------------------------------------------------------------- map properties
def normalise(m: torch.Tensor, variant: str) -> torch.Tensor:
    """A word's map ``[..., H, W]`` as ``raw``, ``minmax`` (to [0, 1] per map) or ``soft`` (the paper's threshold:
    ``sigmoid(10·(minmax - 0.5))``, then min-max again)."""
    if variant == "raw":
        return m
    lo, hi = m.amin(dim=(-2, -1), keepdim=True), m.amax(dim=(-2, -1), keepdim=True)
    m = (m - lo) / (hi - lo).clamp_min(1e-12)
    if variant == "minmax":
        return m
    m = torch.sigmoid(10 * (m - 0.5))
    lo, hi = m.amin(dim=(-2, -1), keepdim=True), m.amax(dim=(-2, -1), keepdim=True)
    return (m - lo) / (hi - lo).clamp_min(1e-12)


def centroid(m: torch.Tensor) -> torch.Tensor:
    """Weighted mean position ``[..., 2]`` (x, y) in [0, 1]² of maps ``[..., H, W]`` (cell centres (j+0.5)/W)."""
    h, w = m.shape[-2:]
    ys = (torch.arange(h, dtype=m.dtype) + 0.5) / h
    xs = (torch.arange(w, dtype=m.dtype) + 0.5) / w
    total = m.sum(dim=(-2, -1)).clamp_min(1e-12)
    return torch.stack([(m.sum(-2) * xs).sum(-1) / total, (m.sum(-1) * ys).sum(-1) / total], -1)


# ---------------------------------------------------------------------------------------------- sampling
def run_seed(model, scenes, seed: int, steps: int, cfg: float, capture_steps) -> tuple[torch.Tensor, dict]:
    """Sample the scenes' captions; returns (images [N,3,32,32] in [0,1], {step: {layer: {variant: [N,T,2]}}})."""
    import guidance as ug

    captions = [data.caption(s) for s in scenes]
    denoise = adapter.make_denoiser(model, data.tokens(captions), data.tokens([""]), cfg, resize=False)
    sigmas = adapter.schedule_of(model).ddim_sigmas(steps)
    wanted = {float(sigmas[i]): i for i in capture_steps}
    found = {}

    def recording(x, sigma, capture=None):
        i = wanted.get(float(sigma.reshape(-1)[0]))
        if i is None:
            return denoise(x, sigma)
        x0, internals = denoise(x, sigma, capture=True)
        found[i] = {layer: {v: centroid(normalise(m.permute(0, 3, 1, 2), v)) for v in VARIANTS}
                    for layer, m in internals.maps.items()}
        return x0

    x = adapter.initial_noise(len(scenes), seed, float(sigmas[0]))
    with torch.no_grad():
        out = ug.sample_universal(recording, x, sigmas, guidance=None, decode=data.decode, settings=ug.Settings(),
                                  parameterization=adapter.parameterization_of(model),
                                  generator=torch.Generator().manual_seed(seed + 1))
    return data.decode(out.clamp(-1, 1)), found


def _fit(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Pearson r, least-squares slope of a on b)."""
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan"), float("nan")
    r = float(np.corrcoef(a, b)[0, 1])
    return r, float(np.polyfit(b, a, 1)[0])


def localization(records, sigmas, steps: int) -> list[dict]:
    """Rows ``{step, progress, sigma, layer, word, variant, n, r_x, r_y, r, slope_x, slope_y}`` over all samples.

    ``records``: list of (scene, judged, centroids); object k's words are at ``data.object_positions``; objects
    whose colour was not detected are left out.
    """
    rows = []
    first = records[0][2]
    for step in sorted(first):
        for layer in first[step]:
            for word in ("colour", "shape"):
                for variant in VARIANTS:
                    att, obj = [], []
                    for scene, judged, cents in records:
                        for k, pos in enumerate(data.object_positions(scene)):
                            det = judged["objects"][k]
                            if det["centroid"] is None or det["area"] < metrics.MIN_AREA:
                                continue
                            att.append(cents[step][layer][variant][pos[word]].tolist())
                            obj.append(det["centroid"])
                    att, obj = np.asarray(att), np.asarray(obj)
                    rx, sx = _fit(att[:, 0], obj[:, 0])
                    ry, sy = _fit(att[:, 1], obj[:, 1])
                    rows.append(dict(step=step, progress=round(step / steps, 3), sigma=round(float(sigmas[step]), 4),
                                     layer=layer, word=word, variant=variant, n=len(att), r_x=round(rx, 4),
                                     r_y=round(ry, 4), r=round((rx + ry) / 2, 4), slope_x=round(sx, 4),
                                     slope_y=round(sy, 4)))
    return rows


def quality(records) -> dict:
    judged = [j for _, j, _ in records]
    out = {"all": metrics.summary(judged)}
    for n_obj in (1, 2):
        sub = [j for s, j, _ in records if len(s) == n_obj]
        out[f"{n_obj}_object"] = metrics.summary(sub)
    rel = [metrics.relation_ok(s, j) for s, j, _ in records if len(s) == 2]
    rel = [r for r in rel if r is not None]
    out["relation_correct"] = round(sum(rel) / max(len(rel), 1), 4)
    per_shape = {}
    for shape in data.SHAPES:
        hits = [j["objects"][k]["shape"] == shape for s, j, _ in records for k, o in enumerate(s) if o.shape == shape]
        per_shape[shape] = round(sum(hits) / max(len(hits), 1), 4)
    out["shape_accuracy_per_object"] = per_shape
    return out


def _grid(images: torch.Tensor, path: Path) -> None:
    from PIL import Image

    n = min(32, images.shape[0])
    im = (images[:n].clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).numpy()
    rows = (n + 7) // 8
    canvas = np.full((rows * 34, 8 * 34, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, 8)
        canvas[r * 34 + 1:r * 34 + 33, c * 34 + 1:c * 34 + 33] = im[i]
    Image.fromarray(canvas).resize((8 * 34 * 3, rows * 34 * 3), Image.NEAREST).save(path)


def best_rows(rows, step: int) -> list[dict]:
    """The rows at ``step``, sorted by r = (r_x + r_y)/2 (best first)."""
    sel = [r for r in rows if r["step"] == step]
    return sorted(sel, key=lambda r: -(r["r"] if np.isfinite(r["r"]) else -9))


def by_step(rows, layer: str, word: str, variant: str) -> dict:
    """``{step: r}`` of one (layer, word, variant)."""
    return {r["step"]: r["r"] for r in rows if (r["layer"], r["word"], r["variant"]) == (layer, word, variant)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--scenes", type=int, default=100)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--capture", default=",".join(map(str, CAPTURE_STEPS)), help="step indices to capture at")
    ap.add_argument("--weights", type=Path, default=models.WEIGHTS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", choices=("shipped", "cosine", "mmdit"), default="shipped",
                    help="cosine: models2.ShapesUNetV (weights/diffusion_cosine.safetensors in --weights); mmdit: "
                         "mmdit.ShapesMMDiT (rectified flow, weights/mmdit_flow.safetensors in --weights)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, meta = MODELS[args.model](args.weights), models.file_meta(args.weights / FILES[args.model])
    classifier = models.load_classifier()
    scenes = data.sample_scenes(args.scenes, SCENE_SEED)
    capture_steps = [int(s) for s in args.capture.split(",") if s.strip()]
    sigmas = adapter.schedule_of(model).ddim_sigmas(args.steps)
    records, t0, cpu0 = [], time.time(), time.process_time()
    for seed in [int(s) for s in args.seeds.split(",")]:
        images, found = run_seed(model, scenes, seed, args.steps, args.cfg, capture_steps)
        judged = metrics.judge(classifier, images, scenes)
        for b, (scene, j) in enumerate(zip(scenes, judged)):
            cents = {st: {la: {v: c[b] for v, c in vs.items()} for la, vs in ls.items()} for st, ls in found.items()}
            records.append((scene, j, cents))
        if seed == int(args.seeds.split(",")[0]):
            args.out.mkdir(parents=True, exist_ok=True)
            _grid(images, args.out / "samples.png")
        print(f"seed {seed}: {metrics.summary(judged)} ({time.time() - t0:.0f}s)", flush=True)
    rows = localization(records, sigmas, args.steps)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} thread(s)",
              "config": dict(scenes=args.scenes, scene_seed=SCENE_SEED, seeds=args.seeds, steps=args.steps,
                             cfg=args.cfg, capture_steps=capture_steps, weights_meta=meta, model=args.model),
              "quality": quality(records), "localization": rows,
              "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - cpu0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["quality"], indent=1))
    mid = capture_steps[len(capture_steps) // 2]
    print(f"localization at step {mid} (progress {mid / args.steps:.2f}), best first:")
    print(f"{'layer':7s} {'word':7s} {'variant':7s} {'r_x':>6s} {'r_y':>6s} {'slope_x':>7s} {'slope_y':>7s} {'n':>4s}")
    for r in best_rows(rows, mid):
        print(f"{r['layer']:7s} {r['word']:7s} {r['variant']:7s} {r['r_x']:6.3f} {r['r_y']:6.3f} "
              f"{r['slope_x']:7.3f} {r['slope_y']:7.3f} {r['n']:4d}")
    print("r = (r_x + r_y)/2 per captured step, for the 6 best at that step:")
    for r in best_rows(rows, mid)[:6]:
        print(f"  {r['layer']:7s} {r['word']:7s} {r['variant']:7s} " +
              " ".join(f"{st}:{v:.3f}" for st, v in by_step(rows, r['layer'], r['word'], r['variant']).items()))
    print(f"wrote {args.out / 'probe.json'} and {args.out / 'samples.png'} in {report['seconds']}s")
    return report


if __name__ == "__main__":
    main()
