"""Quality *and cost* of Universal Guidance on 8×8 digits: validity, Fréchet distance, losses and the Stable
Diffusion cost per image of every recipe, as the mean and spread over several seeds.

    python -m benchmarks.digits.quality --out out/bench [--seeds 0,1,2] [--samples 50] [--configs a,b]
                                        [--search] [--quick] [--threads 1]

For every recipe and seed, ``--samples`` digits per target class 0-9 are generated in one batch through
``guidance.sample_universal`` (VE parameterization, Euler/DDIM steps at uniformly spaced timesteps, the same initial
noise for every recipe at a given seed), guided by the cross-entropy of the guidance classifier for the target digit.
They are judged by the separate evaluator (never used for guidance):

* validity: fraction classified as the target by the evaluator;
* fd: Fréchet distance between the evaluator's 32-d penultimate features of the samples aimed at digit c and of
  the real *test* digits of class c, computed per class and then averaged over the 10 classes (lower is better;
  it depends on the sample count, so compare only runs with the same ``--samples``). Its floor: the same FD for
  ``--samples`` real *training* digits per class, mean over 20 random subsets (``floor_estimate``);
* fd_pooled: the same distance over all samples vs all test digits, class-blind;
* guide_accuracy / guide_loss: the guidance classifier's accuracy and cross-entropy (the objective) on the final
  samples; eval_loss: the evaluator's cross-entropy for the target. guide_loss ≪ eval_loss = adversarial samples;
* sd_tflop / sd_tflop_taesd: what the recipe costs per image on SD1.5 at 512² (``cost.py``): its denoiser calls,
  denoiser calls with a backward pass and guidance evaluations, priced from FLOPs counted on ComfyUI's modules,
  with the SD VAE or TAESD as the guidance decoder. Counts are per image as a batch-1 run makes them (an image
  whose backward guidance stopped early stops there); ``sd_tflop_batch`` prices the engine's batch counters (a
  stopped sample is carried until the whole batch stops) — an upper bound;
* seconds / cpu_seconds: wall and process-CPU time of the sampler call (tiny model: only the counts transfer).

Each numeric metric ``m`` is the mean over the seeds, with ``m_std`` (sample standard deviation) and the per-seed
values in ``per_seed``. A first record (``kind: "reference"``) scores ``--samples`` real *training* digits per
class (a random subset per seed) against the test digits in the same way: the floor. Writes ``quality.json``
(records), ``quality_summary.json`` (floor, bar, best recipe, its cost ratios vs the paper recipes, cost model),
``quality.png`` (bar charts) and ``pareto.png`` (validity and FD vs SD TFLOP per image, Pareto front) into
``--out``; ``--search`` runs the tuning grid instead (``search.json`` / ``search.png`` / ``search_pareto.png``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import guidance as ug

from . import cost, metrics
from .plot import bar_charts, pareto_plot


@dataclass(frozen=True)
class Recipe:
    """One row: sampler settings, the number of sampling steps, and the random augmentation of the guidance term
    (``augment`` copies per evaluation; ``geometric``: translation/resize/cutout too, else colour only)."""

    name: str
    settings: ug.Settings
    steps: int = metrics.STEPS
    augment: int = 0
    geometric: bool = False
    group: str = "config"

    @property
    def copies(self) -> int:
        """Guidance-network inputs per evaluation: augmentations × smoothing samples."""
        smooth = self.settings.smoothing_samples if self.settings.smoothing_spec.active else 1
        return max(self.augment, 1) * smooth


S = ug.Settings
R = Recipe

# The required configurations (50 steps). Strength units: "paper" mode s0 multiplies σ²·∇ₓ loss (VE), i.e. the
# paper's s(t) = s0·sqrt(1-ᾱ_t) on ε; backward_lr is in latent units ([-1, 1] pixels) per Adam step. The engine's
# default bound on a forward update (max_step=10·‖ε‖) applies: it caps some early, high-σ updates of the full-window
# rows (``capped_updates`` per seed in quality.json; s=2: ~775 of 25 000), none inside the 50-100 % window.
CONFIGS = [
    R("unguided", S(forward_strength=0.0)),
    R("forward s=0.5", S(forward_strength=0.5)),
    R("forward s=1", S(forward_strength=1.0)),
    R("forward s=2", S(forward_strength=2.0)),
    R("forward s=1 + recurrence k=3", S(forward_strength=1.0, recurrence=3)),
    R("forward s=1 + backward m=5", S(forward_strength=1.0, backward_steps=5)),
    R("forward s=1 + backward m=5 + recurrence k=3", S(forward_strength=1.0, backward_steps=5, recurrence=3)),
    R("forward s=0.5 + backward m=10 Adam lr 0.2", S(forward_strength=0.5, backward_steps=10, backward_lr=0.2)),
]

# Instructive rows: the building blocks of the best recipes.
EXTRA = [
    R("forward s=1 + recurrence k=3, steps 50-100 %", S(forward_strength=1.0, recurrence=3, start_percent=0.5),
      group="extra"),
    R("forward s=1 + backward m=3 (stop 0.01) + k=2, steps 50-100 % (50 steps)",
      S(forward_strength=1.0, recurrence=2, backward_steps=3, backward_early_stop=0.01, start_percent=0.5),
      group="extra"),
    R("normalized 0.2 + recurrence k=3", S(strength_mode="normalized", forward_strength=0.2, recurrence=3),
      group="extra"),
    R("full window: s=0.5 + backward m=5 (early stop 0.01) + recurrence k=3",
      S(forward_strength=0.5, recurrence=3, backward_steps=5, backward_early_stop=0.01), group="extra"),
    # The best recipe of the first version of this benchmark (50 steps): the quality reference for the cheap one.
    R("previous best (50 steps), s=1 + backward m=5 (stop 0.01) + k=3, steps 50-100 %",
      S(forward_strength=1.0, recurrence=3, backward_steps=5, backward_early_stop=0.01, start_percent=0.5),
      group="extra"),
]

# "Paper recipes": the official Universal Guidance SD scripts' structure — forward guidance only, on every step,
# k self-recurrences (segmentation 10, face 2, style 6), no bound on the update (the official code has none:
# max_step=0) — on this benchmark's 50 steps (the official scripts use 500: see cost.OFFICIAL and the summary,
# which prices them at their own step count too). s0 = 1 (paper unit) is the strength of the required rows.
PAPER = [
    R(f"paper recipe ({task}): forward s=1, k={k}, all steps", S(forward_strength=1.0, recurrence=k, max_step=0.0),
      group="paper")
    for task, k in (("segmentation", 10), ("face", 2), ("style", 6))
]
PAPER_MAIN = PAPER[0].name  # k = 10: the reference of the cost ratio

# The best recipe found by --search and the 3-seed checks (docs/benchmarks.md): the previous best's structure at 2/5 of the
# steps — 20 steps instead of 50, guidance in the second half only (σ ≤ 3.2), k=2 instead of 3, forward s=1 (paper
# unit) plus m=3 instead of 5 Adam steps on x̂0 that stop per sample once the cross-entropy is below 0.01
# (p(target) > 0.99). Polyak steps, augmentation and smoothing did not improve it (ABLATION).
BEST_SETTINGS = S(forward_strength=1.0, recurrence=2, backward_steps=3, backward_early_stop=0.01, start_percent=0.5)
BEST = R("best: 20 steps, s=1 + backward m=3 (stop 0.01) + k=2, steps 50-100 %", BEST_SETTINGS, steps=20,
         group="best")

# Random augmentation (Shen et al.), Polyak step sizes and TFG smoothing, alone (on the forward-only building block
# "forward s=1 + recurrence k=3, steps 50-100 %", 50 steps) and combined with the best recipe.
_FWD = S(forward_strength=1.0, recurrence=3, start_percent=0.5)
ABLATION = [
    R("fwd k=3 50-100 % + augmentation R=4 (colour)", _FWD, augment=4, group="ablation"),
    R("fwd k=3 50-100 % + augmentation R=4 (colour, shift, resize, cutout)", _FWD, augment=4, geometric=True,
      group="ablation"),
    R("fwd k=3 50-100 %, Polyak (Shen) 1.0 instead of s=1", dataclasses.replace(_FWD, strength_mode="polyak"),
      group="ablation"),
    R("fwd k=3 50-100 %, Polyak (classical, f*=0) 1.0 instead of s=1",
      dataclasses.replace(_FWD, strength_mode="polyak_loss"), group="ablation"),
    R("fwd k=3 50-100 % + smoothing 0.1 x4", dataclasses.replace(_FWD, smoothing=0.1, smoothing_samples=4),
      group="ablation"),
    R("best, Polyak backward steps (lr 1) instead of Adam",
      dataclasses.replace(BEST_SETTINGS, backward_optimizer="polyak", backward_lr=1.0), steps=20, group="ablation"),
    R("best, forward Polyak (classical) 1.0 instead of s=1",
      dataclasses.replace(BEST_SETTINGS, strength_mode="polyak_loss"), steps=20, group="ablation"),
    R("best + augmentation R=4 (colour)", BEST_SETTINGS, steps=20, augment=4, group="ablation"),
    R("best + augmentation R=4 (colour, shift, resize, cutout)", BEST_SETTINGS, steps=20, augment=4,
      geometric=True, group="ablation"),
    R("best + smoothing 0.1 x4", dataclasses.replace(BEST_SETTINGS, smoothing=0.1, smoothing_samples=4), steps=20,
      group="ablation"),
]

# Not guidance: unguided samples kept when the guidance classifier is confident (p ≥ 0.99) in a class, until every
# class has --samples of them — the diffusion model's own class-conditional distribution, which a perfect guidance
# would reproduce, and what rejection costs for a 1-in-10 target (``rejection_seed``).
REJECTION = R("rejection sampling: unguided 20 steps, keep guide p >= 0.99", S(forward_strength=0.0), steps=20,
              group="rejection")
REJECTION_CONFIDENCE = 0.99

ROWS = CONFIGS + EXTRA + PAPER + ABLATION + [BEST, REJECTION]


def _grid():
    """The cost-aware tuning grid of --search (one seed): steps, window, k, backward m / stop / optimizer,
    strength modes, augmentation and smoothing around the best recipe."""
    g = []
    base = dict(forward_strength=1.0, recurrence=2, backward_steps=3, backward_early_stop=0.01, start_percent=0.5)
    for steps in (15, 20, 25, 50):
        g.append(R(f"{steps} steps, s=1, k=2, m=3 Adam, stop 0.01, 50-100 %", S(**base), steps=steps, group="search"))
    variants = [
        ("k=1, m=5", dict(recurrence=1, backward_steps=5)), ("k=3", dict(recurrence=3)),
        ("m=2", dict(backward_steps=2)), ("m=5", dict(backward_steps=5)),
        ("stop 0.02", dict(backward_early_stop=0.02)), ("stop 0.005", dict(backward_early_stop=0.005)),
        ("lr 0.05", dict(backward_lr=0.05)), ("s=0.5", dict(forward_strength=0.5)), ("s=2", dict(forward_strength=2.0)),
        ("40-100 %", dict(start_percent=0.4)), ("60-100 %", dict(start_percent=0.6)),
        ("Polyak backward", dict(backward_optimizer="polyak", backward_lr=1.0)),
        ("Polyak backward, m=2", dict(backward_optimizer="polyak", backward_lr=1.0, backward_steps=2)),
        ("Polyak backward, stop 0.005", dict(backward_optimizer="polyak", backward_lr=1.0, backward_early_stop=0.005)),
        ("Polyak backward, 40-100 %", dict(backward_optimizer="polyak", backward_lr=1.0, start_percent=0.4)),
        ("forward Polyak (classical) 1.0", dict(strength_mode="polyak_loss")),
        ("forward Polyak (Shen) 0.3", dict(strength_mode="polyak", forward_strength=0.3)),
        ("normalized 0.1", dict(strength_mode="normalized", forward_strength=0.1)),
        ("no Jacobian, normalized 0.1", dict(strength_mode="normalized", forward_strength=0.1, jacobian=False)),
        ("backward only (s=0)", dict(forward_strength=0.0)),
        ("smoothing 0.1 x4", dict(smoothing=0.1, smoothing_samples=4)),
        ("smoothing 0.5 x4 log-mean-exp", dict(smoothing=0.5, smoothing_samples=4, smoothing_reduction="logmeanexp")),
    ]
    for label, kw in variants:
        g.append(R(f"20 steps, {label}", S(**{**base, **kw}), steps=20, group="search"))
    for geometric in (False, True):
        g.append(R(f"20 steps, augmentation R=4 ({'colour, shift, resize, cutout' if geometric else 'colour'})",
                   S(**base), steps=20, augment=4, geometric=geometric, group="search"))
    for steps in (10, 15):
        g.append(R(f"{steps} steps, Polyak backward", S(**{**base, "backward_optimizer": "polyak", "backward_lr": 1.0}),
                   steps=steps, group="search"))
    return g


SEARCH = _grid()

METRICS = ("validity", "fd", "fd_pooled", "guide_accuracy", "guide_loss", "eval_loss", "sd_tflop", "sd_tflop_taesd",
           "sd_tflop_batch", "seconds", "cpu_seconds", "samples_generated")


def clean(obj):
    """JSON-safe copy: non-finite floats (an FD with too few samples) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def machine() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def run_seed(bundle, recipe: Recipe, per_class: int, seed: int, parts: dict) -> dict:
    """One recipe at one seed: metrics, engine counters, per-image counts and their SD price."""
    targets = metrics.targets_for(per_class)
    info = {}
    samples, stats, seconds = metrics.generate(bundle, targets, recipe.settings, seed=seed, steps=recipe.steps,
                                               augment=recipe.augment, geometric=recipe.geometric, info=info)
    record = metrics.score(bundle, samples, targets)
    batch = metrics.evaluations(stats)
    per_image = info["per_image"]
    record.update(seconds=round(seconds, 3), cpu_seconds=round(info["cpu_seconds"], 3), evaluations=batch,
                  per_image_evaluations={k: round(v, 3) for k, v in per_image.items()},
                  sd_tflop=cost.price(per_image, copies=recipe.copies, p=parts),
                  sd_tflop_taesd=cost.price(per_image, copies=recipe.copies, decoder="taesd", p=parts),
                  sd_tflop_batch=cost.price(batch, copies=recipe.copies, p=parts),
                  nonfinite_skips=stats.nonfinite_skips, capped_updates=stats.capped_updates, seed=seed)
    return record


