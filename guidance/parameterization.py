"""How a latent mixes clean signal and noise: ``x = a(σ)·x0 + b(σ)·n``.

Two families cover every model ComfyUI samples:

* ``VE`` (EPS, V-prediction, EDM — SD1.x/2.x/XL): ``a = 1``, ``b = σ``.
* ``FLOW`` (CONST / rectified flow — SD3, Flux): ``a = 1 - σ``, ``b = σ``.

The sampler step, the re-noise of self-recurrence and the unit of the forward-guidance strength all follow
from ``a`` and ``b``; nothing else in the engine needs to know which family it is running.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Smallest signal coefficient a strength is divided by. Only the flow family reaches a(σ) = 0 (σ = 1, pure
# noise), where the paper's unit b²/a is unbounded: the sampler applies no forward guidance where a < A_MIN.
A_MIN = 1e-2


@dataclass(frozen=True)
class Parameterization:
    """``x = a(σ)·x0 + b(σ)·n``. ``kind`` is ``"ve"`` or ``"flow"``."""

    kind: str

    def __post_init__(self):
        if self.kind not in ("ve", "flow"):
            raise ValueError(f"unknown parameterization {self.kind!r}: expected 've' or 'flow'")

    def a(self, sigma: float) -> float:
        return 1.0 if self.kind == "ve" else 1.0 - float(sigma)

    def b(self, sigma: float) -> float:
        return float(sigma)

    def noise_of(self, x: torch.Tensor, x0: torch.Tensor, sigma: float) -> torch.Tensor:
        """The noise ``n`` that makes ``x`` consistent with the clean prediction ``x0`` at ``σ`` (σ > 0)."""
        return (x - self.a(sigma) * x0) / self.b(sigma)

    def step(self, x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        """One deterministic first-order step (Euler / DDIM) from ``σ`` to ``σ_next`` given the clean prediction.

        VE: ``x0 + (σ_next/σ)(x - x0)``; flow: ``(1-σ_next)·x0 + σ_next·n̂``. ``σ_next = 0`` returns ``x0``.
        """
        if sigma_next <= 0:
            return x0
        n = self.noise_of(x, x0, sigma)
        return self.a(sigma_next) * x0 + self.b(sigma_next) * n

    def renoise(self, x_next: torch.Tensor, sigma_next: float, sigma: float, noise: torch.Tensor) -> torch.Tensor:
        """Go back up from ``σ_next`` to ``σ > σ_next`` with fresh noise (self-recurrence).

        ``x = (a/a_next)·x_next + sqrt(b² - (a·b_next/a_next)²)·n'`` — the forward transition of the same
        process, so a sample with the right marginal at ``σ_next`` gets the right marginal at ``σ``.
        """
        a, b = self.a(sigma), self.b(sigma)
        a_n, b_n = self.a(sigma_next), self.b(sigma_next)
        scale = a / a_n
        var = max(b * b - (scale * b_n) ** 2, 0.0)
        return scale * x_next + var ** 0.5 * noise

    def strength_unit(self, sigma: float) -> float:
        """The paper's forward-guidance unit ``b²/a`` (``σ²`` for VE): ``D' = D - s0·unit·∇ₓ``."""
        return self.b(sigma) ** 2 / max(self.a(sigma), A_MIN)

    def eps_to_x0_scale(self, sigma: float) -> float:
        """``b/a``: a shift ``Δε`` of the predicted noise moves the clean prediction by ``-(b/a)·Δε``."""
        return self.b(sigma) / max(self.a(sigma), A_MIN)


VE = Parameterization("ve")
FLOW = Parameterization("flow")
