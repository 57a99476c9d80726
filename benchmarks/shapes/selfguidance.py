"""Self-guidance benchmark on the shapes model: Move, Resize, Appearance transfer and Move + keep terms, measured.

    python -m benchmarks.shapes.selfguidance --out out/bench [--quick] [--scenes 100] [--seeds 0,1,2]

Everything runs through the engine (``guidance.sample_universal`` with the terms of ``guidance.selfguidance`` on
the adapter's denoiser, which returns ``(x̂0, Internals)`` from the same call): DDIM ``--steps`` 50, CFG 3,
guidance in the window 0 – ``--end`` (0.6) of the steps, ``strength_mode="normalized"`` unless a row says
``paper``. Per sampling seed, the unguided run of the scenes (the *twin*: the same starting noise, row by row) is
sampled first; every edit starts from the same noise.

Edits (all on the caption's first object, its colour and shape words):

* **move**: ``MoveLoss`` to the quadrant centre (0.25 / 0.75 in x and y) farthest from where the twin put the
  object, among those at least ``OTHER_CLEARANCE`` from the other object of a two-object scene (one target per
  image, ``BatchMoveLoss``);
* **resize**: ``ResizeLoss(factor)`` against the twin (``reference="original"``);
* **appearance transfer**: ``AppearanceLoss`` against a reference latent: a clean render of the same shape in a
  colour the scene does not use, at another place and size (the denoiser reads it with the image's own caption,
  as the nodes do);
* **move + keep**: move, plus ``AppearanceLoss`` (keep, against the twin) on the moved object, plus
  ``KeepShapeLoss`` + ``AppearanceLoss`` on the other object of two-object scenes (the paper's isolated edit):
  keep terms at half the move's weight (``KEEP_WEIGHTS``), and at the paper's ratios (``move_keep_paper``).

Layers: ``"auto"`` (the nodes' default: per image and token the layers with the most compact soft-thresholded
map, ``compact_layers``), against ``oracle`` (per word, the layers whose attention centroid tracks the object best,
measured here on the twins) and ``decoder`` (``up8`` + ``up16``, what the SD recipe reads).

Measured (``metrics``: the colour-mask detector and the independent shape classifier), per image against its
twin: position error to the target (move), size ratio (area guided ÷ twin), ``class_kept`` (the edited object's
largest blob classified as the twin's), ``colour_kept`` (the set of colours present equals the twin's; for a
transfer, with the object's colour swapped for the reference's), extra blobs, the pixel change outside the
object (mean |Δ| over the pixels outside both the twin's and the guided object's masks grown by 1 px, RGB in
[0, 1]), and for two-object scenes what happened to the other object. Pure self-guidance runs count their decoder
calls (``Stats.decoder_calls``): the benchmark fails if one is not 0.

Writes ``selfguidance.json``, ``selfguidance_grid.png`` and ``selfguidance_tradeoff.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

import guidance as ug
from guidance import selfguidance as sg
from guidance.objective import Guidance, GuidanceTerm

from . import adapter, data, metrics, mmdit, models, models2

SCENE_SEED = 2024                    # the probe's scenes (data.sample_scenes(n, 2024))
TARGETS = ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75))
OTHER_CLEARANCE = 0.3                # a move target keeps this distance from the other object
DECODER = ("up8", "up16")
WORDS = ("colour", "shape")
# Relative weights of the paper's isolated move (appendix of Epstein et al.: centroid 4, shape 6–15,
# appearance 12), normalised to the move term; on this model they hold the object in place (move_keep_paper row),
# so the move + keep row uses keep terms at half the move's weight.
PAPER_KEEP_WEIGHTS = {"move": 1.0, "keep_appearance": 3.0, "other_shape": 2.5, "other_appearance": 3.0}
KEEP_WEIGHTS = {"move": 1.0, "keep_appearance": 0.5, "other_shape": 0.5, "other_appearance": 0.5}
BOUND_STATS = ("bound_checked", "bound_acted", "bound_x0_acted")   # the sampler's schedule-safe bound, counted
MODELS = {"shipped": models.load_unet, "cosine": lambda: models2.load_unet(), "mmdit": lambda: mmdit.load()}
DECODERS = {"shipped": DECODER, "cosine": models2.DECODER, "mmdit": mmdit.LATE}


# ---------------------------------------------------------------------------------------------- edits
@dataclass(frozen=True)
class Edit:
    """One guided configuration: ``kind`` (move / resize / appearance / move_keep), strength and its mode,
    ``layers`` (``"auto"``, ``"oracle"``, ``"decoder"`` or a list of names), the resize ``factor``, the relative
    ``weights`` of move + keep."""

    name: str
    kind: str
    strength: float
    mode: str = "normalized"
    layers: object = "auto"
    factor: float = 2.0
    weights: tuple = tuple(KEEP_WEIGHTS.items())
    words: tuple = WORDS
    end: float | None = None
    start: float = 0.0

    def settings(self, end: float) -> ug.Settings:
        return ug.Settings(forward_strength=self.strength, strength_mode=self.mode, start_percent=self.start,
                           end_percent=self.end if self.end is not None else end)


class BatchMoveLoss(sg.MoveLoss):
    """``MoveLoss`` with one target per image: ``targets`` ``[B, 2]`` (x, y) in [0, 1]² (the engine's takes one
    (x, y) for the batch; its goal ``target.expand_as(centroid)`` broadcasts a ``[B, 1, 2]`` target)."""

    def __init__(self, tokens, layers, targets, label=""):
        super().__init__(tokens, layers, target=(0.5, 0.5), label=label)
        self.target = torch.as_tensor(np.asarray(targets, dtype=np.float32)).reshape(-1, 1, 2)


def layer_choice(layers, word: str, oracle: dict):
    """The ``layers`` argument of a term on ``word``'s token for an edit's layer setting."""
    if layers == "oracle":
        return list(oracle[word])
    if layers == "decoder":
        return list(oracle.get("decoder", DECODER))
    return layers


def word_terms(cls, name: str, positions: dict, layers, oracle: dict, weight: float, words=WORDS, **kw) -> list:
    """Terms of one object's ``words``: one term on them all (``"auto"``, a list, None), or with ``"oracle"`` one
    term per word on its own layers, the weight shared."""
    if layers == "oracle":
        return [GuidanceTerm(f"{name}.{w}", cls([positions[w]], layer_choice(layers, w, oracle), **kw),
                             weight / len(words)) for w in words]
    return [GuidanceTerm(name, cls([positions[w] for w in words], layer_choice(layers, "colour", oracle), **kw),
                         weight)]


def build_guidance(edit: Edit, scenes, ctx: dict, idx: list) -> Guidance:
    """The guidance of ``edit`` for the scenes ``idx`` (one caption layout: same token positions)."""
    pos = data.object_positions(scenes[idx[0]])
    oracle = ctx["oracle"]
    w = dict(edit.weights)
    terms = []
    if edit.kind in ("move", "move_keep"):
        targets = [ctx["targets"][i] for i in idx]
        terms += word_terms(BatchMoveLoss, "move", pos[0], edit.layers, oracle, w["move"] if edit.kind ==
                            "move_keep" else 1.0, targets=targets)
    if edit.kind == "move_keep":
        terms += word_terms(sg.AppearanceLoss, "keep_appearance", pos[0], edit.layers, oracle,
                            w["keep_appearance"], reference=sg.ORIGINAL)
        if len(pos) > 1:
            terms += word_terms(sg.KeepShapeLoss, "other_shape", pos[1], edit.layers, oracle, w["other_shape"],
                                reference=sg.ORIGINAL)
            terms += word_terms(sg.AppearanceLoss, "other_appearance", pos[1], edit.layers, oracle,
                                w["other_appearance"], reference=sg.ORIGINAL)
    if edit.kind == "resize":
        rw = {k: w[k] for k in ("shape_weight", "size_weight") if k in w}
        terms += word_terms(sg.ResizeLoss, "resize", pos[0], edit.layers, oracle, 1.0, factor=edit.factor, **rw)
    if edit.kind in ("appearance", "appearance_keep"):
        ref = ctx["reference_latents"][idx]
        # The reference is read with this image's caption: its object is named by the shape word (the reference
        # has the object's shape, not its colour), so its appearance is taken under the shape word's map.
        terms += word_terms(sg.AppearanceLoss, "appearance", pos[0], edit.layers, oracle, 1.0, edit.words,
                            reference=ref, reference_tokens=[pos[0]["shape"]],
                            mask_threshold=w.get("mask_threshold", 0.5), core=w.get("core", 0.0))
    if edit.kind == "appearance_keep":   # the paper's transfer: appearance from the reference, layout kept
        keep_words = ("shape",) if w.get("keep_words", 1.0) == 1.0 else WORDS
        terms += word_terms(sg.KeepShapeLoss, "keep_shape", pos[0], edit.layers, oracle,
                            w.get("keep_shape", 1.0), keep_words, reference=sg.ORIGINAL)
        if w.get("keep_size", 0.0):
            terms += word_terms(sg.ResizeLoss, "keep_size", pos[0], edit.layers, oracle, w["keep_size"],
                                keep_words, factor=1.0)
    if not terms:
        raise ValueError(f"unknown edit kind {edit.kind!r}")
    return Guidance(tuple(terms))


# ---------------------------------------------------------------------------------------------- sampling
def layout_groups(scenes) -> dict:
    """``{token layout: [scene indices]}``: scenes whose objects' words sit at the same positions."""
    groups = {}
    for i, s in enumerate(scenes):
        key = tuple((p["colour"], p["shape"]) for p in data.object_positions(s))
        groups.setdefault(key, []).append(i)
    return groups


