"""Style guidance (Bansal et al. 2023): pull the CLIP image embedding of the decoded image towards that of a style
image, ``loss = −cos(E_img(x), E_img(style))`` (the paper uses CLIP RN50 and a weight of 100 on this term — here
the loss is unscaled and the ×100 belongs in the term's weight).

Optionally a Gram-matrix (Gatys-style) loss on intermediate CLIP visual features, collected with forward hooks:
ResNet stages (``layer1``…``layer4`` of open_clip's ModifiedResNet: feature maps ``[B,C,H,W]``) or ViT blocks
(``transformer.resblocks.i``: tokens, class token dropped). Per layer ``G = F·Fᵀ / positions`` and the loss is the
relative error ``‖G − G_style‖² / ‖G_style‖²`` (scale-free, so layers weigh alike), averaged over layers.

``loss = embed_weight · (−cos) + gram_weight · gram``. The style embedding and Gram targets are computed once, in
the constructor.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .clip import ClipImageEncoder, EncoderLoss, _as_bchw


def default_gram_layers(model: torch.nn.Module) -> list:
    """Hooked layers (names inside ``model.visual``) used for the Gram loss when none are given."""
    visual = model.visual
    if all(hasattr(visual, f"layer{i}") for i in range(1, 5)):
        return ["layer1", "layer2", "layer3", "layer4"]
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is not None and len(blocks):
        n = len(blocks)
        idx = sorted({max(0, min(n - 1, round(n * f) - 1)) for f in (0.25, 0.5, 0.75)})
        return [f"transformer.resblocks.{i}" for i in idx]
    raise ValueError(f"cannot choose Gram layers for {type(visual).__name__}; pass gram_layers=[...]")


class StyleLoss(EncoderLoss):
    """Style guidance loss; see the module doc. ``model``: an open_clip model (``guidance.clip.load_clip``).
    ``style_image``: ``[B,3,H,W]`` or ``[3,H,W]`` in [0, 1] (several images: embeddings and Grams averaged).
    ``gram_layers``: names of modules inside ``model.visual`` (default ``default_gram_layers``). Cutout options
    as ``guidance.clip.ClipImageEncoder`` (the style targets always use the whole style image)."""

    spatial = False  # a style is not tied to positions: every augmentation applies

    @property
    def floor(self) -> float:
        return -self.embed_weight  # −cos ≥ −1; the Gram term is ≥ 0

    def __init__(self, model: torch.nn.Module, style_image: torch.Tensor, *, embed_weight: float = 1.0,
                 gram_weight: float = 0.0, gram_layers: Optional[Sequence[str]] = None, cutouts: int = 0,
                 cutout_min_fraction: float = 0.5, seed: int = 0, resize_mode: str = "shortest"):
        style_image = _as_bchw(style_image, "style image")
        if embed_weight < 0 or gram_weight < 0 or embed_weight + gram_weight == 0:
            raise ValueError(f"embed_weight and gram_weight must be >= 0 and not both 0, "
                             f"got {embed_weight} and {gram_weight}")
        self.encoder = ClipImageEncoder(model, cutouts=cutouts, cutout_min_fraction=cutout_min_fraction, seed=seed,
                                        resize_mode=resize_mode)
        self.embed_weight = float(embed_weight)
        self.gram_weight = float(gram_weight)
        self.gram_layers = list(gram_layers) if gram_layers is not None else (
            default_gram_layers(model) if gram_weight > 0 else [])
        self._modules = []
        for name in self.gram_layers:
            try:
                self._modules.append(model.visual.get_submodule(name))
            except AttributeError:
                raise ValueError(f"no layer {name!r} in the CLIP visual tower") from None
        self._class_token = hasattr(model.visual, "class_embedding")
        self._batch_first = bool(getattr(getattr(model.visual, "transformer", None), "batch_first", True))
        with torch.inference_mode(False), torch.no_grad():
            views = self.encoder.whole_view(style_image.detach().float().to(self.encoder.device)
                                            .to(self.encoder.dtype))
            emb, grams = self._forward(views)
            emb = torch.nn.functional.normalize(emb.float().mean(dim=0, keepdim=True), dim=-1)
            self.style_embedding = emb.clone()  # [1, D]
            self.style_grams = [g.float().mean(dim=0, keepdim=True).clone() for g in grams]  # [1, C, C] each

    def prepare(self, device, dtype: Optional[torch.dtype] = None) -> "StyleLoss":
        self.encoder.prepare(device, dtype)
        self.style_embedding = self.style_embedding.to(device)
        self.style_grams = [g.to(device) for g in self.style_grams]
        return self

    def _gram(self, feat: torch.Tensor) -> torch.Tensor:
        if isinstance(feat, (tuple, list)):
            feat = feat[0]
        if feat.dim() == 4:  # [B, C, H, W]
            f = feat.flatten(2).float()
        elif feat.dim() == 3:  # tokens
            if not self._batch_first:
                feat = feat.transpose(0, 1)
            if self._class_token and feat.shape[1] > 1:
                feat = feat[:, 1:]
            f = feat.float().transpose(1, 2)  # [B, C, N]
        else:
            raise ValueError(f"cannot build a Gram matrix from a feature of shape {tuple(feat.shape)}")
        return f @ f.transpose(1, 2) / f.shape[-1]

    def _forward(self, views: torch.Tensor):
        """Normalized embeddings ``[N,D]`` and Gram matrices (one ``[N,C,C]`` per hooked layer) of ``views``."""
        captured = [None] * len(self._modules)

        def hook(i):
            def fn(_module, _inp, out):
                captured[i] = out
            return fn

        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(self._modules)]
        try:
            emb = self.encoder.embed_views(views)
        finally:
            for h in handles:
                h.remove()
        for name, c in zip(self.gram_layers, captured):
            if c is None:
                raise RuntimeError(f"Gram layer {name!r} of the CLIP visual tower did not run in encode_image")
        return emb, [self._gram(c) for c in captured]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = _as_bchw(image, "the decoded image")
        if self.device != image.device:
            self.prepare(image.device)
        batch, n_views = image.shape[0], self.encoder.num_views
        emb, grams = self._forward(self.encoder.views(image))
        loss = image.new_zeros(n_views * batch, dtype=torch.float32)
        if self.embed_weight:
            cos = (emb.float() * self.style_embedding.to(emb.device)).sum(dim=-1)
            loss = loss + self.embed_weight * (-cos)
        if self.gram_weight and grams:
            terms = []
            for g, ref in zip(grams, self.style_grams):
                ref = ref.to(g.device)
                terms.append((g - ref).pow(2).sum(dim=(1, 2)) / ref.pow(2).sum().clamp_min(1e-12))
            loss = loss + self.gram_weight * torch.stack(terms).mean(dim=0)
        return loss.view(n_views, batch).mean(dim=0).to(image.device)
