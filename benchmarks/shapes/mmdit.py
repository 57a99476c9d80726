"""A tiny text-conditioned MMDiT (joint attention over text and image tokens) trained as a rectified flow.

The transformer model of the shapes benchmark, built as SD3's MMDiT / Flux's double and single blocks are, so
that self-guidance can be measured on joint attention, not only on a UNet's cross-attention:

- **Tokens.** The shipped model (``hourglass=24``, ``Hourglass``): a convolutional encoder — 3×3 conv and a
  residual block at 32² (24 channels), stride-2 convs and blocks at 16² (48) and 8² (96) — turns the image into
  the 8×8 grid of 64 image tokens (linear to the width, plus a learned position embedding); after the blocks a
  decoder with the encoder's features as skips draws the pixels. It is the stand-in for the VAE of SD3 / Flux,
  trained end to end, conditioned on the time only, so the caption reaches the image only through the blocks.
  (``hourglass=0``: the earlier patch models — ``PATCH``×``PATCH`` patches of the image, or of a 3×3 conv stem's
  ``conv`` channels with a small conv head — never read their shape words; see the README.) The caption's 8
  tokens go through the same causal text layer as the UNets (``models.TextEncoder``), then a linear map to the
  model width.
- **Double blocks** ``double0`` … (SD3 joint blocks / Flux double-stream blocks): text and image keep their own
  weights (adaLN modulation, q/k/v projections, QK-RMSNorm, output projection, MLP) and attend **jointly** over
  ``cat(text, image)`` — text first, as in ComfyUI's and BFL's code.
- **Single blocks** ``single0`` … (Flux single-stream): one stream over the same ``cat(text, image)``, parallel
  attention and MLP (one input projection, one output projection), adaLN from the same vector.
- **Conditioning vector** (adaLN): sinusoidal embedding of the flow time ``t ∈ [0, 1]`` (×1000) through an MLP,
  plus the caption's pooled (mean) context, as Flux adds its pooled CLIP vector. Zero-initialised gates (adaLN-Zero).
- **Objective:** rectified flow, ``x_t = (1 − t)·x0 + t·n``, the network predicts the velocity ``n − x0``.

Capture (``with net.capture(layers=None, features=True) as rec: net(x_t, t, tokens)``), as ``models.ShapesUNet``:
every requested block (``None``: all; names ``LAYERS``) writes the text→image map of its joint attention to
``rec.maps[name]`` ``[B, H, W, T]``: the softmax over **all** keys (text and image) computed explicitly from the
block's q, k (after QK-norm) in fp32, the image-query rows sliced to the text keys (``P[:, :, L_txt:, :L_txt]``),
mean over heads, differentiable. The block's output itself always comes from ``F.scaled_dot_product_attention``,
so the prediction is bit-identical with and without a capture. With ``features``, Ψ = the image stream after
``FEATURE_BLOCK`` as ``[B, C, H, W]`` (``rec.feats``).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.digits.models import ResBlock, timestep_embedding

from .adapter_flow import FLOW_SCHEDULE
from .data import MAX_TOKENS, SIZE
from .models import WEIGHTS, Recording, TextEncoder, file_meta, parameter_count, write_weights

FILE = "mmdit_flow.safetensors"
PATCH = 4
LAYERS = ("double0", "double1", "double2", "double3", "single0")   # capture names of the shipped configuration
LATE = ("double3", "single0")   # its last blocks (the benchmark's "decoder" rows: what late-block recipes read)
# ``ShapesMMDiT``'s constructor settings, as written into a weights file's metadata (``load`` reads them back).
CONFIG = ("dim", "heads", "depth", "single", "mlp", "context_dim", "patch", "feature_block", "conv", "local", "pooled",
          "hourglass")


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class RMSNorm(nn.Module):
    """Per-head RMS norm of q or k (QK-norm, as SD3.5 / Flux), learnable scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.scale


class JointAttention:
    """The attention of a block over ``cat(text, image)``: SDPA for the output, and — when the block's ``sink`` is
    set — the explicit fp32 softmax over all keys, image rows × text keys, head mean, into ``sink[name]``."""

    @staticmethod
    def run(block, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_txt: int, hw: tuple) -> torch.Tensor:
        if block.sink is not None:
            block.sink[block.name] = joint_map(q, k, n_txt, hw)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).flatten(2)


def joint_map(q: torch.Tensor, k: torch.Tensor, n_txt: int, hw: tuple) -> torch.Tensor:
    """``softmax(q·kᵀ/√d)`` over all keys in fp32, image-query rows sliced to the text keys, mean over heads:
    ``[B, H, W, n_txt]`` (q, k ``[B, heads, n_txt + H·W, d]``, text first)."""
    qf, kf = q.float(), k.float()
    probs = (qf[:, :, n_txt:] @ kf.transpose(-1, -2) * qf.shape[-1] ** -0.5).softmax(dim=-1)
    return probs[..., :n_txt].mean(dim=1).unflatten(1, hw)


