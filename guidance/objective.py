"""What the sampler minimizes: a weighted sum of guidance terms, each with its own step window.

A term wraps a loss ``loss(image_01: Tensor[B,3,H,W]) -> Tensor[B]`` evaluated on the decoded clean prediction
(RGB in [0, 1], not clamped, so gradients survive). ``Guidance`` is immutable: adding a term returns a new object,
so values cached and shared by a node graph are never changed behind anyone's back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

LossFn = Callable[[torch.Tensor], torch.Tensor]


def window_contains(start: float, end: float, progress: float) -> bool:
    """``start <= progress < end``, where progress is the fraction of this run's steps already taken.

    ``end >= 1`` includes every step, so the default window (0, 1) guides the whole run.
    """
    return start <= progress and (progress < end or end >= 1.0)


def check_window(start: float, end: float, what: str = "window") -> None:
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ValueError(f"{what}: start_percent and end_percent must lie in [0, 1], got {start} and {end}")
    if start >= end:
        raise ValueError(f"{what}: start_percent ({start}) must be smaller than end_percent ({end})")


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
    """One guidance loss with its weight and step window (fractions of the run's steps)."""

    name: str
    loss: LossFn
    weight: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0

    def __post_init__(self):
        check_window(self.start_percent, self.end_percent, f"guidance term {self.name!r}")

    def active(self, progress: float) -> bool:
        return self.weight != 0.0 and window_contains(self.start_percent, self.end_percent, progress)


@dataclass(frozen=True)
class Guidance:
    """An ordered, immutable collection of guidance terms: ``loss = Σ weight_i · loss_i`` over active terms."""

    terms: tuple = field(default_factory=tuple)

    def add(self, term: GuidanceTerm) -> "Guidance":
        return Guidance(self.terms + (term,))

    def __len__(self) -> int:
        return len(self.terms)

    def active_terms(self, progress: float) -> Sequence[GuidanceTerm]:
        return [t for t in self.terms if t.active(progress)]

    def active(self, progress: float) -> bool:
        return any(t.active(progress) for t in self.terms)

    def __call__(self, image: torch.Tensor, progress: float) -> torch.Tensor:
        """Per-sample weighted loss of the terms active at ``progress``; shape ``[B]``, float32."""
        total = None
        for term in self.active_terms(progress):
            value = term.loss(image)
            if value.dim() != 1 or value.shape[0] != image.shape[0]:
                raise ValueError(
                    f"guidance term {term.name!r} returned a loss of shape {tuple(value.shape)}; "
                    f"expected one value per image, shape ({image.shape[0]},)")
            value = value.float() * term.weight
            total = value if total is None else total + value
        if total is None:
            return image.new_zeros(image.shape[0], dtype=torch.float32)
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
        """Clear per-run state of the terms (counters) before a new run."""
        for term in self.terms:
            reset = getattr(term.loss, "reset", None)
            if callable(reset):
                reset()
