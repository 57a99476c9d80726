"""Self-guidance (Epstein et al. 2023): losses on the diffusion model's own cross-attention maps and activations.

An *internal* guidance term reads what the denoiser computed on the way to x̂0 — no decoder, no extra network.
The denoiser, called with a ``CaptureRequest``, returns ``(x̂0, Internals)`` from the same forward pass:

* ``Internals.maps[layer]``: ``[B, H, W, T]`` cross-attention probabilities of the conditional branch (softmax over
  all T context tokens, mean over heads, fp32, differentiable), every layer resized to one resolution;
* ``Internals.feats``: ``[B, C, h, w]`` activations Ψ of one chosen block (for appearance).

Properties of a token's map ``A`` (``[B, H, W]``; positions in [0, 1]², x to the right, y down):

* ``centroid(A)``: the A-weighted mean position (of the min-max normalised map by default: a softmax over few
  tokens leaves a floor everywhere that pulls the raw centroid towards the centre);
* ``size(A)``: the mean of the soft-thresholded map (the fraction of the image the token covers);
* ``shape(A)``: the soft-thresholded map itself;
* ``appearance(A, Ψ)``: Ψ averaged under the token's hard mask (thresholded at 0.5, *detached*, resized to Ψ).

The soft threshold is the paper's: min-max normalise, ``sigmoid(sharpness·(Â − 0.5))``, min-max normalise again.

Edits are L1 losses of a property against a target, ``[B]`` in fp32, averaged over the tokens and the layers. The
target is absolute (a position, a size), or a property of a *reference*: ``"original"`` — the unguided run from
the same noise, captured step by step (the paper's "keep everything else") — or a reference latent, noised to
each step's σ with fixed noise (appearance transfer, real-image layout). The sampler computes the references; a
term only says which one it needs (``reference``).

With the sampler in ``paper`` mode a term's weight is the paper's v: ``D' = D − v·σ²·∇ₓ g`` is its
``ε̃ = ε + v·σ_t·∇_{z_t} g`` (see ``Settings``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

ORIGINAL = "original"
ABSOLUTE = "absolute"
SHARPNESS = 10.0  # the paper's soft-threshold slope


@dataclass(frozen=True)
class CaptureRequest:
    """What the denoiser must record: the named attention layers (``None`` = every layer), Ψ or not, and the token
    positions the terms read (``None`` = all; a host may then compute only these columns of the maps)."""

    layers: Optional[frozenset] = None
    features: bool = False
    tokens: Optional[frozenset] = None

    def __or__(self, other: "CaptureRequest") -> "CaptureRequest":
        layers = None if self.layers is None or other.layers is None else self.layers | other.layers
        tokens = None if self.tokens is None or other.tokens is None else self.tokens | other.tokens
        return CaptureRequest(layers, self.features or other.features, tokens)


@dataclass
class Internals:
    """What one denoiser call captured: ``maps[layer]`` ``[B, H, W, T]`` and ``feats`` ``[B, C, h, w]``."""

    maps: dict = field(default_factory=dict)
    feats: Optional[torch.Tensor] = None

    def token_maps(self, tokens: Sequence[int], layers: Optional[Sequence[str]] = None) -> list:
        """``[B, H, W, K]`` maps of the ``tokens`` for each requested layer present (all when ``layers`` is None)."""
        names = list(self.maps) if layers is None else [n for n in layers if n in self.maps]
        if not names:
            raise ValueError(f"no attention maps captured for the layers {list(layers or [])}; captured: "
                             f"{sorted(self.maps)}")
        out = []
        for name in names:
            m = self.maps[name]
            if max(tokens) >= m.shape[-1]:
                raise ValueError(f"token position {max(tokens)} is outside the context of {m.shape[-1]} tokens")
            out.append(m[..., list(tokens)].float())
        return out

    def detach(self) -> "Internals":
        return Internals({k: v.detach() for k, v in self.maps.items()},
                         None if self.feats is None else self.feats.detach())


# ----------------------------------------------------------------------------------------------- properties

def _grid(h: int, w: int, device) -> tuple:
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    return xs, ys


def normalize(a: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of ``[B, H, W, K]`` over H, W to [0, 1]."""
    lo = a.amin(dim=(1, 2), keepdim=True)
    hi = a.amax(dim=(1, 2), keepdim=True)
    return (a - lo) / (hi - lo).clamp_min(1e-8)