class LocalMLP(nn.Module):
    """The image stream's MLP with a depthwise 3×3 convolution over the token grid between its two linear maps
    (SANA's Mix-FFN): ``fc2(GELU(dwconv(fc1(x))))``. ``hw`` is the grid; tokens are row-major."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)

    def forward(self, x: torch.Tensor, hw: tuple) -> torch.Tensor:
        return self.fc2(F.gelu(local_conv(self.dw, self.fc1(x), hw), approximate="tanh"))


def local_conv(conv: nn.Conv2d, x: torch.Tensor, hw: tuple) -> torch.Tensor:
    """``conv`` over row-major grid tokens ``[B, H·W, C]`` → ``[B, H·W, C]``."""
    grid = x.transpose(1, 2).unflatten(2, hw)
    return conv(grid).flatten(2).transpose(1, 2)


class Stream(nn.Module):
    """One stream's weights in a double block: adaLN (6 vectors), qkv, QK-norm, output projection, GELU MLP
    (``local``: the image stream's Mix-FFN, ``LocalMLP``)."""

    def __init__(self, dim: int, heads: int, mlp: int, local: bool = False):
        super().__init__()
        self.heads = heads
        self.mod = nn.Linear(dim, 6 * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = RMSNorm(dim // heads), RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.local = local
        self.mlp = LocalMLP(dim, mlp * dim) if local else nn.Sequential(
            nn.Linear(dim, mlp * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp * dim, dim))
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def pre(self, x: torch.Tensor, vec: torch.Tensor):
        m = self.mod(F.silu(vec)).chunk(6, dim=-1)
        q, k, v = (_heads(t, self.heads) for t in self.qkv(_modulate(self.norm1(x), m[0], m[1])).chunk(3, dim=-1))
        return self.q_norm(q), self.k_norm(k), v, m

    def post(self, x: torch.Tensor, attn: torch.Tensor, m, hw: tuple | None = None) -> torch.Tensor:
        x = x + m[2][:, None] * self.proj(attn)
        h = _modulate(self.norm2(x), m[3], m[4])
        return x + m[5][:, None] * (self.mlp(h, hw) if self.local else self.mlp(h))


class DoubleBlock(nn.Module):
    """SD3 joint block / Flux double-stream block: per-stream weights, joint attention over ``cat(txt, img)``."""

    def __init__(self, dim: int, heads: int, mlp: int, name: str, local: bool = False):
        super().__init__()
        self.name, self.sink = name, None
        self.txt, self.img = Stream(dim, heads, mlp), Stream(dim, heads, mlp, local)

    def forward(self, txt: torch.Tensor, img: torch.Tensor, vec: torch.Tensor, hw: tuple):
        tq, tk, tv, tm = self.txt.pre(txt, vec)
        iq, ik, iv, im = self.img.pre(img, vec)
        n = txt.shape[1]
        attn = JointAttention.run(self, torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), n, hw)
        return self.txt.post(txt, attn[:, :n], tm), self.img.post(img, attn[:, n:], im, hw)


class SingleBlock(nn.Module):
    """Flux single-stream block over ``cat(txt, img)``: one input projection to qkv and the MLP, one output
    projection of ``cat(attention, GELU(mlp))``, adaLN (shift, scale, gate) from the conditioning vector."""

    def __init__(self, dim: int, heads: int, mlp: int, name: str, local: bool = False):
        super().__init__()
        self.name, self.sink, self.heads, self.dim = name, None, heads, dim
        # ``local``: a depthwise 3×3 convolution over the image tokens' MLP branch (Mix-FFN), text rows untouched.
        self.dw = nn.Conv2d(mlp * dim, mlp * dim, 3, padding=1, groups=mlp * dim) if local else None
        self.mod = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear1 = nn.Linear(dim, 3 * dim + mlp * dim)
        self.q_norm, self.k_norm = RMSNorm(dim // heads), RMSNorm(dim // heads)
        self.linear2 = nn.Linear(dim + mlp * dim, dim)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, n_txt: int, hw: tuple) -> torch.Tensor:
        shift, scale, gate = self.mod(F.silu(vec)).chunk(3, dim=-1)
        qkv, mlp = self.linear1(_modulate(self.norm(x), shift, scale)).split([3 * self.dim, self.linear1.out_features - 3 * self.dim], -1)
        q, k, v = (_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))
        attn = JointAttention.run(self, self.q_norm(q), self.k_norm(k), v, n_txt, hw)
        if self.dw is not None:
            mlp = torch.cat([mlp[:, :n_txt], local_conv(self.dw, mlp[:, n_txt:], hw)], 1)
        return x + gate[:, None] * self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], -1))


