"""The networks of the shapes benchmark: a text-conditioned ε-UNet with named cross-attention, and a shape classifier.

``ShapesUNet`` (ε-prediction, 32×32×3 in, 1.6 M parameters): channels 24/48/96 at 32²/16²/8², a residual block
per level and path, and a transformer block (self-attention, cross-attention to the caption, feed-forward) at
16×16 and 8×8 in the down path, the middle and the up path (self-attention only at 8×8). The context comes
from learned word + position embeddings of the ``MAX_TOKENS`` caption tokens through one causal transformer
layer (``TextEncoder``, CLIP-like: it lets a shape word carry its colour — with plain embeddings a 1500-iteration
model drew the right colours but bound them to the wrong shapes in half of the two-object scenes and ignored
the relation words). Cross-attention layers, by name and resolution:
``down16`` (16×16), ``down8``, ``mid8``, ``up8`` (8×8), ``up16`` (16×16). Their softmax over the tokens is computed
explicitly, so a capture keeps autograd intact.

Capture (``with net.capture(layers=None, features=True) as rec: net(z, t, tokens)``): every requested layer
(``None``: all) writes its attention probabilities to ``rec.maps[name]`` as ``[B, H, W, T]`` (mean over heads,
fp32, all T tokens, differentiable) and, with ``features``, the output of the ``up16`` stage (before upsampling)
to ``rec.feats`` ``[B, 48, 16, 16]`` (Ψ, appearance). Outside a capture the layers only test ``sink is None``.

``ShapeClassifier``: a small CNN on 16×16 object-mask crops (see ``metrics.crop``) → circle / square / triangle;
trained on clean rendered shapes only, independent of the diffusion model.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.digits.models import ResBlock, timestep_embedding  # the digits model's blocks, unchanged

from .data import MAX_TOKENS, VOCAB

WEIGHTS = Path(__file__).resolve().parent / "weights"
LAYERS = ("down16", "down8", "mid8", "up8", "up16")   # cross-attention layer names, down → up
CROP = 16                                              # side of the shape classifier's input crop



def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, heads·d]`` → ``[B, heads, N, d]``."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention of pixel queries over ``context`` (self-attention when ``context`` is the pixels).

    The probabilities ``softmax(q·kᵀ/√d)`` ``[B, heads, N, T]`` are computed explicitly; when ``sink`` is a dict
    and ``name`` is set, their head mean is stored there as ``[B, H, W, T]`` fp32 (with autograd).
    """

    def __init__(self, dim: int, context_dim: int, heads: int, name: str | None = None):
        super().__init__()
        self.heads, self.name, self.sink = heads, name, None
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        q, k, v = _heads(self.to_q(x), self.heads), _heads(self.to_k(context), self.heads), _heads(self.to_v(context), self.heads)
        probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
        if self.sink is not None:
            self.sink[self.name] = probs.float().mean(dim=1).unflatten(1, hw)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).flatten(2)
        return self.to_out(out)


class Transformer(nn.Module):
    """GroupNorm → 1×1 in → [LN, self-attention] → [LN, cross-attention ``name``] → [LN, GELU MLP ×2] → 1×1 out,
    residual. Self-attention only where ``self_attention`` (the 8×8 blocks: it is cheap there)."""

    def __init__(self, ch: int, context_dim: int, heads: int, name: str, self_attention: bool = True):
        super().__init__()
        self.norm = nn.GroupNorm(8, ch)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(ch), nn.LayerNorm(ch), nn.LayerNorm(ch)
        self.attn1 = Attention(ch, ch, heads) if self_attention else None
        self.attn2 = Attention(ch, context_dim, heads, name=name)
        self.ff = nn.Sequential(nn.Linear(ch, 2 * ch), nn.GELU(), nn.Linear(2 * ch, ch))
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # [B, HW, C]
        if self.attn1 is not None:
            n = self.ln1(y)
            y = y + self.attn1(n, n, (h, w))
        y = y + self.attn2(self.ln2(y), context, (h, w))
        y = y + self.ff(self.ln3(y))
        return x + self.proj_out(y.transpose(1, 2).view(b, c, h, w))


class TextEncoder(nn.Module):
    """Tokens ``[B, T]`` → context ``[B, T, dim]``: word + position embeddings, one pre-LN transformer layer with
    *causal* self-attention (as CLIP's: a token sees itself and the words before it), final LayerNorm."""

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.word = nn.Embedding(len(VOCAB), dim)
        self.pos = nn.Parameter(torch.randn(MAX_TOKENS, dim) * 0.02)
        self.ln1, self.ln2, self.ln_out = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.word(tokens) + self.pos[: tokens.shape[1]]
        q, k, v = (_heads(t, self.heads) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2))
        x = x + self.mlp(self.ln2(x))
        return self.ln_out(x)


@dataclass
class Recording:
    """What one forward pass under ``ShapesUNet.capture`` wrote: ``maps[name]`` ``[B,H,W,T]`` and Ψ ``feats``."""

    maps: dict = field(default_factory=dict)
    feats: torch.Tensor | None = None