def sample_rows(model, captions, noise, seed: int, steps: int, cfg: float, guidance=None, settings=None,
                stats=None, denoise_wrap=None) -> torch.Tensor:
    """Samples ``[n, 3, 32, 32]`` in [0, 1] from the given starting ``noise`` (already scaled to σ_max)."""
    denoise = adapter.make_denoiser(model, data.tokens(captions), data.tokens([""]), cfg)
    if denoise_wrap is not None:
        denoise = denoise_wrap(denoise)
    sigmas = adapter.schedule_of(model).ddim_sigmas(steps)
    with torch.no_grad():
        out = ug.sample_universal(denoise, noise.clone(), sigmas, guidance=guidance, decode=data.decode,
                                  settings=settings or ug.Settings(),
                                  parameterization=adapter.parameterization_of(model),
                                  generator=torch.Generator().manual_seed(seed + 1), stats=stats)
    return data.decode(out.clamp(-1.0, 1.0))


def run_edit(model, edit: Edit, scenes, noise, seed: int, ctx: dict, steps: int, cfg: float, end: float):
    """Every scene under ``edit`` (grouped by caption layout); returns (images [N,3,32,32] in [0,1], stats dict)."""
    images = torch.zeros(len(scenes), 3, data.SIZE, data.SIZE)
    total = ug.Stats()
    for idx in layout_groups(scenes).values():
        stats = ug.Stats()
        g = build_guidance(edit, scenes, ctx, idx)
        images[idx] = sample_rows(model, [data.caption(scenes[i]) for i in idx], noise[idx], seed, steps, cfg,
                                  guidance=g, settings=edit.settings(end), stats=stats)
        for k in ("steps", "iterations", "denoiser_calls", "denoiser_grad_calls", "reference_calls",
                  "decoder_calls", "capped_updates", "nonfinite_skips") + BOUND_STATS:
            setattr(total, k, getattr(total, k, 0) + getattr(stats, k, 0))
        total.bound_min_scale = min(getattr(total, "bound_min_scale", 1.0), getattr(stats, "bound_min_scale", 1.0))
    return images, {k: getattr(total, k, 0) for k in ("denoiser_calls", "denoiser_grad_calls", "reference_calls",
                                                      "decoder_calls", "capped_updates", "nonfinite_skips")
                    + BOUND_STATS + ("bound_min_scale",)}


