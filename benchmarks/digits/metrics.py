"""Sampling through ``guidance.sample_universal`` and the two quality metrics (validity, Fréchet distance)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

import guidance as ug

from . import models
from .data import NUM_CLASSES, decode, load_split

STEPS = 50


@dataclass
class Bundle:
    denoiser: models.Denoiser
    classifier: models.GuidanceClassifier
    evaluator: models.Evaluator


@lru_cache(maxsize=2)
def load_bundle(folder=models.WEIGHTS) -> Bundle:
    """The three shipped networks (eval mode, no parameter gradients)."""
    return Bundle(models.load_denoiser(folder), models.load_classifier(folder), models.load_evaluator(folder))


def targets_for(per_class: int) -> torch.Tensor:
    """``[0]*n + [1]*n + … + [9]*n``."""
    return torch.arange(NUM_CLASSES).repeat_interleave(per_class)


def generate(bundle: Bundle, targets: torch.Tensor, settings: ug.Settings, *, seed: int = 0,
             steps: int = STEPS, augment: int = 0, geometric: bool = False,
             info: dict | None = None) -> tuple[torch.Tensor, ug.Stats, float]:
    """Sample one digit per entry of ``targets`` (one batch) with Universal Guidance toward that class.

    Initial noise and the re-noise of self-recurrence come from generators seeded with ``seed``, so every
    configuration starts from the same noise. ``augment``: random augmentations of the decoded image per guidance
    evaluation (``GuidanceTerm(augment=…)``, seeded with ``seed``); ``geometric``: the classifier term declares
    itself non-spatial, so translation, resize and cutout apply as well as the colour changes. Returns (samples
    clamped to [-1, 1], stats, wall seconds); ``info``, when given, also receives ``cpu_seconds`` (process CPU
    time of the call: all threads, robust to other jobs on the machine) and ``per_image`` (``per_image_counts``).
    """
    gen = torch.Generator().manual_seed(seed)
    sigmas = bundle.denoiser.schedule.ddim_sigmas(steps)
    x = torch.randn((targets.shape[0], 1, 8, 8), generator=gen) * sigmas[0]
    values = [] if info is not None else None
    loss = models.ClassifierLoss(bundle.classifier, targets, spatial=not geometric, record=values)
    objective = ug.Guidance().add(ug.GuidanceTerm("classifier", loss, augment=augment, seed=seed))
    stats = ug.Stats()
    c0 = time.process_time()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = ug.sample_universal(bundle.denoiser, x, sigmas, guidance=objective, decode=decode, settings=settings,
                                  parameterization=ug.VE, generator=torch.Generator().manual_seed(seed + 1),
                                  stats=stats)
    seconds = time.perf_counter() - t0
    if info is not None:
        info.update(seconds=seconds, cpu_seconds=time.process_time() - c0,
                    per_image=per_image_counts(stats, values, settings))
    return out.clamp(-1.0, 1.0), stats, seconds


def per_image_counts(stats: ug.Stats, values: list, settings: ug.Settings) -> dict:
    """Evaluations per image as a batch-1 run would make them, mean over the batch.

    The engine's counters are the batch's: with ``backward_early_stop`` a sample that has stopped is still carried
    (masked) until the last sample of the batch stops. Run alone, it would stop after the evaluation whose loss fell
    below the threshold. Replays that rule from the recorded per-sample losses (one entry per guidance
    evaluation, aligned with ``stats.trace``); forward-guidance evaluations count once for every image."""
    counts = evaluations(stats)
    if not values or len(values) != len(stats.trace):
        return {k: float(v) for k, v in counts.items()}
    from guidance.augment import reduce

    reduction = settings.smoothing_reduction if settings.smoothing_spec.active else "mean"
    batch = values[0].shape[1]
    forward, backward = 0, torch.zeros(batch, dtype=torch.float64)
    key, stopped = None, None
    for entry, v in zip(stats.trace, values):
        if entry["phase"] != "backward":
            forward, key = forward + 1, None
            continue
        if (entry["step"], entry["repeat"]) != key:
            key, stopped = (entry["step"], entry["repeat"]), torch.zeros(batch, dtype=torch.bool)
        backward += (~stopped).double()
        if settings.backward_early_stop > 0:
            stopped |= reduce(v.reshape(-1), v.shape[0], reduction) < settings.backward_early_stop
    per_eval = forward + float(backward.mean())
    return {"denoiser": float(counts["denoiser"]), "denoiser_with_grad": float(counts["denoiser_with_grad"]),
            "guidance_network": per_eval, "decoder": per_eval * counts["decoder"] / max(counts["guidance_network"], 1)}


def evaluations(stats: ug.Stats) -> dict:
    """Network evaluations of a run (a forward+backward counts as one): the engine's own counters."""
    return {"denoiser": stats.denoiser_calls, "denoiser_with_grad": stats.denoiser_grad_calls,
            "guidance_network": stats.objective_calls, "decoder": stats.decoder_calls}