def rejection_seed(bundle, recipe: Recipe, per_class: int, seed: int, parts: dict, chunk: int = 1000,
                   max_samples: int = 30000) -> dict:
    """Rejection sampling at one seed: unguided samples in chunks until each class has ``per_class`` samples the
    guidance classifier gives p ≥ ``REJECTION_CONFIDENCE``. SD cost per kept image of a class = (samples generated /
    samples kept for that class) × (one unguided run + its decode + one guidance-network call), mean over classes."""
    from .data import NUM_CLASSES

    kept = [[] for _ in range(NUM_CLASSES)]
    found = torch.zeros(NUM_CLASSES)
    generated, seconds, cpu = 0, 0.0, 0.0
    while min(len(torch.cat(k)) if k else 0 for k in kept) < per_class and generated < max_samples:
        info = {}
        x, _, sec = metrics.generate(bundle, torch.zeros(chunk, dtype=torch.long), recipe.settings,
                                     seed=10_000 + 1000 * seed + generated // chunk, steps=recipe.steps, info=info)
        seconds, cpu, generated = seconds + sec, cpu + info["cpu_seconds"], generated + chunk
        with torch.no_grad():
            conf, label = torch.softmax(bundle.classifier(x), dim=1).max(dim=1)
        for c in range(NUM_CLASSES):
            hit = x[(label == c) & (conf >= REJECTION_CONFIDENCE)]
            kept[c].append(hit)
            found[c] += hit.shape[0]
    samples = [torch.cat(k)[:per_class] for k in kept]
    targets = torch.cat([torch.full((t.shape[0],), c, dtype=torch.long) for c, t in enumerate(samples)])
    record = metrics.score(bundle, torch.cat(samples), targets)
    per_run = {"denoiser": recipe.steps, "denoiser_with_grad": 0, "decoder": 0, "guidance_network": 0}
    one = cost.price(per_run, p=parts) + cost.NETWORK_TFLOP
    one_taesd = one  # no guidance decoder involved
    factor = float((generated / found.clamp_min(1)).mean())
    record.update(seconds=round(seconds, 3), cpu_seconds=round(cpu, 3), evaluations=per_run,
                  per_image_evaluations={k: round(v * factor, 3) for k, v in per_run.items()},
                  sd_tflop=factor * one, sd_tflop_taesd=factor * one_taesd, sd_tflop_batch=factor * one,
                  samples_generated=generated, kept_per_class=found.long().tolist(), nonfinite_skips=0,
                  capped_updates=0, seed=seed)
    return record


def aggregate(name: str, per_seed: list, **fields) -> dict:
    """Mean and sample standard deviation over the seeds of every metric in ``METRICS``."""
    out = {"name": name, **fields, "seeds": [r.get("seed") for r in per_seed]}
    for key in METRICS:
        values = [r[key] for r in per_seed if key in r and r[key] is not None and math.isfinite(r[key])]
        if not values:
            continue
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    for key in ("evaluations", "per_image_evaluations"):
        if per_seed and key in per_seed[0]:
            out[key] = {k: _num(statistics.fmean(r[key][k] for r in per_seed)) for k in per_seed[0][key]}
    out["per_seed"] = [{k: v for k, v in r.items() if k not in ("evaluator_histogram",)} for r in per_seed]
    return out


def _num(v: float):
    return int(v) if float(v).is_integer() else round(v, 3)


def run_recipe(bundle, recipe: Recipe, per_class: int, seeds, parts: dict) -> dict:
    one = rejection_seed if recipe.group == "rejection" else run_seed
    per_seed = [one(bundle, recipe, per_class, s, parts) for s in seeds]
    return aggregate(recipe.name, per_seed, kind="sampler", group=recipe.group,
                     settings=dataclasses.asdict(recipe.settings), steps=recipe.steps, augment=recipe.augment,
                     geometric=recipe.geometric, copies=recipe.copies, samples_per_class=per_class,
                     machine=machine())


def reference_record(bundle, per_class: int, seeds) -> dict:
    """Real training digits (a random subset of ``per_class`` per class for each seed) vs the real test digits:
    the floor of every metric at this sample count; costs nothing."""
    per_seed = []
    for s in seeds:
        r = metrics.reference_score(bundle, per_class, seed=s)
        r.update(seed=s)
        per_seed.append(r)
    rec = aggregate("real digits (train split)", per_seed, kind="reference", group="reference", settings=None,
                    steps=0, augment=0, geometric=False, copies=0, samples_per_class=per_class)
    rec["evaluations"] = {"denoiser": 0, "denoiser_with_grad": 0, "guidance_network": 0, "decoder": 0}
    return rec


FLOOR_SUBSETS = 20


def floor_estimate(bundle, per_class: int, subsets: int = FLOOR_SUBSETS) -> tuple[float, float]:
    """The real-data FD floor at this sample count: mean and sd of the per-class FD between ``per_class`` random
    training digits per class and the test digits, over ``subsets`` random subsets (seeds 0…subsets-1)."""
    values = [metrics.reference_score(bundle, per_class, seed=s)["fd"] for s in range(subsets)]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records: list, parts: dict, source: str, *, floor: tuple | None = None, fd_factor: float = 1.5,
              min_validity: float = 0.99) -> dict:
    """The bar (validity ≥ 0.99, FD ≤ 1.5 × the real-data floor), which rows meet it, and the cost ratios of the
    best recipe (and of the cheapest row that meets the bar) against the paper recipes. ``floor``: (mean, sd) of
    ``floor_estimate``; without it, the reference record's FD (its seeds only). ``meets_bar_seeds_floor`` applies
    the bar with the reference record's floor (the same seeds as the rows) instead."""
    ref = next((r for r in records if r["kind"] == "reference"), None)
    seeds_floor = ref["fd"] if ref else float("nan")
    floor, floor_std = floor if floor is not None else (seeds_floor, ref.get("fd_std") if ref else None)
    fd_bar = fd_factor * floor
    rows = [r for r in records if r["kind"] == "sampler" and r.get("group") != "rejection"]
    meets = [r for r in rows if r.get("validity", 0) >= min_validity and r.get("fd", math.inf) <= fd_bar]
    rejection = next((r for r in records if r.get("group") == "rejection"), None)
    paper = {r["name"]: r["sd_tflop"] for r in rows if r["group"] == "paper"}
    best = next((r for r in rows if r["group"] == "best"), None)
    cheapest = min(meets, key=lambda r: r["sd_tflop"], default=None)

    def ratios(r):
        if r is None:
            return None
        return {"name": r["name"], "validity": r["validity"], "fd": r["fd"], "meets_bar": r in meets,
                "sd_tflop": r["sd_tflop"], "sd_tflop_taesd": r["sd_tflop_taesd"],
                "vs_paper": {n: r["sd_tflop"] / t for n, t in paper.items()},
                "taesd_vs_paper": {n: r["sd_tflop_taesd"] / t for n, t in paper.items()},
                "vs_official_500_steps": {f"{task} ({steps} steps, k={k})": r["sd_tflop"] / cost.official_tflop(
                    steps, k, p=parts) for task, steps, k in cost.OFFICIAL}}

    strict = [r["name"] for r in meets if r["fd"] <= fd_factor * seeds_floor]
    return {"fd_floor": floor, "fd_floor_std": floor_std, "fd_bar": fd_bar,
            "fd_floor_seeds": seeds_floor, "fd_bar_seeds_floor": fd_factor * seeds_floor,
            "min_validity": min_validity, "meets_bar": [r["name"] for r in meets], "meets_bar_seeds_floor": strict,
            "best": ratios(best), "cheapest_meeting_bar": ratios(cheapest),
            "rejection_sampling": None if rejection is None else {
                k: rejection.get(k) for k in ("name", "validity", "fd", "sd_tflop", "samples_generated")},
            "paper_sd_tflop": paper, "paper_main": PAPER_MAIN, "paper_main_sd_tflop": paper.get(PAPER_MAIN),
            "official_sd_tflop": {f"{task} ({steps} steps, k={k})": cost.official_tflop(steps, k, p=parts)
                                  for task, steps, k in cost.OFFICIAL},
            "cost_model": {"parts_tflop": {k: parts[k] for k in cost.KEYS}, "source": source,
                           "network": cost.NETWORK, "network_tflop": cost.NETWORK_TFLOP, "cfg_batch_2": cost.CFG}}