def run_unguided(model, scenes, noise, seed: int, steps: int, cfg: float, window_steps: list):
    """The twins, and at each step of ``window_steps`` every layer's attention properties of every token:
    ``{step: {"centroid": [L,B,T,2], "size": [L,B,T], "auto": [L,B,T]}}`` (engine's ``centroid``, ``size``,
    ``compact_layers`` on the adapter's maps, all layers)."""
    sigmas = adapter.schedule_of(model).ddim_sigmas(steps)
    names = adapter.layer_names(model)
    wanted = {float(sigmas[i]): i for i in window_steps}
    found = {}

    def wrap(denoise):
        def recording(x, sigma, capture=None):
            i = wanted.get(float(sigma.reshape(-1)[0]))
            if i is None or capture is not None:
                return denoise(x, sigma, capture=capture) if capture is not None else denoise(x, sigma)
            x0, internals = denoise(x, sigma, capture=sg.CaptureRequest(None, False))
            maps = [internals.maps[n] for n in names]
            found[i] = {"centroid": torch.stack([sg.centroid(m) for m in maps]),
                        "size": torch.stack([sg.size(m) for m in maps]),
                        "auto": sg.compact_layers(maps)}
            return x0
        return recording

    stats = ug.Stats()
    images = sample_rows(model, [data.caption(s) for s in scenes], noise, seed, steps, cfg, stats=stats,
                         denoise_wrap=wrap)
    return images, found


