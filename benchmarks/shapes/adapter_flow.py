"""The transformer flow model (``mmdit.ShapesMMDiT``) in the engine's calling convention for flow models.

The engine's flow family (``guidance.parameterization.FLOW``, ComfyUI's ``CONST`` model sampling used by SD3 and
Flux) writes a sample as ``x = (1 − σ)·x0 + σ·n`` with σ ∈ [0, 1] equal to the flow time t; the denoiser returns
``x̂0 = x − σ·v̂`` (ComfyUI ``CONST.calculate_denoised``: ``model_input − model_output·σ``). So no conversion to
the VE form is needed: σ is handed to the network as its time, and the sampler steps with ``a = 1 − σ``, ``b = σ``.

Schedule (``FlowSchedule``): ``n`` steps from σ = 1 (pure noise) to 0, uniform in t and then shifted as SD3's
``shift`` (``σ' = s·σ / (1 + (s − 1)·σ)``; ``s = 1``: no shift), then σ = 0. The interface is the one
``adapter.Schedule`` offers the benchmarks (``ddim_sigmas``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .adapter import guided_call, layer_names

SHIFT = 1.0


class FlowSchedule:
    """σ = t for a rectified flow; ``ddim_sigmas(n)``: ``n`` shifted uniform times from 1 down, then 0."""

    def __init__(self, shift: float = SHIFT):
        self.shift = float(shift)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.float()

    def ddim_sigmas(self, n_steps: int, sigma_max: float | None = None) -> torch.Tensor:
        t = torch.linspace(1.0 if sigma_max is None else float(sigma_max), 0.0, n_steps + 1)
        s = self.shift
        return s * t / (1 + (s - 1) * t)


FLOW_SCHEDULE = FlowSchedule()


def make_denoiser(model, tokens: torch.Tensor, null_tokens: torch.Tensor, cfg_scale: float, resize: bool = True):
    """``denoise(x, sigma, capture=None)`` for ``guidance.sample_universal(..., parameterization=FLOW)``.

    x ``[B, 3, 32, 32]`` with ``x = (1 − σ)·x0 + σ·n``, sigma ``[B]`` (or a scalar) in [0, 1]. Returns
    ``x̂0 = x − σ·v̂`` with CFG on the velocity (``v̂ = v(∅) + s·(v(c) − v(∅))``, uncond and cond in one batch,
    uncond first; ``s = 1`` skips the uncond pass). With a ``capture`` (as ``adapter.make_denoiser``)
    ``(x̂0, Internals)`` of the cond rows: every requested block's text→image map ``[B, H, W, T]`` and Ψ.
    x̂0 is the same with and without a capture (the maps are computed beside the attention, not inside it).
    """
    order = layer_names(model)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, capture: Optional[object] = None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        v, internals = guided_call(model, x, sigma, tokens, null_tokens, cfg_scale, capture, order, resize)
        x0 = x - sigma.view(-1, 1, 1, 1) * v.to(x.dtype)
        return x0 if capture is None else (x0, internals)

    return denoise