class Hourglass(nn.Module):
    """The convolutional encoder and decoder around the transformer (``ShapesMMDiT(hourglass=c)``): 3×3 conv and a
    residual block at 32² (c), stride-2 conv and a block at 16² (2c), again at 8² (4c: the tokens' input); the
    decoder mirrors it with the encoder's features concatenated at each level (U-Net skips) and ends in GroupNorm,
    SiLU and a zero-initialised 3×3 conv to RGB. Residual blocks take the time embedding (``emb`` wide)."""

    def __init__(self, c: int, emb: int):
        super().__init__()
        self.inc = nn.Conv2d(3, c, 3, padding=1)
        self.e32, self.e16, self.e8 = ResBlock(c, c, emb), ResBlock(2 * c, 2 * c, emb), ResBlock(4 * c, 4 * c, emb)
        self.down1, self.down2 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1)
        self.d8, self.d16, self.d32 = ResBlock(8 * c, 4 * c, emb), ResBlock(4 * c, 2 * c, emb), ResBlock(2 * c, c, emb)
        self.up1, self.up2 = nn.Conv2d(4 * c, 2 * c, 3, padding=1), nn.Conv2d(2 * c, c, 3, padding=1)
        self.out_norm = nn.GroupNorm(8, c)
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def encode(self, x: torch.Tensor, emb: torch.Tensor) -> list:
        h32 = self.e32(self.inc(x), emb)
        h16 = self.e16(self.down1(h32), emb)
        return [h32, h16, self.e8(self.down2(h16), emb)]

    def decode(self, h: torch.Tensor, skips: list, emb: torch.Tensor) -> torch.Tensor:
        h32, h16, h8 = skips
        h = self.d8(torch.cat([h, h8], 1), emb)
        h = self.d16(torch.cat([self.up1(F.interpolate(h, scale_factor=2.0, mode="nearest")), h16], 1), emb)
        h = self.d32(torch.cat([self.up2(F.interpolate(h, scale_factor=2.0, mode="nearest")), h32], 1), emb)
        return self.out(F.silu(self.out_norm(h)))


