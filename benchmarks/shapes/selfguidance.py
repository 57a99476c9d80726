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
import dataclasses
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import adapter, data, metrics, models
from .edits import (BOUND_STATS, DECODER, DECODERS, KEEP_WEIGHTS, MODELS, OTHER_CLEARANCE,  # noqa: F401
                    PAPER_KEEP_WEIGHTS, SCENE_SEED, TARGETS, WORDS, Edit, build_guidance, run_edit,
                    run_unguided, sample_rows)
from .evaluate import (analyse, choose_targets, layer_report, measure, reference_scenes,  # noqa: F401
                       shape_prompt_references, summarise, twin_colours)
from .pictures import picture_grid, tradeoff_plot


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
    ap.add_argument("--step-bound", type=float, default=None,
                    help="the sampler's schedule-safe bound κ of every row (default: guidance.Settings' 0.2)")
    ap.add_argument("--weights", type=Path, default=None,
                    help="folder of the diffusion model's weights (default: the shipped ones, weights/)")
    ap.add_argument("--flow-shift", type=float, default=None,
                    help="flow models: sample with SD3's time shift s (σ' = s·σ / (1 + (s − 1)·σ); default 1, none)")
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
    model, classifier = MODELS[args.model](args.weights or models.WEIGHTS), models.load_classifier()
    if args.flow_shift is not None:
        if getattr(model, "prediction", None) != "flow":
            raise SystemExit("--flow-shift: only for a flow model (--model mmdit)")
        from .adapter_flow import FlowSchedule
        model.schedule = FlowSchedule(args.flow_shift)
    names = adapter.layer_names(model)
    decoder = DECODERS[args.model]
    stem = args.name or ("selfguidance" if args.model == "shipped" else f"selfguidance_{args.model}")
    scenes = data.sample_scenes(args.scenes, SCENE_SEED)
    n_guided = sum(1 for i in range(args.steps) if i / args.steps < args.end)
    window = list(range(n_guided))
    s = args.strength
    rs = args.resize_strength
    headline = [Edit("move", "move", s), Edit("resize", "resize", rs, factor=args.resize_factor),
                Edit("appearance", "appearance", args.appearance_strength),
                Edit("appearance_shape_prompt", "appearance_keep", args.appearance_strength, words=("shape",),
                     prompt="shape"),
                Edit("move_keep", "move_keep", s),
                Edit("move_keep_paper", "move_keep", s, weights=tuple(PAPER_KEEP_WEIGHTS.items()))]
    layer_rows = [Edit("move_oracle", "move", s, layers="oracle"), Edit("move_decoder", "move", s, layers="decoder")]
    sweep = [Edit(f"sweep_normalized_{v:g}", "move", v) for v in _floats(args.sweep) if v != s] + \
            [Edit(f"sweep_paper_{v:g}", "move", v, mode="paper") for v in _floats(args.paper_sweep)] + \
            [Edit("appearance_shape_prompt_nokeep", "appearance", args.appearance_strength, words=("shape",),
                  prompt="shape")] + \
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
    if args.step_bound is not None:
        plan = [(dataclasses.replace(e, step_bound=args.step_bound), ss) for e, ss in plan]

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
        shape_twin = None
        if any(e.prompt == "shape" and seed in ss for e, ss in plan):   # the twins of a shape-only prompt
            shape_images = sample_rows(model, [data.caption(sc, (0,)) for sc in scenes], noise, seed, args.steps,
                                       args.cfg)
            shape_det = analyse(classifier, shape_images)
            colours = twin_colours(scenes, shape_det)
            srefs = shape_prompt_references(scenes, colours, SCENE_SEED + 1 + seed)
            shape_twin = (shape_images, shape_det, {**ctx, "twin_colours": colours, "reference_scenes": srefs,
                                                    "reference_latents": data.to_latent(data.render(srefs))})
            print(f"seed {seed}: shape-prompt twins drew a first object in "
                  f"{sum(c is not None for c in colours)}/{len(scenes)}", flush=True)
        if seed == seeds[0]:
            pictures = {"unguided": twin_images, "reference": data.render(refs), "targets": ctx["targets"]}
        for edit, edit_seeds in plan:
            if seed not in edit_seeds:
                continue
            ts, tc = time.time(), time.process_time()
            t_images, t_det, e_ctx = shape_twin if edit.prompt == "shape" else (twin_images, twin, ctx)
            images, stats = run_edit(model, edit, scenes, noise, seed, e_ctx, args.steps, args.cfg, args.end)
            if stats["decoder_calls"] != 0:
                raise AssertionError(f"{edit.name}: pure self-guidance ran the decoder {stats['decoder_calls']} times")
            guided = analyse(classifier, images)
            rows = measure(edit, scenes, t_images, images, t_det, guided, e_ctx, seed)
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
                   "other_clearance": OTHER_CLEARANCE, "sweep_seeds": sweep_seeds, "quick": args.quick,
                   "flow_shift": args.flow_shift, "step_bound": args.step_bound,
                   "weights": str(args.weights or models.WEIGHTS)},
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