def features(evaluator: models.Evaluator, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return evaluator.features(x).double().numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` and ``b``:
    ``|μa-μb|² + tr(Σa) + tr(Σb) - 2·tr((Σa^½ Σb Σa^½)^½)`` — the trace term from a symmetric eigen-decomposition,
    which stays exact (no complex parts, no warnings) when a covariance is singular (few samples)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


@lru_cache(maxsize=4)
def _real_features(evaluator_id: int, evaluator: models.Evaluator):
    split = load_split()
    return features(evaluator, split.x_test), split.y_test.numpy()


def score(bundle: Bundle, samples: torch.Tensor, targets: torch.Tensor) -> dict:
    """validity: evaluator accuracy on the target class. fd: Fréchet distance in the evaluator's penultimate
    features between the samples aimed at class c and the real *test* digits of class c, computed per class and
    then averaged over the 10 classes (depends on the number of samples: compare at equal ``--samples``).
    fd_pooled: all samples vs all test digits (class-blind). guide_accuracy: the guidance classifier's own
    accuracy on the samples (≫ validity means the guidance network was fooled adversarially)."""
    ev = bundle.evaluator
    with torch.no_grad():
        logits = ev(samples)
        guide_logits = bundle.classifier(samples)
    pred, guide_pred = logits.argmax(1), guide_logits.argmax(1)
    f = features(ev, samples)
    real, real_y = _real_features(id(ev), ev)
    t = targets.numpy()
    per_class = [frechet(f[t == c], real[real_y == c]) for c in range(NUM_CLASSES) if (t == c).sum() > 1]
    return {"validity": float((pred == targets).float().mean()),
            "validity_per_class": [round(float((pred[targets == c] == c).float().mean()), 3)
                                   for c in range(NUM_CLASSES) if (targets == c).any()],
            "guide_accuracy": float((guide_pred == targets).float().mean()),
            # the guidance objective on the final samples, and the same cross-entropy under the held-out evaluator
            "guide_loss": float(F.cross_entropy(guide_logits, targets)),
            "eval_loss": float(F.cross_entropy(logits, targets)),
            "fd": float(np.mean(per_class)) if per_class else float("nan"),
            "fd_pooled": frechet(f, real),
            "evaluator_histogram": np.bincount(pred.numpy(), minlength=NUM_CLASSES).tolist()}


def reference_score(bundle: Bundle, per_class: int, seed: int | None = None) -> dict:
    """The same metrics for ``per_class`` *real training* digits per class vs the real held-out test digits: the
    floor a perfect generator reaches at this sample count. ``seed`` None: the first ``per_class`` training
    digits of each class; otherwise a random subset drawn with that seed."""
    split = load_split()
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    idx = []
    for c in range(NUM_CLASSES):
        pool = torch.nonzero(split.y_train == c).flatten()
        if gen is not None:
            pool = pool[torch.randperm(pool.numel(), generator=gen)]
        idx.append(pool[:per_class])
    idx = torch.cat(idx)
    return score(bundle, split.x_train[idx], split.y_train[idx])
