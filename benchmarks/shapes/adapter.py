"""The shapes model in the engine's calling convention (ComfyUI k-diffusion VE σ-form), and a plain DDIM sampler.

Schedule: Stable Diffusion's "scaled linear" DDPM schedule, ``β_t = linspace(√0.00085, √0.012, T)²``, T = 1000,
``ᾱ_t = Π(1-β)``; ``σ = sqrt((1-ᾱ)/ᾱ)`` from 0.029 (t = 0) to 14.61 (t = 999), dimensionless (image units
[-1, 1]); ``t(σ)`` is interpolated in log σ between the discrete timesteps (ComfyUI's ``ModelSamplingDiscrete``).
So σ means the same here as on SD1.x. (A first model trained on a cosine schedule reaching σ = 100 sampled
tinted, noisy images from σ = 100 — 22 % correct at 1000 iterations vs 73 % when started at 14.6: with
``x̂0 = x - σ·ε̂`` a small ε error becomes an x̂0 error of several units.)

Denoiser: ``x = x0 + σ·n``; ``D(x, σ) = x - σ·ε̂(x/sqrt(1+σ²), t(σ))`` with CFG
``ε̂ = ε(∅) + s·(ε(c) - ε(∅))`` (cond and uncond in one batch, uncond first; ``s = 1`` skips the uncond pass).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from guidance.selfguidance import CaptureRequest, Internals

from . import data
from .models import LAYERS, ShapesUNet

T_STEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012


# ---------------------------------------------------------------------------------------------- schedule
def alphas_cumprod(steps: int = T_STEPS) -> torch.Tensor:
    """ᾱ_t, t = 0…T-1 (float64), the scaled-linear schedule."""
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class Schedule:
    """The discrete ᾱ table and its VE σ table (``σ = sqrt((1-ᾱ)/ᾱ)``, increasing in t)."""

    def __init__(self, steps: int = T_STEPS):
        self.steps = steps
        self.alphas_cumprod = alphas_cumprod(steps)
        self.sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt().float()
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep of ``σ`` (linear interpolation in log σ, clamped to [0, T-1])."""
        log_sigma = sigma.float().clamp_min(1e-10).log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        high = torch.searchsorted(self.log_sigmas, log_sigma.contiguous()).clamp(1, self.steps - 1)
        low = high - 1
        lo, hi = self.log_sigmas[low], self.log_sigmas[high]
        return low.float() + ((log_sigma - lo) / (hi - lo)).clamp(0, 1)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ of a (continuous) timestep: log σ interpolated between the discrete steps."""
        t = t.float().clamp(0, self.steps - 1)
        low = t.floor().long().clamp(max=self.steps - 2)
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp()

    def ddim_sigmas(self, n_steps: int, sigma_max: float | None = None) -> torch.Tensor:
        """``n_steps`` σ's at uniformly spaced (continuous) timesteps from ``t(sigma_max)`` (default: T-1) down
        to 0, then 0 (``n_steps + 1`` values)."""
        t_max = self.steps - 1.0 if sigma_max is None else float(self.sigma_to_t(torch.tensor([float(sigma_max)]))[0])
        return torch.cat([self.t_to_sigma(torch.linspace(t_max, 0, n_steps)), torch.zeros(1)])


SCHEDULE = Schedule()


# ---------------------------------------------------------------------------------------------- denoiser
def _layers_of(capture) -> tuple:
    """``(layer names or None for all, features?)`` of a capture request: a ``guidance.selfguidance.CaptureRequest``
    (its ``layers``, ``features``), or any other non-None value (``True``): every layer and Ψ."""
    if isinstance(capture, CaptureRequest):
        return (None if capture.layers is None else sorted(capture.layers)), bool(capture.features)
    return None, True


def schedule_of(model) -> Schedule:
    """The σ schedule a model was trained on: its ``schedule`` attribute, else the scaled-linear ``SCHEDULE``."""
    return getattr(model, "schedule", None) or SCHEDULE


def parameterization_of(model):
    """The engine's parameterization for ``model``: ``guidance.FLOW`` for a rectified-flow model
    (``prediction == "flow"``: ``x = (1−σ)·x0 + σ·n``), else ``guidance.VE`` (``x = x0 + σ·n``)."""
    import guidance as ug

    return ug.FLOW if getattr(model, "prediction", "eps") == "flow" else ug.VE


def layer_names(model) -> tuple:
    """The model's cross-attention layer names, down → up (``models.LAYERS`` for ``ShapesUNet``)."""
    return tuple(getattr(model, "LAYERS", None) or model.cross_attention().keys())


def to_internals(maps: dict, feats, order: tuple = LAYERS) -> Internals:
    """The engine's ``Internals``: maps resized (bilinear, as the SD bridge ``nodes/attention_capture.py`` does)
    to the largest captured resolution, in ``order`` (the model's layer order)."""
    h = max(m.shape[1] for m in maps.values())
    w = max(m.shape[2] for m in maps.values())
    out = {}
    for name in sorted(maps, key=lambda n: order.index(n) if n in order else len(order)):
        m = maps[name]
        if m.shape[1:3] != (h, w):
            m = F.interpolate(m.permute(0, 3, 1, 2), size=(h, w), mode="bilinear",
                              align_corners=False).permute(0, 2, 3, 1)
        out[name] = m
    return Internals(out, feats)


