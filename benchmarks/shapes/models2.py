"""A second, independently trained shapes model: another architecture, a cosine schedule reaching σ = 316, v-prediction.

It exists so that the self-guidance benchmark can be run on a setting that differs from ``models.ShapesUNet`` in
everything that the engine could be over-fitted to: the noise schedule (cosine, σ from 0.02 to 316, against the
scaled-linear schedule's 0.029–14.6), the prediction target (v instead of ε), the channel widths, and where the
cross-attention sits (16×16 in the encoder, 8×8 in the middle, 16×16 **and 32×32** in the decoder; no 8×8 decoder
layer). The caption goes through the same kind of causal text layer (``models.TextEncoder``), and its mean over the
caption's tokens is also added to the time embedding (a second conditioning path the first model does not have).

``ShapesUNetV`` (v-prediction, 3×32×32 in): channels 32/64/96 at 32²/16²/8², one residual block per level and
path. Cross-attention layers, by name and resolution: ``enc16`` (16×16), ``mid8`` (8×8, with self-attention),
``dec16`` (16×16), ``dec32`` (32×32). The capture interface is ``models.ShapesUNet``'s:
``with net.capture(layers=None, features=True) as rec: net(z, t, tokens)`` fills ``rec.maps[name]`` ``[B,H,W,T]``
(head mean, fp32, differentiable) and ``rec.feats`` (Ψ: the output of the ``dec16`` stage, ``[B, 64, 16, 16]``).

Schedule (``CosineSchedule``): T = 1000 discrete steps, ``σ_t = tan(π/2 · u_t)`` with ``u_t`` uniform from
``u(σ_min = 0.02)`` to ``u(σ_max = 316.2)`` (ᾱ_t = cos²(π/2·u_t) = 1/(1+σ²) — the cosine schedule of Nichol &
Dhariwal without its offset, truncated at ᾱ = 1e-5). Why v: an ε-prediction model on a cosine schedule to σ = 100
sampled tinted, noisy images (x̂0 = x − σ·ε̂ multiplies the ε error by σ); with v, x̂0 = α·z − s·v̂ (α = 1/√(1+σ²),
s = σ/√(1+σ²)) and at large σ x̂0 ≈ −v̂, so no error is multiplied. The adapter converts v̂ to x̂0.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.digits.models import ResBlock, timestep_embedding

from .adapter import Schedule
from .models import WEIGHTS, Attention, Recording, TextEncoder, Transformer, parameter_count

LAYERS = ("enc16", "mid8", "dec16", "dec32")    # cross-attention layer names, down → up
DECODER = ("dec16", "dec32")                    # the decoder-path layers (what the SD recipe reads)
FILE = "diffusion_cosine.safetensors"
SIGMA_MIN, SIGMA_MAX = 0.02, 316.2


class CosineSchedule(Schedule):
    """The cosine schedule of this model: ``σ_t = tan(π/2·u_t)``, ``u_t`` uniform over t = 0…T-1 from
    ``u(sigma_min)`` to ``u(sigma_max)``; same interface as ``adapter.Schedule`` (σ table, log-σ interpolation,
    ``ddim_sigmas``)."""

    def __init__(self, steps: int = 1000, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX):
        self.steps = steps
        u0, u1 = 2 / math.pi * math.atan(sigma_min), 2 / math.pi * math.atan(sigma_max)
        u = torch.linspace(u0, u1, steps, dtype=torch.float64)
        sig = torch.tan(math.pi / 2 * u)
        self.alphas_cumprod = 1.0 / (1.0 + sig * sig)
        self.sigmas = sig.float()
        self.log_sigmas = self.sigmas.log()


COSINE = CosineSchedule()


class CrossBlock(nn.Module):
    """GroupNorm → 1×1 in → [LN, cross-attention ``name``] → [LN, GELU MLP] → 1×1 out, residual: a transformer
    block without self-attention, for the 16×16 and 32×32 layers."""

    def __init__(self, ch: int, context_dim: int, heads: int, name: str):
        super().__init__()
        self.norm = nn.GroupNorm(8, ch)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.ln2, self.ln3 = nn.LayerNorm(ch), nn.LayerNorm(ch)
        self.attn2 = Attention(ch, context_dim, heads, name=name)
        self.ff = nn.Sequential(nn.Linear(ch, 2 * ch), nn.GELU(), nn.Linear(2 * ch, ch))
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        y = y + self.attn2(self.ln2(y), context, (h, w))
        y = y + self.ff(self.ln3(y))
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


class ShapesUNetV(nn.Module):
    """v(z_t, t, tokens) for 3×32×32 images in [-1, 1]; ``t`` is the (continuous) timestep in [0, 1000) of
    ``COSINE``. ``prediction = "v"`` and ``schedule`` tell the adapter how to read the output."""

    prediction = "v"
    LAYERS = LAYERS

    def __init__(self, ch: int = 32, emb: int = 128, context_dim: int = 64, heads: int = 4):
        super().__init__()
        c1, c2, c3 = ch, 2 * ch, 3 * ch
        self.config = dict(ch=ch, emb=emb, context_dim=context_dim, heads=heads)
        self.schedule = COSINE
        self.text = TextEncoder(context_dim, heads)
        self.time = nn.Sequential(nn.Linear(64, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.pooled = nn.Linear(context_dim, emb)
        self.inc = nn.Conv2d(3, c1, 3, padding=1)
        self.d32 = ResBlock(c1, c1, emb)
        self.down1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.d16, self.t_enc16 = ResBlock(c2, c2, emb), CrossBlock(c2, context_dim, heads, "enc16")
        self.down2 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.m1, self.t_mid8 = ResBlock(c3, c3, emb), Transformer(c3, context_dim, heads, "mid8")
        self.m2 = ResBlock(c3, c3, emb)
        self.up1 = nn.Conv2d(c3, c2, 3, padding=1)
        self.u16, self.t_dec16 = ResBlock(2 * c2, c2, emb), CrossBlock(c2, context_dim, heads, "dec16")
        self.up2 = nn.Conv2d(c2, c1, 3, padding=1)
        self.u32, self.t_dec32 = ResBlock(2 * c1, c1, emb), CrossBlock(c1, context_dim, heads, "dec32")
        self.out_norm = nn.GroupNorm(8, c1)
        self.out = nn.Conv2d(c1, 3, 3, padding=1)
        self._recording: Recording | None = None

    def cross_attention(self) -> dict[str, Attention]:
        return {t.attn2.name: t.attn2 for t in (self.t_enc16, self.t_mid8, self.t_dec16, self.t_dec32)}

    @contextmanager
    def capture(self, layers=None, features: bool = True):
        """As ``models.ShapesUNet.capture``: maps of the named ``layers`` (``None``: all), Ψ with ``features``."""
        rec = Recording()
        named = self.cross_attention()
        if layers is not None:
            unknown = sorted(set(layers) - set(named))
            if unknown:
                raise ValueError(f"unknown cross-attention layers {unknown}; this model has {list(named)}")
        chosen = [a for n, a in named.items() if layers is None or n in layers]
        for layer in chosen:
            layer.sink = rec.maps
        self._recording = rec if features else None
        try:
            yield rec
        finally:
            for layer in chosen:
                layer.sink = None
            self._recording = None

    def forward(self, z: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        ctx = self.text(tokens)
        emb = self.time(timestep_embedding(t, 64)) + self.pooled(ctx.mean(dim=1))
        h32 = self.d32(self.inc(z), emb)
        h16 = self.t_enc16(self.d16(self.down1(h32), emb), ctx)
        h = self.m2(self.t_mid8(self.m1(self.down2(h16), emb), ctx), emb)
        h = self.up1(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.t_dec16(self.u16(torch.cat([h, h16], 1), emb), ctx)
        if self._recording is not None:
            self._recording.feats = h.float()
        h = self.up2(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.t_dec32(self.u32(torch.cat([h, h32], 1), emb), ctx)
        return self.out(F.silu(self.out_norm(h)))


def load_unet(folder: Path = WEIGHTS, file: str = FILE) -> ShapesUNetV:
    """The shipped cosine/v model (eval mode, no parameter gradients)."""
    from safetensors.torch import load_file

    from .models import file_meta

    path = Path(folder) / file
    meta = file_meta(path)
    net = ShapesUNetV(**{k: meta[k] for k in ("ch", "emb", "context_dim", "heads") if k in meta})
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


__all__ = ["ShapesUNetV", "CosineSchedule", "COSINE", "LAYERS", "load_unet", "parameter_count"]
