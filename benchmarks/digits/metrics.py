"""Sampling through ``guidance.sample_universal`` and the two quality metrics (validity, Fréchet distance)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

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
             steps: int = STEPS) -> tuple[torch.Tensor, ug.Stats, float]:
    """Sample one digit per entry of ``targets`` (one batch) with Universal Guidance toward that class.

    Initial noise and the re-noise of self-recurrence come from generators seeded with ``seed``, so every
    configuration starts from the same noise. Returns (samples clamped to [-1, 1], stats, wall seconds).
    """
    gen = torch.Generator().manual_seed(seed)
    sigmas = bundle.denoiser.schedule.ddim_sigmas(steps)
    x = torch.randn((targets.shape[0], 1, 8, 8), generator=gen) * sigmas[0]
    objective = ug.Guidance().add(ug.GuidanceTerm("classifier", models.ClassifierLoss(bundle.classifier, targets)))
    stats = ug.Stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = ug.sample_universal(bundle.denoiser, x, sigmas, guidance=objective, decode=decode, settings=settings,
                                  parameterization=ug.VE, generator=torch.Generator().manual_seed(seed + 1),
                                  stats=stats)
    seconds = time.perf_counter() - t0
    return out.clamp(-1.0, 1.0), stats, seconds


def evaluations(stats: ug.Stats) -> dict:
    """Network evaluations of a run (a forward+backward counts as one): the engine's own counters."""
    return {"denoiser": stats.denoiser_calls, "denoiser_with_grad": stats.denoiser_grad_calls,
            "guidance_network": stats.objective_calls}


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
        pred = ev(samples).argmax(1)
        guide_pred = bundle.classifier(samples).argmax(1)
    f = features(ev, samples)
    real, real_y = _real_features(id(ev), ev)
    t = targets.numpy()
    per_class = [frechet(f[t == c], real[real_y == c]) for c in range(NUM_CLASSES) if (t == c).sum() > 1]
    return {"validity": float((pred == targets).float().mean()),
            "validity_per_class": [round(float((pred[targets == c] == c).float().mean()), 3)
                                   for c in range(NUM_CLASSES) if (targets == c).any()],
            "guide_accuracy": float((guide_pred == targets).float().mean()),
            "fd": float(np.mean(per_class)) if per_class else float("nan"),
            "fd_pooled": frechet(f, real),
            "evaluator_histogram": np.bincount(pred.numpy(), minlength=NUM_CLASSES).tolist()}


def reference_score(bundle: Bundle, per_class: int) -> dict:
    """The same metrics for ``per_class`` *real training* digits per class: the floor a perfect model reaches."""
    split = load_split()
    idx = torch.cat([torch.nonzero(split.y_train == c).flatten()[:per_class] for c in range(NUM_CLASSES)])
    return score(bundle, split.x_train[idx], split.y_train[idx])
