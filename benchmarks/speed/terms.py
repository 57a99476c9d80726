"""The guidance terms a speed benchmark can time, by name (``--guidance image,segmentation``).

A builder gets the pack's ``guidance`` package (the copy ComfyUI loaded), the decoded image size in pixels, the
batch size and a CPU generator, and returns a loss ``f(image [B,3,H,W] in [0,1]) -> [B]``; ``register_term`` adds
one. The networks have random weights: they cost what trained ones cost."""
from __future__ import annotations

import importlib
from typing import Callable

import torch


TermBuilder = Callable[[object, int, int, torch.Generator], Callable]
TERMS: dict = {}


def register_term(name: str):
    def deco(builder: TermBuilder) -> TermBuilder:
        TERMS[name] = builder
        return builder
    return deco


@register_term("image")
def _image_term(g, size, batch, gen):
    """Masked-L2 image guidance (the pack's ImageLoss) towards a random reference image."""
    return g.ImageLoss(torch.rand(1, 3, size, size, generator=gen), None, "l2")


@register_term("segmentation")
def _segmentation_term(g, size, batch, gen):
    """The paper's segmentation network (LRASPP MobileNetV3, input 520 px), random weights: the real cost."""
    seg = importlib.import_module(g.__name__ + ".segmentation")
    model = seg.load_segmentation_model("lraspp_mobilenet_v3_large", None)
    target = torch.randint(0, 21, (1, size, size), generator=gen)
    return seg.SegmentationLoss(model, target, input_size=520)


@register_term("clip")
def _clip_term(g, size, batch, gen):
    """CLIP ViT-B/32 image-text guidance (open_clip), random weights: the real cost."""
    clip = importlib.import_module(g.__name__ + ".clip")
    return clip.CLIPTextLoss(clip.load_clip("ViT-B-32", None), "a photo of a cat")
