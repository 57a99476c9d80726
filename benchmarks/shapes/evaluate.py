"""The self-guidance benchmark's measurements: what the detector and the shape classifier see in each image, every
edit's per-image record against its unguided twin (``measure``), their summary (``summarise``), and which attention
layers track the objects (``layer_report``)."""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from . import data, metrics, models
from .edits import DECODER, TARGETS, OTHER_CLEARANCE, WORDS, Edit

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


def twin_colours(scenes, twin: list) -> list:
    """Per scene the colour the twin gave its first object when the prompt named it by its shape only: the present
    colour of largest area other than the second object's caption colour (None when there is none)."""
    out = []
    for scene, det in zip(scenes, twin):
        cands = [c for c in data.COLOURS if det[c]["present"] and (len(scene) == 1 or c != scene[1].colour)]
        out.append(max(cands, key=lambda c: det[c]["area"]) if cands else None)
    return out


def shape_prompt_references(scenes, colours: list, seed: int) -> list:
    """Per scene the appearance reference of a shape-only prompt: the first object's shape in a colour neither the
    twin's object (``colours``) nor the scene's other object has, at a random place and size."""
    rng = np.random.default_rng(seed)
    out = []
    for scene, c in zip(scenes, colours):
        used = {c} | ({scene[1].colour} if len(scene) > 1 else set())
        free = [x for x in data.COLOURS if x not in used]
        colour = free[int(rng.integers(len(free)))]
        out.append((data._place(rng, colour, scene[0].shape, float(rng.uniform(*data.RADIUS_ONE))),))
    return out


def measure(edit: Edit, scenes, twin_images, images, twin: list, guided: list, ctx: dict, seed: int) -> list:
    """Per-image records of one edit against the twins (see the module docstring)."""
    masks_t, masks_g = hard_masks(twin_images), hard_masks(images)
    rows = []
    for b, scene in enumerate(scenes):
        c_t = ctx["twin_colours"][b] if edit.prompt == "shape" else scene[0].colour
        if c_t is None:           # the twin drew no first object: counted, not measured
            rows.append({"seed": seed, "scene": b, "objects": len(scene), "twin_present": False, "present": False})
            continue
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
            rec["twin_largest_area"] = float(dt["largest_area"])
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


def largest_training_area() -> float:
    """The detector's largest-blob area (image fraction) of the largest object in the training scenes: a circle of
    equivalent radius ``RADIUS_ONE[1]`` (7.5 px; all shapes have their circle's area), centred."""
    c = data.SIZE / 2
    image = data.render([(data.Obj("red", "circle", c, c, data.RADIUS_ONE[1]),)])
    return float(metrics.detect_colour(metrics.colour_scores(image)[0, 0]).largest_area)


def summarise(rows: list, edit: Edit) -> dict:
    """The per-edit numbers of the JSON from the per-image records of every seed."""
    base = [r for r in rows if r["twin_present"]]
    both = [r for r in base if r["present"]]
    rows_all, rows = rows, [r for r in rows if "colour_kept" in r]     # measured records (a shape-only prompt's
    # twin may draw no first object: counted in n, not measured)
    out = {"n": len(rows_all), "n_twin_present": len(base),
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
        # Growth split by whether the target size exists in the training data: a twin whose area × factor exceeds
        # the largest training object's asks for an object the model has never drawn.
        limit = largest_training_area()
        for name, part in (("within_training", [r for r in both if r["twin_largest_area"] * edit.factor <= limit]),
                           ("beyond_training", [r for r in both if r["twin_largest_area"] * edit.factor > limit])):
            out[f"largest_ratio_{name}"] = {"n": len(part), "largest_ratio": _mean([r["largest_ratio"] for r in part]),
                                            "class_kept": _mean([r["class_kept"] for r in part])}
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