class ShapesMMDiT(nn.Module):
    """v(x_t, t, tokens) = n − x0 for 3×32×32 images in [-1, 1]; ``t`` is the flow time in [0, 1] (1 = noise).

    ``prediction = "flow"`` tells the adapter to read the output as a velocity on ``x_t = (1−t)·x0 + t·n``."""

    prediction = "flow"

    def __init__(self, dim: int = 128, heads: int = 4, depth: int = 4, single: int = 1, mlp: int = 2,
                 context_dim: int = 64, patch: int = PATCH, feature_block: int | None = None, conv: int = 0,
                 local: int = 0, pooled: int = 1, hourglass: int = 0):
        super().__init__()
        self.config = dict(dim=dim, heads=heads, depth=depth, single=single, mlp=mlp, context_dim=context_dim,
                           patch=patch, feature_block=feature_block, conv=conv,
                           local=local, pooled=pooled, hourglass=hourglass)
        # ``hourglass`` c > 0: a convolutional encoder (32² → 16² → 8², channels c / 2c / 4c, a residual block per
        # level) turns the image into the 8×8 grid of image tokens, and a decoder with skips back (``Hourglass``),
        # conditioned on the time only — the stand-in for SD3's / Flux's VAE, trained end to end. The caption
        # reaches the image only inside the transformer (joint attention and the pooled adaLN vector).
        self.hourglass = Hourglass(hourglass, dim) if hourglass else None
        if hourglass:
            patch, conv = 1, 0
        self.patch, self.grid = patch, (SIZE // 4 if hourglass else SIZE // patch)
        self.schedule = FLOW_SCHEDULE   # σ = t, from 1 to 0 (adapter_flow)
        self.LAYERS = tuple(f"double{i}" for i in range(depth)) + tuple(f"single{i}" for i in range(single))
        # Ψ: the image stream after this double block (default: the middle one).
        self.feature_block = depth // 2 - 1 if feature_block is None else feature_block
        self.text = TextEncoder(context_dim, heads)
        self.context_in = nn.Linear(context_dim, dim)
        # ``pooled`` 0: the conditioning vector is the time alone (no pooled caption), so words reach the image only
        # through the joint attention.
        self.pooled = nn.Linear(context_dim, dim) if pooled else None
        self.time = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        # ``conv`` > 0: a 3×3 conv stem before the patches and a pixel head after them (U-ViT's final conv, and a
        # stand-in for the VAE decoder a latent MMDiT has): the head sees the unpatchified tokens and the stem's
        # features (a skip), so edges need not be drawn patch by patch. 0: the plain linear patch in / out.
        self.conv = conv
        self.stem = nn.Sequential(nn.Conv2d(3, conv, 3, padding=1), nn.SiLU()) if conv else None
        cin = 4 * hourglass if hourglass else (conv if conv else 3)
        self.img_in = nn.Linear(cin * patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(self.grid * self.grid, dim) * 0.02)
        self.doubles = nn.ModuleList(DoubleBlock(dim, heads, mlp, f"double{i}", bool(local)) for i in range(depth))
        self.singles = nn.ModuleList(SingleBlock(dim, heads, mlp, f"single{i}", bool(local)) for i in range(single))
        self.final_mod = nn.Linear(dim, 2 * dim)
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.out_ch = 4 * hourglass if hourglass else (conv // 2 if conv else 3)
        self.final = nn.Linear(dim, self.out_ch * patch * patch)
        zero = [self.final_mod, self.final]
        if hourglass:
            zero = [self.final_mod, self.hourglass.out]
        elif conv:
            self.head = nn.Sequential(nn.Conv2d(self.out_ch + conv, conv, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(conv, 3, 3, padding=1))
            zero = [self.final_mod, self.head[-1]]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self._recording: Recording | None = None

    def blocks(self) -> dict:
        """The attention blocks by capture name, in order (``double0`` …, ``single0`` …)."""
        return {b.name: b for b in list(self.doubles) + list(self.singles)}

    @contextmanager
    def capture(self, layers=None, features: bool = True):
        """Record the text→image maps of the named blocks (``None``: every one) and, with ``features``, Ψ."""
        rec = Recording()
        named = self.blocks()
        if layers is not None:
            unknown = sorted(set(layers) - set(named))
            if unknown:
                raise ValueError(f"unknown attention blocks {unknown}; this model has {list(named)}")
        chosen = [blk for n, blk in named.items() if layers is None or n in layers]
        for blk in chosen:
            blk.sink = rec.maps
        self._recording = rec if features else None
        try:
            yield rec
        finally:
            for blk in chosen:
                blk.sink = None
            self._recording = None

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.shape  # [B, C, 32, 32] → [B, 64, C·p·p]
        p, g = self.patch, self.grid
        return x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)

    def unpatchify(self, y: torch.Tensor) -> torch.Tensor:
        b = y.shape[0]
        p, g = self.patch, self.grid
        c = y.shape[-1] // (p * p)
        return y.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        ctx = self.text(tokens)
        vec = temb = self.time(timestep_embedding(t * 1000.0, 256))
        if self.pooled is not None:
            vec = vec + self.pooled(ctx.mean(dim=1))
        txt = self.context_in(ctx)
        skips = None
        if self.hourglass is not None:
            skips = self.hourglass.encode(x, temb)
            x = skips[-1]
        stem = self.stem(x) if self.stem is not None else None
        img = self.img_in(self.patchify(x if stem is None else stem)) + self.pos
        hw = (self.grid, self.grid)
        for i, blk in enumerate(self.doubles):
            txt, img = blk(txt, img, vec, hw)
            if i == self.feature_block and self._recording is not None:
                self._recording.feats = img.float().transpose(1, 2).unflatten(2, hw)
        n = txt.shape[1]
        h = torch.cat([txt, img], 1)
        for blk in self.singles:
            h = blk(h, vec, n, hw)
        shift, scale = self.final_mod(F.silu(vec)).chunk(2, dim=-1)
        out = self.unpatchify(self.final(_modulate(self.final_norm(h[:, n:]), shift, scale)))
        if skips is not None:
            return self.hourglass.decode(out, skips, temb)
        return out if stem is None else self.head(torch.cat([out, stem], 1))


def save(net: nn.Module, meta: dict, folder: Path = WEIGHTS) -> Path:
    """fp16 state dict + ``meta`` (JSON, sorted keys) as safetensors metadata (``models.write_weights``)."""
    return write_weights(net, meta, Path(folder) / FILE)


def load(folder: Path = WEIGHTS, file: str = FILE) -> ShapesMMDiT:
    """The shipped MMDiT (eval mode, no parameter gradients)."""
    from safetensors.torch import load_file

    path = Path(folder) / file
    meta = file_meta(path)
    net = ShapesMMDiT(**{k: meta[k] for k in CONFIG if k in meta})
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net.eval().requires_grad_(False)


__all__ = ["ShapesMMDiT", "joint_map", "load", "save", "parameter_count", "FILE", "PATCH", "LAYERS", "LATE", "MAX_TOKENS"]