# ---------------------------------------------------------------------------------------------- measuring
def hard_masks(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` bool: each colour's detector mask (score > 0.5), grown by one pixel (8-connected)."""
    scores = metrics.colour_scores(images).numpy() > metrics.THRESHOLD
    grow = np.ones((1, 1, 3, 3), dtype=bool)
    return ndimage.binary_dilation(scores, structure=grow)


def analyse(classifier, images: torch.Tensor) -> list:
    """Per image ``{colour: {"present", "area", "centroid", "blobs", "shape"}}`` for the three colours (the shape of
    the largest blob of every present colour, one classifier batch)."""
    dets = metrics.detect(images)
    crops, where = [], []
    for b, per in enumerate(dets):
        for c, d in per.items():
            if d.present and d.crop is not None:
                crops.append(d.crop)
                where.append((b, c))
    shapes = dict(zip(where, metrics.classify(classifier, crops)))
    return [{c: {"present": d.present, "area": d.area, "centroid": d.centroid, "blobs": d.blobs,
                 "largest_area": d.largest_area, "shape": shapes.get((b, c))} for c, d in per.items()} for b, per in enumerate(dets)]


def _dist(a, b) -> float:
    return float(math.hypot(a[0] - b[0], a[1] - b[1]))


def choose_targets(scenes, twin: list) -> list:
    """Per scene the move target of its first object: the quadrant centre farthest from where the twin put it,
    among those ``OTHER_CLEARANCE`` away from the twin's other object (all four when none qualifies)."""
    out = []
    for scene, det in zip(scenes, twin):
        here = det[scene[0].colour]["centroid"] or (0.5, 0.5)
        cands = list(TARGETS)
        if len(scene) > 1 and det[scene[1].colour]["centroid"] is not None:
            other = det[scene[1].colour]["centroid"]
            cands = [t for t in TARGETS if _dist(t, other) >= OTHER_CLEARANCE] or cands
        out.append(max(cands, key=lambda t: _dist(t, here)))
    return out


def reference_scenes(scenes, seed: int) -> list:
    """Per scene, the appearance reference: one object of the first object's shape in a colour the scene does not
    use, at a random place and size (``np.random.default_rng(seed)``)."""
    rng = np.random.default_rng(seed)
    out = []
    for scene in scenes:
        free = [c for c in data.COLOURS if c not in {o.colour for o in scene}]
        colour = free[int(rng.integers(len(free)))]
        obj = data._place(rng, colour, scene[0].shape, float(rng.uniform(*data.RADIUS_ONE)))
        out.append((obj,))
    return out


def measure(edit: Edit, scenes, twin_images, images, twin: list, guided: list, ctx: dict, seed: int) -> list:
    """Per-image records of one edit against the twins (see the module docstring)."""
    masks_t, masks_g = hard_masks(twin_images), hard_masks(images)
    rows = []
    for b, scene in enumerate(scenes):
        c_t = scene[0].colour
        c_g = ctx["reference_scenes"][b][0].colour if edit.kind.startswith("appearance") else c_t
        dt, dg = twin[b][c_t], guided[b][c_g]
        present_t = {c for c in data.COLOURS if twin[b][c]["present"]}
        present_g = {c for c in data.COLOURS if guided[b][c]["present"]}
        expected = (present_t - {c_t}) | {c_g} if edit.kind.startswith("appearance") and c_t in present_t else present_t
        union = masks_t[b, data.COLOURS.index(c_t)] | masks_g[b, data.COLOURS.index(c_g)]
        diff = (images[b] - twin_images[b]).abs()                         # [3, H, W]
        outside = ~union
        rec = {"seed": seed, "scene": b, "objects": len(scene),
               "twin_present": bool(dt["present"]), "present": bool(dg["present"]),
               "twin_shape": dt["shape"], "shape": dg["shape"],
               "class_kept": bool(dt["present"] and dg["present"] and dg["shape"] == dt["shape"]),
               "colour_kept": present_g == expected,
               "twin_blobs": int(dt["blobs"]), "blobs": int(dg["blobs"]),
               "outside_change": float(diff[:, torch.from_numpy(outside)].mean()) if outside.any() else 0.0,
               "outside_changed_px": float((diff.amax(0)[torch.from_numpy(outside)] > 0.1).float().mean())
               if outside.any() else 0.0}
        if dt["present"] and dg["present"]:
            rec["area_ratio"] = dg["area"] / dt["area"]
            rec["largest_ratio"] = dg["largest_area"] / max(dt["largest_area"], 1e-9)
            rec["shift"] = _dist(dg["centroid"], dt["centroid"])
        if edit.kind in ("move", "move_keep") and dt["centroid"] is not None:
            target = ctx["targets"][b]
            rec["target"] = list(target)
            rec["error_unguided"] = _dist(dt["centroid"], target)
            if dg["centroid"] is not None:
                rec["error"] = _dist(dg["centroid"], target)
        if edit.kind.startswith("appearance"):
            rec["old_colour_present"] = bool(guided[b][c_t]["present"])
            rec["transferred"] = bool(dg["present"] and not guided[b][c_t]["present"])
        if len(scene) > 1:
            o_t, o_g = twin[b][scene[1].colour], guided[b][scene[1].colour]
            if o_t["present"]:
                rec["other_class_kept"] = bool(o_g["present"] and o_g["shape"] == o_t["shape"])
                if o_g["present"]:
                    rec["other_shift"] = _dist(o_g["centroid"], o_t["centroid"])
                    rec["other_area_ratio"] = o_g["area"] / o_t["area"]
        rows.append(rec)
    return rows


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(float(np.mean(xs)), 4) if xs else None


def summarise(rows: list, edit: Edit) -> dict:
    """The per-edit numbers of the JSON from the per-image records of every seed."""
    base = [r for r in rows if r["twin_present"]]
    both = [r for r in base if r["present"]]
    out = {"n": len(rows), "n_twin_present": len(base),
           "class_kept": _mean([r["class_kept"] for r in base]),
           "colour_kept": _mean([r["colour_kept"] for r in rows]),
           "object_present": _mean([r["present"] for r in base]),
           "size_ratio": _mean([r["area_ratio"] for r in both]),
           "size_ratio_median": round(float(np.median([r["area_ratio"] for r in both])), 4) if both else None,
           "largest_ratio": _mean([r["largest_ratio"] for r in both]),
           "largest_ratio_median": round(float(np.median([r["largest_ratio"] for r in both])), 4) if both else None,
           "shift_from_twin": _mean([r["shift"] for r in both]),
           "extra_blobs": _mean([r["blobs"] > 1 for r in base]),
           "extra_blobs_twin": _mean([r["twin_blobs"] > 1 for r in base]),
           "outside_change": _mean([r["outside_change"] for r in rows]),
           "outside_changed_px": _mean([r["outside_changed_px"] for r in rows])}
    out["area_growth"] = out["size_ratio"]
    two = [r for r in rows if "other_class_kept" in r]
    if two:
        out["other_object"] = {"n": len(two), "class_kept": _mean([r["other_class_kept"] for r in two]),
                               "shift": _mean([r.get("other_shift") for r in two]),
                               "size_ratio": _mean([r.get("other_area_ratio") for r in two])}
    if edit.kind in ("move", "move_keep"):
        m = [r for r in rows if "error" in r]
        eu, eg = _mean([r["error_unguided"] for r in m]), _mean([r["error"] for r in m])
        out.update({"unguided_error": eu, "guided_error": eg,
                    "error_reduction": round(eu / eg, 3) if eu and eg else None,
                    "within_0.1": _mean([r["error"] < 0.1 for r in m])})
        per_seed = {}
        for s in sorted({r["seed"] for r in m}):
            ms = [r for r in m if r["seed"] == s]
            per_seed[str(s)] = round(float(np.mean([r["error_unguided"] for r in ms]) /
                                           max(np.mean([r["error"] for r in ms]), 1e-9)), 3)
        out["error_reduction_per_seed"] = per_seed
    if edit.kind == "resize":
        out["size_target"] = edit.factor
    if edit.kind.startswith("appearance"):
        out["transferred"] = _mean([r["transferred"] for r in rows])
        out["old_colour_present"] = _mean([r["old_colour_present"] for r in rows])
    return out


def layer_report(records: list, window_steps: list, steps: int, names: tuple = models.LAYERS,
                 decoder: tuple = DECODER) -> dict:
    """Per (layer, word): centroid-vs-object Pearson r (x and y averaged) by step and averaged over the window,
    the mean soft size, how often ``"auto"`` counts the layer; the oracle layers per word; auto's agreement.

    ``records``: per seed (scenes, twin analysis, captured properties)."""
    rows = {}
    for li, layer in enumerate(names):
        for word in WORDS:
            by_step, sizes, picks = {}, [], []
            for step in window_steps:
                att, obj = [], []
                for scenes, twin, found in records:
                    f = found[step]
                    for b, scene in enumerate(scenes):
                        for k, pos in enumerate(data.object_positions(scene)):
                            det = twin[b][scene[k].colour]
                            if det["centroid"] is None:
                                continue
                            t = pos[word]
                            att.append(f["centroid"][li, b, t].tolist())
                            obj.append(det["centroid"])
                            sizes.append(float(f["size"][li, b, t]))
                            picks.append(float(f["auto"][li, b, t]))
                a, o = np.asarray(att), np.asarray(obj)
                rs = [float(np.corrcoef(a[:, d], o[:, d])[0, 1]) if a[:, d].std() > 0 and o[:, d].std() > 0
                      else float("nan") for d in (0, 1)]
                by_step[step] = round(float(np.mean(rs)), 4)
            finite = [v for v in by_step.values() if np.isfinite(v)]
            rows[f"{layer}/{word}"] = {"layer": layer, "word": word, "r_by_step": by_step,
                                       "r_window": round(float(np.mean(finite)), 4) if finite else None,
                                       "soft_size": round(float(np.mean(sizes)), 4),
                                       "auto_picked": round(float(np.mean(picks)), 4)}
    oracle = {}
    for word in WORDS:
        cand = sorted(((v["r_window"], v["layer"]) for v in rows.values() if v["word"] == word and
                       v["r_window"] is not None), reverse=True)
        best = cand[0][0]
        oracle[word] = [layer for r, layer in cand if r >= best - 0.03]
    agree = {}
    for word in WORDS:
        picked = {layer: rows[f"{layer}/{word}"]["auto_picked"] for layer in names}
        agree[word] = {"picks_oracle_best": picked[oracle[word][0]],
                       "picks_decoder": round(max(picked[x] for x in decoder), 4),
                       "most_picked": max(picked, key=picked.get)}
    return {"window_steps": window_steps, "mid_step": window_steps[len(window_steps) // 2],
            "rows": rows, "oracle": oracle, "auto_agreement": agree,
            "note": "r: Pearson correlation of the attention centroid (engine's centroid, min-max normalised map) "
                    "at each step of the guided window with the twin's final detected object centroid, x and y "
                    "averaged; soft_size: engine's size(); auto_picked: fraction of (step, object) where "
                    "compact_layers counts the layer for that word"}


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


# ---------------------------------------------------------------------------------------------- main
def _floats(text: str) -> list:
    return [float(s) for s in text.split(",") if s.strip()]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--quick", action="store_true", help="30 scenes, seed 0, a 3-point sweep (about 5 min)")
    ap.add_argument("--scenes", type=int, default=100)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--end", type=float, default=0.6, help="guidance window 0 – end (fraction of the steps)")
    ap.add_argument("--strength", type=float, default=0.1, help="normalized strength of the headline rows")
    ap.add_argument("--resize-factor", type=float, default=2.0)
    ap.add_argument("--resize-strength", type=float, default=1.0,
                    help="normalized strength of the Resize rows (the shape target needs more than Move's 0.1: at "
                         "0.1 and 0.3 the object grows 1.0x and 1.2x)")
    ap.add_argument("--resize-sweep", default="0.3,0.5", help="Resize strengths of its trade-off (sweep seeds)")
    ap.add_argument("--appearance-strength", type=float, default=1.0,
                    help="normalized strength of the appearance-transfer row (0.3 leaves the colour mixed)")
    ap.add_argument("--sweep", default="0.03,0.05,0.1,0.2,0.4", help="normalized strengths of Move's sweep")
    ap.add_argument("--paper-sweep", default="", help="paper-mode strengths (the paper's v) of Move's sweep")
    ap.add_argument("--sweep-seeds", default="0", help="seeds of the sweep's extra points")
    ap.add_argument("--layer-seeds", default="", help="seeds of the layer comparison (default: --seeds)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid-rows", type=int, default=10)
    ap.add_argument("--model", choices=sorted(MODELS), default="shipped",
                    help="shipped: models.ShapesUNet (scaled-linear ε); cosine: models2.ShapesUNetV (cosine to "
                         "σ 316, v-prediction, other layers); mmdit: mmdit.ShapesMMDiT (rectified flow, joint "
                         "attention; its 'decoder' rows read the last blocks, mmdit.LATE)")
    ap.add_argument("--rows", default="", help="comma-separated edit names to run (default: every row)")
    ap.add_argument("--name", default="", help="stem of the output files (default: selfguidance, "
                                               "selfguidance_cosine for --model cosine)")
    args = ap.parse_args(argv)
    if args.quick:
        args.scenes, args.seeds, args.sweep, args.paper_sweep = 30, "0", "0.05,0.1,0.3", ""
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    sweep_seeds = [int(s) for s in args.sweep_seeds.split(",") if s.strip() and int(s) in seeds] or seeds[:1]
    layer_seeds = [int(s) for s in (args.layer_seeds or args.seeds).split(",") if s.strip() and int(s) in seeds]
    t0, cpu0 = time.time(), time.process_time()
    model, classifier = MODELS[args.model](), models.load_classifier()
    names = adapter.layer_names(model)
    decoder = DECODERS[args.model]
    stem = args.name or ("selfguidance" if args.model == "shipped" else f"selfguidance_{args.model}")
    scenes = data.sample_scenes(args.scenes, SCENE_SEED)
    n_guided = sum(1 for i in range(args.steps) if i / args.steps < args.end)
    window = list(range(n_guided))
    s = args.strength
    rs = args.resize_strength
    headline = [Edit("move", "move", s), Edit("resize", "resize", rs, factor=args.resize_factor),
                Edit("appearance", "appearance", args.appearance_strength), Edit("move_keep", "move_keep", s),
                Edit("move_keep_paper", "move_keep", s, weights=tuple(PAPER_KEEP_WEIGHTS.items()))]
    layer_rows = [Edit("move_oracle", "move", s, layers="oracle"), Edit("move_decoder", "move", s, layers="decoder")]
    sweep = [Edit(f"sweep_normalized_{v:g}", "move", v) for v in _floats(args.sweep) if v != s] + \
            [Edit(f"sweep_paper_{v:g}", "move", v, mode="paper") for v in _floats(args.paper_sweep)] + \
            [Edit("resize_size_only", "resize", rs, factor=args.resize_factor,
                  weights=(("shape_weight", 0.0), ("size_weight", 1.0)))] + \
            [Edit(f"resize_{v:g}", "resize", v, factor=args.resize_factor) for v in _floats(args.resize_sweep)
             if v != rs]
    plan = [(e, seeds) for e in headline] + [(e, layer_seeds) for e in layer_rows] + [(e, sweep_seeds) for e in sweep]
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = sorted(set(wanted) - {e.name for e, _ in plan})
        if unknown:
            raise SystemExit(f"--rows: unknown rows {unknown}; rows: {[e.name for e, _ in plan]}")
        plan = [(e, ss) for e, ss in plan if e.name in wanted]

    per_edit = {e.name: [] for e, _ in plan}
    costs = {e.name: {"seconds": 0.0, "cpu_seconds": 0.0, "denoiser_calls": 0, "denoiser_grad_calls": 0,
                      "reference_calls": 0, "decoder_calls": 0, "capped_updates": 0, "nonfinite_skips": 0,
                      **{k: 0 for k in BOUND_STATS}, "bound_min_scale": 1.0}
             for e, _ in plan}
    layer_records, unguided_quality, pictures = [], [], {}
    refs = reference_scenes(scenes, SCENE_SEED + 1)
    ref_latents = data.to_latent(data.render(refs))
    for seed in seeds:
        sigma_max = float(adapter.schedule_of(model).ddim_sigmas(args.steps)[0])
        noise = adapter.initial_noise(len(scenes), seed, sigma_max)
        ts, tc = time.time(), time.process_time()
        twin_images, found = run_unguided(model, scenes, noise, seed, args.steps, args.cfg, window)
        twin = analyse(classifier, twin_images)
        unguided_quality += metrics.judge(classifier, twin_images, scenes)
        layer_records.append((scenes, twin, found))
        print(f"seed {seed}: unguided in {time.time() - ts:.0f}s ({time.process_time() - tc:.0f} CPU-s)", flush=True)
        if seed == seeds[0]:
            layers_now = layer_report(layer_records, window, args.steps, names, decoder)
        ctx = {"targets": choose_targets(scenes, twin), "reference_scenes": refs, "reference_latents": ref_latents,
               "oracle": {**layers_now["oracle"], "decoder": decoder}}
        if seed == seeds[0]:
            pictures = {"unguided": twin_images, "reference": data.render(refs), "targets": ctx["targets"]}
        for edit, edit_seeds in plan:
            if seed not in edit_seeds:
                continue
            ts, tc = time.time(), time.process_time()
            images, stats = run_edit(model, edit, scenes, noise, seed, ctx, args.steps, args.cfg, args.end)
            if stats["decoder_calls"] != 0:
                raise AssertionError(f"{edit.name}: pure self-guidance ran the decoder {stats['decoder_calls']} times")
            guided = analyse(classifier, images)
            rows = measure(edit, scenes, twin_images, images, twin, guided, ctx, seed)
            per_edit[edit.name] += rows
            c = costs[edit.name]
            c["seconds"] += time.time() - ts
            c["cpu_seconds"] += time.process_time() - tc
            for k, v in stats.items():
                c[k] = min(c[k], v) if k == "bound_min_scale" else c[k] + v
            if seed == seeds[0] and edit.name in ("move", "resize", "appearance", "move_keep"):
                pictures[edit.name] = images
            quick = summarise(rows, edit)
            print(f"  {edit.name:26s} seed {seed}: " + ", ".join(
                f"{k} {quick.get(k)}" for k in ("error_reduction", "class_kept", "colour_kept", "size_ratio",
                                                "largest_ratio", "extra_blobs", "extra_blobs_twin",
                                                "outside_change", "transferred") if k in quick) +
                f" ({time.time() - ts:.0f}s)", flush=True)

    layers = layer_report(layer_records, window, args.steps, names, decoder)
    edits = {}
    for edit, edit_seeds in plan:
        summ = summarise(per_edit[edit.name], edit)
        cost = costs[edit.name]
        edits[edit.name] = {"edit": {**asdict(edit), "weights": dict(edit.weights) if edit.kind == "move_keep"
                                     else None},
                            "seeds": edit_seeds, "scenes": args.scenes, **summ,
                            **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in cost.items()}}
    sweep_points = {"normalized": [], "paper": []}
    for name, e in edits.items():
        if e["edit"]["kind"] != "move" or e["edit"]["layers"] != "auto":
            continue
        if name != "move" and not name.startswith("sweep_"):
            continue
        row = {"strength": e["edit"]["strength"], "seeds": e["seeds"], "n": e["n"]}
        if name == "move":   # the headline point, on the sweep's seeds only
            sub = [r for r in per_edit["move"] if r["seed"] in sweep_seeds]
            e = {**e, **summarise(sub, Edit("move", "move", s))}
            row["seeds"], row["n"] = sweep_seeds, len(sub)
        for k in ("error_reduction", "unguided_error", "guided_error", "class_kept", "colour_kept", "size_ratio",
                  "extra_blobs", "outside_change", "outside_changed_px"):
            row[k] = e.get(k)
        row["other_object_shift"] = (e.get("other_object") or {}).get("shift")
        sweep_points[e["edit"]["mode"]].append(row)
    sweep_points = {k: sorted(v, key=lambda r: r["strength"]) for k, v in sweep_points.items() if v}
    rule = {name: {k: edits[name].get(k) for k in ("error_reduction", "class_kept", "colour_kept", "size_ratio",
                                                   "extra_blobs", "outside_change")}
            for name in ("move", "move_oracle", "move_decoder") if name in edits}
    if "move" in edits and layer_seeds != seeds:   # auto on the same seeds as the comparison
        sub = [r for r in per_edit["move"] if r["seed"] in layer_seeds]
        rule["move"] = {k: summarise(sub, Edit("move", "move", s)).get(k) for k in rule["move"]}
    layers["guided_comparison"] = {"seeds": layer_seeds, "strength": s, "oracle_layers": layers["oracle"],
                                   "decoder_layers": list(decoder), "rows": rule}
    uq = metrics.summary(unguided_quality)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} thread(s)",
        "model": args.model,
        "config": {"scenes": args.scenes, "scene_seed": SCENE_SEED, "seeds": seeds, "steps": args.steps,
                   "cfg": args.cfg, "window": [0.0, args.end], "guided_steps": n_guided, "strength": s,
                   "strength_mode": "normalized", "resize_factor": args.resize_factor, "resize_strength": args.resize_strength,
                   "appearance_strength": args.appearance_strength, "keep_weights": KEEP_WEIGHTS,
                   "paper_keep_weights": PAPER_KEEP_WEIGHTS, "targets": TARGETS,
                   "other_clearance": OTHER_CLEARANCE, "sweep_seeds": sweep_seeds, "quick": args.quick},
        "unguided": uq,
        "move": edits.get("move"), "resize": edits.get("resize"), "appearance": edits.get("appearance"),
        "move_keep": edits.get("move_keep"), "move_keep_paper": edits.get("move_keep_paper"),
        "edits": edits, "sweep": sweep_points, "layers": layers,
        "decoder_calls": {name: e["decoder_calls"] for name, e in edits.items()},
        "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - cpu0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    cols = [pictures["unguided"], pictures.get("move"), pictures.get("resize"), pictures["reference"],
            pictures.get("appearance"), pictures.get("move_keep")]
    labels = ["unguided", "move", f"resize x{args.resize_factor:g}", "appearance\nreference",
              "appearance\ntransfer", "move + keep"]
    marks = [None, pictures["targets"], None, None, None, pictures["targets"]]
    keep = [i for i, c in enumerate(cols) if c is not None]
    picture_grid([cols[i] for i in keep], [labels[i] for i in keep], args.out / f"{stem}_grid.png",
                 rows=args.grid_rows, marks=[marks[i] for i in keep])
    tradeoff_plot(sweep_points, args.out / f"{stem}_tradeoff.png",
                  f"Move (layers auto), strength sweep: {args.scenes} scenes x seeds {sweep_seeds}, "
                  f"window 0-{args.end:g} of {args.steps} DDIM steps, CFG {args.cfg:g}")
    print_table(report)
    print(f"wrote {args.out / stem}.json, {stem}_grid.png, {stem}_tradeoff.png in "
          f"{report['seconds']}s ({report['cpu_seconds']} CPU-s)")
    return report


def print_table(report: dict) -> None:
    print(f"unguided: {report['unguided']}")
    keys = ("error_reduction", "unguided_error", "guided_error", "class_kept", "colour_kept", "size_ratio",
            "largest_ratio", "extra_blobs", "extra_blobs_twin", "outside_change", "transferred", "decoder_calls",
            "cpu_seconds")
    print("edit".ljust(26) + " ".join(k[:12].rjust(12) for k in keys))
    for name, e in report["edits"].items():
        print(name.ljust(26) + " ".join(("-" if e.get(k) is None else f"{e[k]:.3f}" if isinstance(e[k], float)
                                         else str(e[k]))[:12].rjust(12) for k in keys))
    lay = report["layers"]
    print(f"oracle layers: {lay['oracle']}; auto agreement: {lay['auto_agreement']}")
    for key, r in lay["rows"].items():
        print(f"  {key:14s} r_window {r['r_window']}, r@mid {r['r_by_step'][lay['mid_step']]}, "
              f"soft size {r['soft_size']}, auto picks {r['auto_picked']}")


if __name__ == "__main__":
    main()