def run(recipes, out: Path, stem: str, per_class: int, seeds, log=print) -> list:
    bundle = metrics.load_bundle()
    parts, source = cost.parts()
    t0, c0 = time.perf_counter(), time.process_time()
    records = [reference_record(bundle, per_class, seeds)]
    log(f"seeds {list(seeds)}, {per_class} samples per digit; SD cost from {source}")
    log(_header())
    log(_row(records[0]))
    out.mkdir(parents=True, exist_ok=True)
    for recipe in recipes:
        rec = run_recipe(bundle, recipe, per_class, seeds, parts)
        records.append(rec)
        log(_row(rec))
        (out / f"{stem}.json").write_text(json.dumps(clean(records), indent=1))
    summary = summarize(records, parts, source, floor=floor_estimate(bundle, per_class))
    summary.update(seconds=round(time.perf_counter() - t0, 1), cpu_seconds=round(time.process_time() - c0, 1),
                   seeds=list(seeds), samples_per_class=per_class, machine=machine())
    (out / f"{stem}.json").write_text(json.dumps(clean(records), indent=1))
    (out / f"{stem}_summary.json").write_text(json.dumps(clean(summary), indent=1))
    title = (f"Universal Guidance on 8x8 digits: {per_class} samples per digit, mean of {len(seeds)} seed(s), "
             f"{machine()}")
    bar_charts(records, out / f"{stem}.png", title=title)
    pareto_plot(records, out / f"{stem}_pareto.png" if stem != "quality" else out / "pareto.png", summary=summary,
                title=f"8x8 digits: quality vs Stable Diffusion cost per image (SD1.5 512², CFG, SD VAE as guidance "
                      f"decoder); {per_class} samples per digit, mean ± sd of {len(seeds)} seed(s)")
    _log_summary(summary, log)
    return records