def soft_threshold(a: torch.Tensor, sharpness: float = SHARPNESS) -> torch.Tensor:
    """The paper's threshold: normalise, ``sigmoid(sharpness·(Â − 0.5))``, normalise again (``[B, H, W, K]``)."""
    return normalize(torch.sigmoid(sharpness * (normalize(a) - 0.5)))


def centroid(a: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """``[B, K, 2]``: the (x, y) ∈ [0, 1]² mean position weighted by the map (min-max normalised by default)."""
    w = normalize(a) if normalized else a
    xs, ys = _grid(a.shape[1], a.shape[2], a.device)
    total = w.sum(dim=(1, 2)).clamp_min(1e-8)                       # [B, K]
    cx = (w * xs.view(1, 1, -1, 1)).sum(dim=(1, 2)) / total
    cy = (w * ys.view(1, -1, 1, 1)).sum(dim=(1, 2)) / total
    return torch.stack([cx, cy], dim=-1)


def size(a: torch.Tensor) -> torch.Tensor:
    """``[B, K]``: mean of the soft-thresholded map, the fraction of the image the token covers."""
    return soft_threshold(a).mean(dim=(1, 2))


def shape(a: torch.Tensor) -> torch.Tensor:
    """``[B, H, W, K]``: the soft-thresholded map."""
    return soft_threshold(a)


def scaled_shape(a: torch.Tensor, factor: float) -> torch.Tensor:
    """``[B, H, W, K]``: the soft-thresholded map with its area scaled by ``factor`` (its extent by √factor) about
    its own centroid (the soft shape's weighted mean position); bilinear, zeros outside the image."""
    m = shape(a)
    b, h, w, k = m.shape
    c = centroid(m, normalized=False)                                # [B, K, 2]
    xs, ys = _grid(h, w, a.device)
    scale = float(factor) ** 0.5
    cx, cy = c[..., 0].view(b, 1, 1, k), c[..., 1].view(b, 1, 1, k)
    sx = (cx + (xs.view(1, 1, w, 1) - cx) / scale).expand(b, h, w, k)  # where each output pixel reads from
    sy = (cy + (ys.view(1, h, 1, 1) - cy) / scale).expand(b, h, w, k)
    grid = torch.stack([2 * sx - 1, 2 * sy - 1], dim=-1).permute(0, 3, 1, 2, 4).reshape(b * k, h, w, 2)
    src = m.permute(0, 3, 1, 2).reshape(b * k, 1, h, w)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(b, k, h, w).permute(0, 2, 3, 1)


def hard_mask(a: torch.Tensor, threshold: float = 0.5, core: float = 0.0) -> torch.Tensor:
    """``[B, H, W, K]`` 0/1 mask (soft threshold > ``threshold``), detached: it selects, it is not optimised.
    ``core`` > 0: only the ``core`` fraction of the mask's pixels where the map is highest (at least one)."""
    soft = soft_threshold(a.detach())
    mask = (soft > threshold).float()
    if core > 0:
        b, h, w, k = soft.shape
        flat = soft.permute(0, 3, 1, 2).reshape(b, k, h * w)
        n = (mask.permute(0, 3, 1, 2).reshape(b, k, h * w).sum(-1) * core).ceil().clamp_min(1).long()
        kth = flat.sort(dim=-1, descending=True).values.gather(-1, (n - 1).unsqueeze(-1))   # [B, K, 1]
        mask = mask * (soft >= kth.view(b, 1, 1, k)).float()
    return mask


def appearance(a: torch.Tensor, feats: torch.Tensor, threshold: float = 0.5, core: float = 0.0) -> torch.Tensor:
    """``[B, K, C]``: Ψ averaged under each token's hard mask (soft threshold > ``threshold``; with ``core``, its
    highest ``core`` fraction), resized to Ψ's resolution."""
    mask = hard_mask(a, threshold, core).permute(0, 3, 1, 2)        # [B, K, H, W]
    if mask.shape[-2:] != feats.shape[-2:]:
        mask = F.interpolate(mask, size=feats.shape[-2:], mode="nearest")
    feats = feats.float()
    num = torch.einsum("bkhw,bchw->bkc", mask, feats)
    return num / mask.sum(dim=(2, 3)).clamp_min(1.0).unsqueeze(-1)


# ----------------------------------------------------------------------------------------------------- losses

AUTO = "auto"
AUTO_RATIO = 1.25  # a layer counts for a token when its soft size is within 25 % of the most compact layer's


def compact_layers(maps: list) -> torch.Tensor:
    """``[L, B, K]`` 0/1 weights: per image and token, the layers whose soft-thresholded map is the most compact
    (soft size ≤ ``AUTO_RATIO`` × the smallest over the layers), detached.

    A map that tracks an object covers about the object; a map on the background, or a diffuse one, covers much
    more. On the shapes benchmark this picks, per word, the layers whose centroid tracks the object best (see
    benchmarks/shapes/README.md) — without the ground truth it was measured with, so it applies to any model."""
    sizes = torch.stack([soft_threshold(a.detach()).mean(dim=(1, 2)) for a in maps])  # [L, B, K]
    return (sizes <= AUTO_RATIO * sizes.min(dim=0, keepdim=True).values).float()


class InternalLoss:
    """Base of the self-guidance terms: which tokens and layers, which reference, what to capture.

    ``tokens``: positions in the conditioning's context (all sub-tokens of every occurrence of the word);
    ``layers``: names of the captured attention layers to use; ``None``: every captured one; ``"auto"``: every
    captured one, each token of each image counting only the layers where its map is most compact
    (``compact_layers``). Each subclass computes a value per layer, image and token ``[L, B, K]``; the loss is
    their mean over the layers and tokens that count, ``[B]`` in fp32.
    """

    term_kind = "internal"
    needs_features = False

    # Set by the host adapter: ``layer_rule`` names a choice of layers it resolves for the model at run time (the
    # engine reads only ``layers``); ``context_length`` is the number of context tokens the positions refer to.
    layer_rule = None
    context_length = None

    def __init__(self, tokens: Sequence[int], layers=None, reference=ABSOLUTE, label: str = ""):
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("no token positions given")
        self.tokens = tokens
        self.layers = layers if layers in (None, AUTO) else list(layers)
        if not (isinstance(reference, torch.Tensor) or hasattr(reference, "latent_at")
                or reference in (ABSOLUTE, ORIGINAL)):
            raise ValueError(f"reference must be 'absolute', 'original', a latent tensor or an inversion "
                             f"trajectory, got {reference!r}")
        self.reference = reference
        self.label = label

    def bound(self, layers=None, reference=None) -> "InternalLoss":
        """A copy using ``layers`` (names, or ``"auto"``) and/or ``reference`` (e.g. the latent moved into the
        sampler's space)."""
        import copy
        out = copy.copy(self)
        if layers is not None:
            out.layers = layers if layers == AUTO else list(layers)
        if reference is not None:
            out.reference = reference
        return out

    @property
    def named_layers(self) -> Optional[list]:
        return None if self.layers in (None, AUTO) else self.layers

    @property
    def request(self) -> CaptureRequest:
        names = self.named_layers
        tokens = frozenset(self.tokens) | frozenset(getattr(self, "reference_tokens", None) or ())
        return CaptureRequest(None if names is None else frozenset(names), self.needs_features, tokens)

    def _maps(self, internals: Internals, tokens=None) -> list:
        return internals.token_maps(self.tokens if tokens is None else tokens, self.named_layers)

    def _reference(self, reference: Optional[Internals]) -> Internals:
        if reference is None:
            raise ValueError(f"{type(self).__name__} needs its reference ({self.reference_name}) and got none")
        return reference

    @property
    def reference_name(self) -> str:
        if hasattr(self.reference, "latent_at"):
            return "an inverted image"
        return "a reference latent" if isinstance(self.reference, torch.Tensor) else str(self.reference)

    def combine(self, values: list, maps: list, choose_on: Optional[list] = None) -> torch.Tensor:
        """``[B]``: the mean of the per-layer ``[B, K]`` values over the layers (and tokens) that count. With
        ``"auto"`` layers the choice is made on ``choose_on`` (the reference's maps, for an edit measured against
        the reference: the layers that track the object there, not whichever maps the edit itself makes compact),
        else on ``maps``."""
        v = torch.stack([x.float() for x in values])                         # [L, B, K]
        w = compact_layers(choose_on if choose_on is not None else maps) if self.layers == AUTO \
            else torch.ones_like(v)
        return (w * v).sum(dim=(0, 2)) / w.sum(dim=(0, 2)).clamp_min(1.0)

    def __call__(self, internals: Internals, reference: Optional[Internals] = None) -> torch.Tensor:
        raise NotImplementedError


class MoveLoss(InternalLoss):
    """Move the token's centroid to ``target`` (x, y) ∈ [0, 1]², or by ``shift`` (dx, dy) from the reference's
    centroid (``reference='original'``: where the unguided run puts it). L1, mean over x and y."""

    def __init__(self, tokens, layers=None, *, target=None, shift=None, reference=ABSOLUTE, label=""):
        if (target is None) == (shift is None):
            raise ValueError("give exactly one of target (x, y) or shift (dx, dy)")
        if shift is not None and reference == ABSOLUTE:
            raise ValueError("a move by (dx, dy) is relative to a reference: use reference='original' or a latent")
        super().__init__(tokens, layers, reference if shift is not None else ABSOLUTE, label)
        self.target = None if target is None else torch.tensor([float(target[0]), float(target[1])])
        self.shift = None if shift is None else torch.tensor([float(shift[0]), float(shift[1])])

    def __call__(self, internals, reference=None):
        maps = self._maps(internals)
        refs = self._maps(self._reference(reference)) if self.shift is not None else [None] * len(maps)
        values = []
        for a, r in zip(maps, refs):
            c = centroid(a)                                                  # [B, K, 2]
            goal = (centroid(r.detach()) + self.shift.to(c.device)) if r is not None \
                else self.target.to(c.device).expand_as(c)
            values.append((c - goal).abs().mean(dim=2))
        return self.combine(values, maps)


class ResizeLoss(InternalLoss):
    """Scale the token's area by ``factor`` relative to the reference (``'original'`` by default), or reach an
    absolute ``target`` size (fraction of the image).

    Against a reference the loss is the L1 between the token's soft shape and the reference's soft shape scaled by
    √factor about its centroid (``scaled_shape``), plus ``size_weight`` × the L1 of the soft size against
    factor × the reference's. The shape target says *where* the added area goes: around the object, and nowhere
    else. (A soft size alone can be raised by flattening the map's peak and lifting secondary bumps — the
    threshold's gradient sits on pixels at half the map's range wherever they are — which draws second copies of
    the object instead of a larger one.) With ``"auto"`` layers the layers are chosen on the reference's maps.
    ``size_weight`` alone (``shape_weight=0``) is the paper's size term."""

    def __init__(self, tokens, layers=None, *, factor=None, target=None, reference=ORIGINAL, shape_weight=1.0,
                 size_weight=1.0, label=""):
        if (factor is None) == (target is None):
            raise ValueError("give exactly one of factor or target")
        if factor is not None and not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        if shape_weight < 0 or size_weight < 0 or shape_weight + size_weight <= 0:
            raise ValueError(f"shape_weight and size_weight must be >= 0, not both 0; got {shape_weight}, "
                             f"{size_weight}")
        super().__init__(tokens, layers, reference if factor is not None else ABSOLUTE, label)
        self.factor, self.target = factor, target
        self.shape_weight, self.size_weight = float(shape_weight), float(size_weight)

    def __call__(self, internals, reference=None):
        maps = self._maps(internals)
        if self.factor is None:
            return self.combine([(size(a) - float(self.target)).abs() for a in maps], maps)
        refs = [r.detach() for r in self._maps(self._reference(reference))]
        values = []
        for a, r in zip(maps, refs):
            v = self.size_weight * (size(a) - size(r) * self.factor).abs()        # [B, K]
            if self.shape_weight:
                v = v + self.shape_weight * (shape(a) - scaled_shape(r, self.factor)).abs().mean(dim=(1, 2))
            values.append(v)
        return self.combine(values, maps, choose_on=refs)


class KeepShapeLoss(InternalLoss):
    """Keep the token's shape (soft-thresholded map) as in the reference. L1, mean over pixels. With ``"auto"``
    layers the layers are chosen on the reference's maps (where the object is tracked there)."""

    def __init__(self, tokens, layers=None, *, reference=ORIGINAL, label=""):
        if reference == ABSOLUTE:
            raise ValueError("keeping a shape needs a reference: 'original' or a latent")
        super().__init__(tokens, layers, reference, label)

    def __call__(self, internals, reference=None):
        maps = self._maps(internals)
        refs = [r.detach() for r in self._maps(self._reference(reference))]
        return self.combine([(shape(a) - shape(r)).abs().mean(dim=(1, 2)) for a, r in zip(maps, refs)], maps,
                            choose_on=refs)


class AppearanceLoss(InternalLoss):
    """Keep (``reference='original'``) or take (a reference latent) the token's appearance: L1 between Ψ averaged
    under the token's mask here and in the reference. ``reference_tokens``: the token positions in the reference's
    own prompt (default: the same positions; with a different number of tokens the reference's appearance is
    their mean).

    Against the unguided run (keep) each layer and token is compared with the same layer and token there. From a
    reference latent (transfer) the reference is another image: its appearance is read under *its own* object
    mask — with ``"auto"`` layers, from the layers where the reference's map of ``reference_tokens`` is most
    compact (``compact_layers`` on the reference's maps), pooled over those layers and tokens into one vector per
    image — and every layer and token of the edited object is compared with that vector. (Comparing layer by
    layer there would read the reference under a map that need not sit on its object, e.g. a colour word whose
    colour the reference does not have, and pull the object towards the background's appearance.)"""

    needs_features = True

    def __init__(self, tokens, layers=None, *, reference=ORIGINAL, reference_tokens=None, mask_threshold=0.5,
                 core=0.0, label=""):
        if reference == ABSOLUTE:
            raise ValueError("an appearance edit needs a reference: 'original' or a latent")
        if not 0.0 <= mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in [0, 1), got {mask_threshold}")
        super().__init__(tokens, layers, reference, label)
        self.reference_tokens = list(reference_tokens) if reference_tokens else self.tokens
        if not 0.0 <= core <= 1.0:
            raise ValueError(f"core must be in [0, 1], got {core}")
        self.mask_threshold, self.core = float(mask_threshold), float(core)

    def _pooled_reference(self, refs: list, feats: torch.Tensor) -> torch.Tensor:
        """``[B, 1, C]``: the reference's appearance under its own mask, pooled over its chosen layers and tokens."""
        apps = torch.stack([appearance(r, feats, self.mask_threshold, self.core) for r in refs])  # [L, B, K, C]
        w = compact_layers(refs) if self.layers == AUTO else apps.new_ones(apps.shape[:3])
        w = w.unsqueeze(-1)
        return ((w * apps).sum(dim=(0, 2)) / w.sum(dim=(0, 2)).clamp_min(1.0)).unsqueeze(1)

    def __call__(self, internals, reference=None):
        ref = self._reference(reference)
        if internals.feats is None or ref.feats is None:
            raise ValueError("appearance needs the captured activations (feats)")
        maps = self._maps(internals)
        refs = [r.detach() for r in self._maps(ref, self.reference_tokens)]
        pooled = self._pooled_reference(refs, ref.feats.detach()) if isinstance(self.reference, torch.Tensor) \
            else None
        values = []
        for a, r in zip(maps, refs):
            app = appearance(a, internals.feats, self.mask_threshold, self.core)     # [B, K, C]
            app_ref = pooled if pooled is not None else \
                appearance(r, ref.feats.detach(), self.mask_threshold, self.core)
            if app_ref.shape[1] != app.shape[1]:
                app_ref = app_ref.mean(dim=1, keepdim=True)
            values.append((app - app_ref.detach()).abs().mean(dim=2))
        return self.combine(values, maps)


# ------------------------------------------------------------------------------------------ maps to pictures

def heat_map(internals: Internals, tokens: Sequence[int], layers=None,
             size_hw: Optional[tuple] = None) -> torch.Tensor:
    """``[B, H, W]`` in [0, 1]: the tokens' maps averaged over layers (for ``"auto"``: the most compact ones, as the
    losses use them) and tokens, min-max normalised, resized."""
    maps = internals.token_maps(tokens, None if layers in (None, AUTO) else layers)
    w = compact_layers(maps) if layers == AUTO else maps[0].new_ones(len(maps), *maps[0].shape[::3])  # [L, B, K]
    stacked = torch.stack([normalize(m) for m in maps])                      # [L, B, H, W, K]
    weights = w[:, :, None, None, :]
    heat = ((stacked * weights).sum(dim=(0, 4)) / weights.sum(dim=(0, 4)).clamp_min(1.0))
    if size_hw is not None and tuple(heat.shape[-2:]) != tuple(size_hw):
        heat = F.interpolate(heat[:, None], size=size_hw, mode="bilinear", align_corners=False)[:, 0]
    return normalize(heat[..., None])[..., 0]
