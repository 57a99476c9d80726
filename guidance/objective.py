"""What the sampler minimizes: a weighted sum of guidance terms, each with its own step window.

Two kinds of term:

* *image* terms wrap ``loss(image_01: Tensor[B,3,H,W]) -> Tensor[B]`` evaluated on the decoded clean prediction
  (RGB in [0, 1], not clamped, so gradients survive): the guidance networks;
* *internal* terms (``loss.term_kind == "internal"``, see ``selfguidance``) wrap ``loss(internals, reference) ->
  Tensor[B]`` evaluated on what the denoiser captured in the same call that gave x̂0 (attention maps,
  activations), and on the reference's capture when they need one. No decode.

``Guidance`` and its terms are frozen: adding a term returns a new object, so the term list a node's cached output
holds never changes. The terms' loss objects are not copied, though: a ``Guidance`` built from another shares them,
and every run changes them in place — ``prepare`` moves their networks (and targets) to the device, ``reset``
restarts their counters and generators, and during the run they count evaluations (``report``) and cache resized
targets. A run therefore starts with ``reset`` and ``prepare``, and two runs must not use one loss object at the
same time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

LossFn = Callable[[torch.Tensor], torch.Tensor]


def window_contains(start: float, end: float, progress: float) -> bool:
    """``start <= progress < end``, where progress is the fraction of this run's steps already taken.

    ``end >= 1`` includes every step, so the default window (0, 1) guides the whole run.
    """
    return start <= progress and (progress < end or end >= 1.0)


def check_window(start: float, end: float, what: str = "window") -> None:
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ValueError(f"{what}: start_percent and end_percent must lie in [0, 1], got {start:g} and {end:g}")
    if start >= end:
        raise ValueError(f"{what}: start_percent ({start:g}) must be smaller than end_percent ({end:g})")


class NetworkLoss:
    """Base of guidance terms that hold one frozen network in ``self.model``: device, dtype, ``prepare``."""

    model: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def prepare(self, device, dtype=None):
        """Move the network to ``device`` (and ``dtype``); normal tensors even under inference mode."""
        with torch.inference_mode(False):
            self.model.to(device=device, dtype=dtype) if dtype is not None else self.model.to(device)
        return self

    def reset(self) -> None:
        pass

    def report(self):
        return None


@dataclass(frozen=True)
class GuidanceTerm:
    """One guidance loss with its weight and step window (fractions of the run's steps).

    A negative weight pushes away from the term's target (e.g. away from a text); 0 switches the term off."""

    name: str
    loss: LossFn
    weight: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    augment: int = 0  # image terms: random augmentations of the decoded image per evaluation (0: none)
    seed: int = 0     # of the augmentations

    def __post_init__(self):
        check_window(self.start_percent, self.end_percent, f"guidance term {self.name!r}")
        if self.augment < 0:
            raise ValueError(f"guidance term {self.name!r}: augment must be 0 or more, got {self.augment}")
        augmenter = None
        if self.augment > 0:
            from .augment import Augmenter
            augmenter = Augmenter(self.augment, spatial=getattr(self.loss, "spatial", True), seed=self.seed)
        object.__setattr__(self, "augmenter", augmenter)

    @property
    def floor(self) -> float:
        """The smallest value the weighted loss can take (f* of the classical Polyak step): ``weight·floor`` of
        the loss (0 unless the loss says otherwise, e.g. −1 for a −cosine); −inf for a negative weight."""
        if self.weight < 0:
            return float("-inf")
        return self.weight * float(getattr(self.loss, "floor", 0.0))

    def image_value(self, image: torch.Tensor, smoothing=None, noise_std: float = 0.0, generator=None):
        """The loss ``[B]`` of an image term: on ``augment`` augmented copies and ``K`` smoothed copies of the
        decoded image, batched into one call of the loss, then averaged (or log-mean-exp'ed) back."""
        from .augment import reduce, smooth
        batch, views, reduction = image, 1, "mean"
        if self.augmenter is not None:
            batch, views = self.augmenter(image), self.augment
        if smoothing is not None and smoothing.active and noise_std > 0:
            batch = smooth(batch, smoothing, smoothing.strength * noise_std, generator)
            views, reduction = views * smoothing.samples, smoothing.reduction
        value = self.loss(batch)
        return value if views == 1 else reduce(value, views, reduction)

    @property
    def kind(self) -> str:
        """``"image"`` (a loss on the decoded image) or ``"internal"`` (a loss on the denoiser's internals)."""
        return getattr(self.loss, "term_kind", "image")

    @property
    def reference_key(self):
        """Which reference an internal term needs: None, ``"original"``, ``("latent", id)`` or
        ``("inversion", id)``."""
        if self.kind != "internal":
            return None
        ref = getattr(self.loss, "reference", None)
        if isinstance(ref, torch.Tensor):
            return ("latent", id(ref))
        if hasattr(ref, "reference_key"):  # an inversion trajectory
            return ref.reference_key
        return ref if ref == "original" else None

    def active(self, progress: float) -> bool:
        return self.weight != 0.0 and window_contains(self.start_percent, self.end_percent, progress)


KINDS = ("image", "internal")


@dataclass(frozen=True)
class Guidance:
    """An ordered, frozen collection of guidance terms: ``loss = Σ weight_i · loss_i`` over active terms (their loss
    objects are shared and changed by each run: see the module doc)."""

    terms: tuple = field(default_factory=tuple)

    def add(self, term: GuidanceTerm) -> "Guidance":
        return Guidance(self.terms + (term,))

    def __len__(self) -> int:
        return len(self.terms)

    def active_terms(self, progress: float, kinds: Sequence[str] = KINDS) -> Sequence[GuidanceTerm]:
        return [t for t in self.terms if t.kind in kinds and t.active(progress)]

    def active(self, progress: float, kinds: Sequence[str] = KINDS) -> bool:
        return bool(self.active_terms(progress, kinds))

    def has(self, kind: str) -> bool:
        return any(t.kind == kind for t in self.terms)

    def floor(self, progress: float) -> float:
        """f* of the active terms: Σ weight·floor (0 where unknown; a negative weight makes it −inf, so use 0 —
        the Polyak step then treats the current loss as the gap, clamped at 0)."""
        value = sum(t.floor for t in self.active_terms(progress))
        return value if value > float("-inf") else 0.0

    def capture_request(self, progress: float):
        """The union of what the active internal terms need captured, or None when none is active."""
        request = None
        for term in self.active_terms(progress, ("internal",)):
            request = term.loss.request if request is None else request | term.loss.request
        return request

    def references(self, progress: Optional[float] = None) -> dict:
        """``{reference key: the reference (``"original"`` or a latent tensor)}`` of the internal terms (active at
        ``progress`` when given)."""
        terms = self.terms if progress is None else self.active_terms(progress, ("internal",))
        return {t.reference_key: t.loss.reference for t in terms if t.reference_key is not None}

    def __call__(self, image: Optional[torch.Tensor], progress: float, *, internals=None,
                 references: Optional[dict] = None, kinds: Sequence[str] = KINDS,
                 record: Optional[dict] = None, smoothing=None, noise_std: float = 0.0,
                 generator=None) -> torch.Tensor:
        """Per-sample weighted loss of the terms of ``kinds`` active at ``progress``; shape ``[B]``, float32.

        ``image``: the decoded clean prediction (needed when an image term is active); ``internals``: the
        denoiser's capture (needed when an internal term is active); ``references``: ``{reference key:
        Internals}``. ``record``, when given, receives each term's unweighted loss (mean over the batch).
        ``smoothing`` / ``noise_std`` / ``generator``: Gaussian smoothing of the image terms (``augment``)."""
        total = None
        for term in self.active_terms(progress, kinds):
            if term.kind == "internal":
                if internals is None:
                    raise ValueError(f"guidance term {term.name!r} reads the denoiser's attention, which was not "
                                     f"captured for this evaluation")
                value = term.loss(internals, (references or {}).get(term.reference_key))
            else:
                value = term.image_value(image, smoothing, noise_std, generator)
            batch = image.shape[0] if image is not None else value.shape[0]
            if value.dim() != 1 or value.shape[0] != batch:
                raise ValueError(
                    f"guidance term {term.name!r} returned a loss of shape {tuple(value.shape)}; "
                    f"expected one value per image, shape ({batch},)")
            if record is not None:
                record[term.name] = float(value.detach().float().mean())
            value = value.float() * term.weight
            total = value if total is None else total + value
        if total is None:
            source = image if image is not None else next(iter((internals.maps if internals else {}).values()),
                                                          None)
            return torch.zeros(source.shape[0] if source is not None else 1, dtype=torch.float32)
        return total

    def reports(self) -> list:
        """Lines that terms want shown to the user after a run (e.g. steps a face term had to skip)."""
        lines = []
        for term in self.terms:
            report = getattr(term.loss, "report", None)
            if callable(report):
                line = report()
                if line:
                    lines.append(f"{term.name}: {line}")
        return lines

    def prepare(self, device, dtype=None) -> None:
        """Move every term's network to ``device`` (terms that hold a network implement ``prepare``)."""
        for term in self.terms:
            prepare = getattr(term.loss, "prepare", None)
            if callable(prepare):
                prepare(device, dtype)

    def reset(self) -> None:
        """Clear per-run state of the terms (counters, augmentation draws) before a new run."""
        for term in self.terms:
            reset = getattr(term.loss, "reset", None)
            if callable(reset):
                reset()
            if term.augmenter is not None:
                term.augmenter.reset()
