"""Guidance-loss nodes: each adds one term to an incoming UG_GUIDANCE and returns a new one."""
from __future__ import annotations

from ..guidance import Guidance, GuidanceTerm, ImageLoss
from ..guidance.preprocess import to_bchw
from .errors import GuidanceInputError
from .validation import CheckedNode

CATEGORY = "sampling/universal guidance/losses"


NEGATIVE_WEIGHT = (" A negative weight pushes away from the target (e.g. away from a text or a reference); such a "
                   "loss has no floor, so keep it small or use the sampler's 'normalized' mode. 0 = off.")


def term_inputs(default_weight: float, weight_tooltip: str) -> dict:
    """Inputs every guidance-loss node has: the chain input, the weight and the step window."""
    return {
        "weight": ("FLOAT", {"default": default_weight, "min": -1.0e6, "max": 1.0e6, "step": 0.01,
                             "tooltip": weight_tooltip + NEGATIVE_WEIGHT}),
        "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "This term guides from this fraction of the run's steps on."}),
        "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "This term stops guiding at this fraction of the run's steps "
                                             "(1 = to the end)."}),
    }


CHAIN_INPUT = {"guidance": ("UG_GUIDANCE", {"tooltip": "Optional guidance terms to add this one to (chain "
                                                       "several loss nodes into one sampler)."})}
AUGMENT_INPUT = {"augment": ("INT", {
    "default": 0, "min": 0, "max": 64,
    "tooltip": "Random augmentation (Shen et al. 2024): the decoded image is scored as this many randomly "
               "augmented copies (brightness, saturation, contrast; plus translation ≤1/8, resize 0.8–1.2× and a "
               "cutout for CLIP text and style), batched into one network call after one decode, loss averaged — "
               "steadier, less adversarial gradients. Costs the guidance network N×, not the decoder. 0 = off."})}


def add_term(node: str, guidance, name: str, loss, weight: float, start_percent: float,
             end_percent: float, augment: int = 0) -> tuple:
    """A new UG_GUIDANCE with the term appended; the incoming one is never changed."""
    base = guidance if isinstance(guidance, Guidance) else Guidance()
    try:
        term = GuidanceTerm(name, loss, weight, start_percent, end_percent, augment=augment,
                            seed=len(base.terms))
    except ValueError as e:
        raise GuidanceInputError(f"{node}: {e}") from None
    return (base.add(term),)


def window_problem(start_percent=None, end_percent=None):
    """The problem with a step window, or None (values not known at validation, e.g. linked, are not judged)."""
    if start_percent is None or end_percent is None or start_percent < end_percent:
        return None
    return (f"inputs 'start_percent' and 'end_percent': the window from {start_percent:g} to {end_percent:g} is "
            f"empty; start_percent must be smaller than end_percent (fractions of the run's steps: 0 = the first "
            f"step, 1 = the end)")


class LossNode(CheckedNode):
    """What every guidance-loss node shares: its output, function name, menu and the window check."""

    RETURN_TYPES = ("UG_GUIDANCE",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    @classmethod
    def problems(cls, values: dict) -> list:
        return [window_problem(values.get("start_percent"), values.get("end_percent"))]


class UniversalGuidanceImage(LossNode):
    NAME = "UG Image Guidance"
    DESCRIPTION = ("Pulls the decoded image towards a reference image (masked L2 or L1 in RGB) — the paper's "
                   "inpainting-style guidance. With a mask only the masked region is guided.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Reference image; resized (bilinear) to the generated size."}),
                "loss": (["l2", "l1"], {"default": "l2", "tooltip": "Per-pixel distance: l2 (squared) or l1, "
                                                                    "averaged over the guided pixels, RGB in [0,1]."}),
                **term_inputs(100.0, "How strongly the image is pulled towards the reference: this term's "
                                     "share of the sampler's strength. 100 is a good start (10–1000); raise it "
                                     "when the reference does not show, lower it when the image breaks up."),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Where to guide: 1 (white) = pull towards the reference, 0 = free. "
                                             "Resized to the generated size."}),
                **CHAIN_INPUT,
                **AUGMENT_INPUT,
            },
        }

    def build(self, image, loss, weight, start_percent, end_percent, mask=None, guidance=None, augment=0):
        node = self.NAME
        try:
            ref = to_bchw(image)
            m = None if mask is None else (mask.unsqueeze(0) if mask.dim() == 2 else mask).unsqueeze(1)
            term = ImageLoss(ref, m, loss)
        except ValueError as e:
            raise GuidanceInputError(f"{node}: input 'image'/'mask': {e}") from None
        return add_term(node, guidance, "image", term, weight, start_percent, end_percent, augment)