def _header() -> str:
    return (f"{'configuration':58s} {'valid':>11s} {'FD':>11s} {'guideCE':>7s} {'evalCE':>6s} {'TFLOP':>6s} "
            f"{'TAESD':>5s} {'cpu s':>6s}")


def _row(r: dict) -> str:
    return (f"{r['name'][:58]:58s} {r['validity']:5.3f}±{r.get('validity_std', 0):.3f} {r['fd']:5.1f}±"
            f"{r.get('fd_std', 0):<5.1f} {r.get('guide_loss', 0):7.3f} {r.get('eval_loss', 0):6.3f} "
            f"{r.get('sd_tflop', 0):6.0f} {r.get('sd_tflop_taesd', 0):5.0f} {r.get('cpu_seconds', 0):6.1f}")


def _log_summary(s: dict, log) -> None:
    log(f"FD floor (real training vs test digits, {FLOOR_SUBSETS} subsets): {s['fd_floor']:.2f} ± "
        f"{s['fd_floor_std']:.2f}; bar: validity >= {s['min_validity']}, FD <= {s['fd_bar']:.2f}; rows meeting it: "
        f"{len(s['meets_bar'])}; with the floor of the rows' seeds ({s['fd_floor_seeds']:.2f}, FD <= "
        f"{s['fd_bar_seeds_floor']:.2f}): {len(s['meets_bar_seeds_floor'])}")
    for key in ("best", "cheapest_meeting_bar"):
        b = s.get(key)
        if b:
            ratios = ", ".join(f"{n.split(':')[0]} {v:.3f}" for n, v in b["vs_paper"].items())
            log(f"{key}: {b['name']}: {b['sd_tflop']:.0f} TFLOP/image ({b['sd_tflop_taesd']:.0f} with TAESD), "
                f"meets bar: {b['meets_bar']}; ratio to {ratios}")


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--samples", type=int, default=None, help="samples per target digit (default 50; --quick 10)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick 0)")
    ap.add_argument("--configs", default="", help="comma-separated substrings: run only matching rows")
    ap.add_argument("--search", action="store_true", help="run the tuning grid instead (one seed unless --seeds)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: seed 0, 10 samples per digit (FDs not comparable to the full run)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: stable timings on a shared 2-core machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    per_class = args.samples or (10 if args.quick else 50)
    default_seeds = "0" if (args.quick or args.search) else "0,1,2"
    seeds = [int(s) for s in (args.seeds or default_seeds).split(",") if s.strip()]
    recipes, stem = (SEARCH, "search") if args.search else (ROWS, "quality")
    if args.configs:
        keys = [k.strip() for k in args.configs.split(",") if k.strip()]
        recipes = [r for r in recipes if any(k in r.name for k in keys)]
    t0 = time.time()
    records = run(recipes, args.out, stem, per_class, seeds)
    print(f"wrote {args.out / (stem + '.json')}, {stem}_summary.json, {stem}.png and the Pareto plot "
          f"in {time.time() - t0:.0f}s")
    return records


if __name__ == "__main__":
    main()