def guided_call(model, z: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, null_tokens: torch.Tensor,
                cfg_scale: float, capture, order, resize: bool):
    """The network's output with CFG (``out(∅) + s·(out(c) − out(∅))``, uncond and cond in one batch, uncond first;
    ``s = 1`` skips the uncond pass) and, with a ``capture``, the cond rows' ``Internals`` (maps resized to one
    resolution unless ``resize`` is False); ``(output, None)`` without one."""
    b = z.shape[0]
    cond = tokens.to(z.device).expand(b, -1)
    guided = cfg_scale != 1.0
    if guided:
        uncond = null_tokens.to(z.device).reshape(-1, cond.shape[1]).expand(b, -1)
        z, t, ctx = torch.cat([z, z]), torch.cat([t, t]), torch.cat([uncond, cond])
    else:
        ctx = cond
    internals = None
    if capture is None:
        out = model(z, t, ctx)
    else:
        layers, features = _layers_of(capture)
        with model.capture(layers, features) as rec:
            out = model(z, t, ctx)
        keep = slice(b, 2 * b) if guided else slice(0, b)
        maps = {k: v[keep] for k, v in rec.maps.items()}
        feats = rec.feats[keep] if features else None
        internals = to_internals(maps, feats, order) if resize else Internals(maps, feats)
    if guided:
        o_u, o_c = out.chunk(2)
        out = o_u + cfg_scale * (o_c - o_u)
    return out, internals


def make_denoiser(model: ShapesUNet, tokens: torch.Tensor, null_tokens: torch.Tensor, cfg_scale: float,
                  schedule: Optional[Schedule] = None, resize: bool = True):
    """``denoise(x, sigma, capture=None)`` for ``guidance.sample_universal``.

    tokens ``[B, T]`` (one caption per sample, or ``[1, T]`` broadcast), null_tokens ``[T]``/``[1, T]``/``[B, T]``;
    x ``[B, 3, 32, 32]`` in VE form, sigma ``[B]`` (or a scalar). Returns x̂0; with a ``capture``
    (``guidance.selfguidance.CaptureRequest``: ``layers`` None = every layer, ``features`` = Ψ or not; any other
    non-None value = everything) ``(x̂0, guidance.selfguidance.Internals)`` of the requested layers, resized to
    their largest resolution, and Ψ (else ``feats`` None) — cond rows only when cond and uncond share the batch.
    x̂0 is the same with and without a capture. ``resize=False`` keeps every map at its layer's own resolution
    (16×16 or 8×8; the probe's setting).

    The model's output is read by its ``prediction`` attribute: ``"eps"`` (default, ``x̂0 = x − σ·ε̂``) or ``"v"``
    (``x̂0 = α·z − s·v̂`` with ``α = 1/√(1+σ²)``, ``s = σ/√(1+σ²)``, CFG applied to v̂); the schedule defaults to
    the model's (``schedule_of``). A ``"flow"`` model (rectified flow, ``mmdit.ShapesMMDiT``) gets
    ``adapter_flow.make_denoiser``: the engine's FLOW family, ``x = (1−σ)·x0 + σ·n``, to be sampled with
    ``parameterization_of(model)``.
    """
    prediction = getattr(model, "prediction", "eps")
    if prediction == "flow":   # a rectified-flow model: the engine's FLOW family, σ = t (adapter_flow)
        from . import adapter_flow

        return adapter_flow.make_denoiser(model, tokens, null_tokens, cfg_scale, resize=resize)
    schedule = schedule or schedule_of(model)
    order = layer_names(model)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, capture: Optional[object] = None):
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(b)
        s = sigma.view(-1, 1, 1, 1)
        z = x / (1.0 + s * s).sqrt()
        t = schedule.sigma_to_t(sigma.cpu()).to(x.device)
        eps, internals = guided_call(model, z, t, tokens, null_tokens, cfg_scale, capture, order, resize)
        if prediction == "v":
            # α·z − s_vp·v̂ with z = x/√(1+σ²), α = 1/√(1+σ²), s_vp = σ/√(1+σ²)
            x0 = x / (1.0 + s * s) - s / (1.0 + s * s).sqrt() * eps.to(x.dtype)
        else:
            x0 = x - s * eps.to(x.dtype)
        return x0 if capture is None else (x0, internals)

    return denoise


# ---------------------------------------------------------------------------------------------- sampling
def initial_noise(n: int, seed: int, sigma_max: float) -> torch.Tensor:
    """``σ_max · N(0, I)`` ``[n, 3, 32, 32]`` from ``torch.Generator().manual_seed(seed)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, data.SIZE, data.SIZE), generator=gen) * sigma_max


def sample(model: ShapesUNet, captions, seed: int, steps: int = 50, cfg: float = 3.0, *, guidance=None,
           settings=None, callback=None, stats=None) -> torch.Tensor:
    """Samples ``[N, 3, 32, 32]`` in [-1, 1] (clamped) for ``captions`` (list of str) through the engine's
    ``sample_universal`` (DDIM = Euler in VE form, ``steps`` uniformly spaced timesteps, then σ = 0)."""
    import guidance as ug

    tokens = data.tokens(captions)
    null = data.tokens([""])
    denoise = make_denoiser(model, tokens, null, cfg)
    sigmas = schedule_of(model).ddim_sigmas(steps)
    x = initial_noise(len(captions), seed, float(sigmas[0]))
    with torch.no_grad():
        out = ug.sample_universal(denoise, x, sigmas, guidance=guidance, decode=data.decode,
                                  settings=settings or ug.Settings(), parameterization=parameterization_of(model),
                                  generator=torch.Generator().manual_seed(seed + 1), callback=callback, stats=stats)
    return out.clamp(-1.0, 1.0)