class ShapesUNet(nn.Module):
    """ε(z_t, t, tokens) for 3×32×32 images in [-1, 1]; ``t`` is the (continuous) DDPM timestep in [0, 1000)."""

    def __init__(self, ch: int = 24, emb: int = 128, context_dim: int = 64, heads: int = 4):
        super().__init__()
        c1, c2, c3 = ch, 2 * ch, 4 * ch
        self.config = dict(ch=ch, emb=emb, context_dim=context_dim, heads=heads)
        self.text = TextEncoder(context_dim, heads)
        self.time = nn.Sequential(nn.Linear(64, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inc = nn.Conv2d(3, c1, 3, padding=1)
        self.d32 = ResBlock(c1, c1, emb)
        self.down1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.d16, self.t_down16 = ResBlock(c2, c2, emb), Transformer(c2, context_dim, heads, "down16", False)
        self.down2 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.d8, self.t_down8 = ResBlock(c3, c3, emb), Transformer(c3, context_dim, heads, "down8")
        self.m1, self.t_mid8, self.m2 = ResBlock(c3, c3, emb), Transformer(c3, context_dim, heads, "mid8"), ResBlock(c3, c3, emb)
        self.u8, self.t_up8 = ResBlock(2 * c3, c3, emb), Transformer(c3, context_dim, heads, "up8")
        self.up1 = nn.Conv2d(c3, c2, 3, padding=1)
        self.u16, self.t_up16 = ResBlock(2 * c2, c2, emb), Transformer(c2, context_dim, heads, "up16", False)
        self.up2 = nn.Conv2d(c2, c1, 3, padding=1)
        self.u32 = ResBlock(2 * c1, c1, emb)
        self.out_norm = nn.GroupNorm(8, c1)
        self.out = nn.Conv2d(c1, 3, 3, padding=1)
        self._recording: Recording | None = None

    def cross_attention(self) -> dict[str, Attention]:
        """The named cross-attention layers, in ``LAYERS`` order."""
        return {t.attn2.name: t.attn2 for t in (self.t_down16, self.t_down8, self.t_mid8, self.t_up8, self.t_up16)}

    @contextmanager
    def capture(self, layers=None, features: bool = True):
        """Record the attention maps of the named ``layers`` (``None``: every one) and, with ``features``, Ψ during
        the forward passes inside the block. Unknown layer names are an error naming the model's layers."""
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

    def context(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` → context ``[B, T, context_dim]``."""
        return self.text(tokens)

    def forward(self, z: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, 64))
        ctx = self.context(tokens)
        h32 = self.d32(self.inc(z), emb)
        h16 = self.t_down16(self.d16(self.down1(h32), emb), ctx)
        h8 = self.t_down8(self.d8(self.down2(h16), emb), ctx)
        h = self.m2(self.t_mid8(self.m1(h8, emb), ctx), emb)
        h = self.t_up8(self.u8(torch.cat([h, h8], 1), emb), ctx)
        h = self.up1(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.t_up16(self.u16(torch.cat([h, h16], 1), emb), ctx)
        if self._recording is not None:
            self._recording.feats = h.float()
        h = self.up2(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.u32(torch.cat([h, h32], 1), emb)
        return self.out(F.silu(self.out_norm(h)))


class ShapeClassifier(nn.Module):
    """Object-mask crop ``[B, 1, 16, 16]`` in [0, 1] → logits over ``data.SHAPES``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------------------------- weights
FILES = {"diffusion": "diffusion.safetensors", "classifier": "shape_classifier.safetensors"}


def write_weights(module: nn.Module, meta: dict, path: Path) -> Path:
    """Write ``module``'s state dict to ``path`` as fp16 (half the size; loading casts back to fp32) with ``meta``
    (JSON, sorted keys) as safetensors metadata. Every shipped shapes model is written by this."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"meta": json.dumps(meta, sort_keys=True)})
    return path


def file_meta(path: Path) -> dict:
    """The ``meta`` a weights file was written with (``write_weights``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}"))


def save(module: nn.Module, name: str, meta: dict, folder: Path = WEIGHTS) -> Path:
    return write_weights(module, meta, Path(folder) / FILES[name])


def read_meta(name: str, folder: Path = WEIGHTS) -> dict:
    return file_meta(Path(folder) / FILES[name])


def _load(module: nn.Module, name: str, folder: Path) -> nn.Module:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(folder / FILES[name])))
    return module.eval().requires_grad_(False)


def load_unet(folder: Path = WEIGHTS) -> ShapesUNet:
    """The shipped diffusion model (eval mode, no parameter gradients)."""
    meta = read_meta("diffusion", folder)
    net = ShapesUNet(**{k: meta[k] for k in ("ch", "emb", "context_dim", "heads") if k in meta})
    return _load(net, "diffusion", folder)


def load_classifier(folder: Path = WEIGHTS) -> ShapeClassifier:
    return _load(ShapeClassifier(), "classifier", folder)
