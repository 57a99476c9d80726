"""Self-guidance nodes (Epstein et al. 2023): edits read from the diffusion model's own cross-attention.

Each edit node adds an *internal* term to the incoming UG_GUIDANCE, so self-guidance chains with the image terms
(CLIP, segmentation, …) into one sampler. The term's weight is the paper's v: with the sampler in ``paper`` mode
the update is x̂0 ← x̂0 − v·σ²·∇ₓ g, the paper's ε̃ = ε + v·σ_t·∇_{z_t} g. The default weights are the values a
public SDXL reimplementation lists as the paper's (centroid 4, size 0.7, shape 6–15, appearance 12); they are
starting points, not tuned here. Raw attention gradients are small: ``normalized`` mode with
forward_strength 0.1–0.3 behaves the same whatever the weights' scale.

``UG Attention Map`` shows where words attend, as a heat map, to pick words, layers and targets.
"""
from __future__ import annotations

import re

import torch

from ..guidance import selfguidance as sg
from . import attention_capture as ac
from . import joint_capture
from .errors import GuidanceInputError
from .guidance_nodes import CHAIN_INPUT, LossNode, add_term, term_inputs
from .validation import CheckedNode
from .tokens import PromptCheck, encode_text, prompt_of_conditioning, split_words, token_positions

CATEGORY = "sampling/universal guidance/self-guidance"


def _window(default_end: float = 0.6) -> dict:
    inputs = term_inputs(1.0, "")
    inputs["end_percent"][1]["default"] = default_end
    return {k: v for k, v in inputs.items() if k != "weight"}


CLIP_INPUT = {"clip": ("CLIP", {"tooltip": "The CLIP of the checkpoint: its tokenizer finds the words' token "
                                            "positions in the typed 'prompt'. Not needed when 'conditioning' is "
                                            "connected."})}
PROMPT_INPUTS = {
    **CLIP_INPUT,
    "conditioning": ("CONDITIONING", {
        "tooltip": "The positive conditioning from a UG Prompt node — the same output that goes into the sampler's "
                   "positive input: the words are found in the text the model is conditioned on, so the prompt is "
                   "typed once. When connected, 'clip' is not needed and 'prompt' may stay empty."}),
}


def sg_inputs(weight: float, weight_tip: str) -> dict:
    """prompt, words, layers, weight and the window (ending at 60 % of the steps by default: an object's layout is
    set early, and later steps refine it). The prompt's source (``PROMPT_INPUTS``: clip, conditioning) is
    optional."""
    return {
        "prompt": ("STRING", {"multiline": True, "default": "",
                              "tooltip": "The positive prompt, exactly as the sampler's positive conditioning "
                                         "encodes it (token positions are counted in it; a prompt that differs is "
                                         "an error when the sampler runs). Leave empty when 'conditioning' is "
                                         "connected to a UG Prompt."}),
        "words": ("STRING", {"default": "", "tooltip": "The word(s) naming the object, e.g. 'dog' or 'red ball'; "
                                                         "several objects separated by commas. Every sub-token of "
                                                         "every occurrence is used."}),
        "layers": (list(ac.LAYER_RULES), {
            "default": ac.LAYER_RULES[0],
            "tooltip": "Cross-attention layers read. 'auto' (default): every layer is captured and, per word, the "
                       "layers where its map is most compact count — the rule the shapes benchmark found to pick "
                       "the layers that track objects (which layer does depends on the word and the model). "
                       "'coarse decoder' = the decoder's lowest-resolution attention (SD1.5 output blocks 3-5, 16x16 "
                       "at 512²; SDXL output 0-2, 32x32 at 1024²); 'mid decoder' the next level; 'all decoder'; "
                       "'all' (every layer, equally). SD3 / Flux (joint attention; no decoder levels): 'auto' "
                       "(every block captured, the most compact maps count per word) or 'all'; name blocks in "
                       "'blocks'."}),
        "weight": ("FLOAT", {"default": weight, "min": -1.0e6, "max": 1.0e6, "step": 0.01,
                             "tooltip": weight_tip + " It is the paper's v, this term's share of the "
                                        "sampler's strength. Negative values push the other way; 0 = off."}),
        **_window(),
    }


BLOCKS_INPUT = {"blocks": ("STRING", {
    "default": "",
    "tooltip": "Optional: the attention blocks to read, overriding 'layers'. SD3 / Flux: block ranges, e.g. "
               "'double 15-18, single 0-3' (Flux: 19 double and 38 single blocks) or 'joint 10-14' (SD3). UNets: "
               "layer names such as 'output3.0, output4.0'. Empty: the 'layers' choice (on SD3 / Flux only 'auto' "
               "and 'all' apply)."})}


_BLOCK_NAME = re.compile(joint_capture._RANGE[:-1] + r"$|(input|middle|output)\d+\.\d+$")


def blocks_problems(values: dict) -> list:
    """Validation of the optional ``blocks`` text: each comma-separated part a block range or a UNet layer name
    (whether the model has them is checked when the sampler runs)."""
    text = values.get("blocks")
    if not isinstance(text, str) or not text.strip():
        return []
    bad = [p.strip() for p in re.split(r"[,;\n]", text) if p.strip() and not _BLOCK_NAME.match(p.strip().lower())]
    if bad:
        return [f"input 'blocks': {bad[0]!r} is neither a block range (e.g. 'double 15-18', 'single 0-3' on Flux, "
                f"'joint 10-14' on SD3) nor a UNet layer name (e.g. 'output3.0'); leave it empty to use 'layers'"]
    return []


def layer_rule(layers: str, blocks: str = "") -> str:
    """The layer choice a term carries: the named ``blocks`` when given, else the ``layers`` rule."""
    return (blocks or "").strip() or layers


REFERENCE_INPUT = {"reference": ("LATENT", {
    "tooltip": "Optional reference image as a latent. From UG Invert (a real image inverted with the sampler's "
               "schedule): the edit runs against that image's own trajectory, step by step, and the sampler starts "
               "from its inverted noise. Any other latent (e.g. VAE Encode of a photo): noised to each step's noise "
               "level with fixed noise, resized to the generated size. Unconnected: the unguided run from the same "
               "noise (one extra model pass per guided step)."})}


def _reference(reference):
    """The reference a term compares against: the unguided twin, an inversion trajectory, or a latent."""
    if reference is None:
        return sg.ORIGINAL
    from .inversion_nodes import trajectory_of
    trajectory = trajectory_of(reference)
    return trajectory if trajectory is not None else reference["samples"]


def prompt_tokens(node: str, clip, prompt: str, words: str, conditioning=None) -> tuple:
    """``(token positions, context length, PromptCheck)`` of ``words``: looked up in the text of a UG Prompt's
    ``conditioning`` when connected, else in the typed ``prompt`` with ``clip``'s tokenizer. The check lets the
    sampler refuse a term whose prompt is not the one its positive conditioning encodes."""
    prompt = prompt or ""
    if conditioning is not None:
        info, context = prompt_of_conditioning(conditioning, node)
        if prompt.strip() and prompt.strip() != info.text.strip():
            raise GuidanceInputError(
                f"{node}: input 'prompt' ({prompt!r}) differs from the text of the UG Prompt connected to "
                f"'conditioning' ({info.text!r}); leave 'prompt' empty (the words are looked up in the UG Prompt's "
                f"text) or disconnect 'conditioning'")
        tokens, length = token_positions(info.clip, info.text, words, node)
        return tokens, length, PromptCheck(info.text, context, "conditioning", node)
    if clip is None:
        raise GuidanceInputError(
            f"{node}: inputs 'clip' and 'conditioning' are both unconnected; connect the positive UG Prompt to "
            f"'conditioning' (recommended: the prompt is typed once), or connect the checkpoint's CLIP to 'clip' and "
            f"type the positive prompt in 'prompt'")
    tokens, length = token_positions(clip, prompt, words, node)
    context, _ = encode_text(clip, prompt)
    return tokens, length, PromptCheck(prompt, context, "prompt", node)


class SelfGuidanceNode(LossNode):
    CATEGORY = CATEGORY
    TERM = "self_guidance"

    @staticmethod
    def word_problems(values: dict) -> list:
        words = values.get("words")
        problems = []
        if isinstance(words, str) and not split_words(words):
            problems.append("input 'words': empty; name a word of the prompt, e.g. 'dog'")
        return problems + blocks_problems(values)

    @classmethod
    def problems(cls, values: dict) -> list:
        return super().problems(values) + cls.word_problems(values)

    def make_term(self, loss_cls, clip, prompt, words, layers, weight, start_percent, end_percent, guidance,
                  label, conditioning=None, **loss_kw):
        node = self.NAME
        tokens, length, check = prompt_tokens(node, clip, prompt, words, conditioning)
        try:
            loss = loss_cls(tokens, label=label, **loss_kw)
        except ValueError as e:
            raise GuidanceInputError(f"{node}: {e}") from None
        loss.layer_rule, loss.context_length, loss.prompt_check = layers, length, check
        return add_term(node, guidance, f"{self.TERM}:{label}", loss, weight, start_percent, end_percent)


class UniversalGuidanceSGMove(SelfGuidanceNode):
    NAME = "UG Move Object"
    TERM = "move"
    DESCRIPTION = ("Moves an object named by a word of the prompt: L1 between the centroid of the word's "
                   "cross-attention map and a target position (to x, y), or the unguided run's centroid shifted "
                   "by (dx, dy).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **sg_inputs(4.0, "Multiplies the loss |centroid − target| (mean over x, y; positions in [0, 1])."),
            "mode": (["to (x, y)", "by (dx, dy)"], {
                "default": "to (x, y)",
                "tooltip": "'to': move the centroid to (x, y); 'by': move it by (dx, dy) from where the reference "
                           "puts it — the unguided run from the same noise, or the photo inverted by UG Invert on "
                           "'reference' (costs one extra model pass per guided step)."}),
            "x": ("FLOAT", {"default": 0.25, "min": -1.0, "max": 1.0, "step": 0.01,
                            "tooltip": "Target x ('to': 0 = left edge, 1 = right edge) or dx ('by': fraction of "
                                       "the width, + = right)."}),
            "y": ("FLOAT", {"default": 0.5, "min": -1.0, "max": 1.0, "step": 0.01,
                            "tooltip": "Target y ('to': 0 = top, 1 = bottom) or dy ('by': fraction of the "
                                       "height, + = down)."})},
            "optional": {**PROMPT_INPUTS, **CHAIN_INPUT, **REFERENCE_INPUT, **BLOCKS_INPUT}}

    @classmethod
    def problems(cls, values: dict) -> list:
        problems = super().problems(values)
        mode, x, y = values.get("mode"), values.get("x"), values.get("y")
        if mode == "to (x, y)" and None not in (x, y) and not (0 <= x <= 1 and 0 <= y <= 1):
            problems.append(f"inputs 'x'/'y': a target position must lie in [0, 1] (got {x:g}, {y:g})")
        return problems

    def build(self, clip=None, prompt="", words="", layers="auto", weight=4.0, start_percent=0.0, end_percent=0.6,
              mode="to (x, y)", x=0.25, y=0.5, guidance=None, conditioning=None, reference=None, blocks=""):
        if mode.startswith("to"):
            if reference is not None:
                raise GuidanceInputError(f"{self.NAME}: input 'reference' is used by mode 'by (dx, dy)' only (a move "
                                         f"relative to where the reference puts the object); with 'to (x, y)' "
                                         f"disconnect it, or pick 'by (dx, dy)'. To move an object of a photo to "
                                         f"(x, y), keep 'to (x, y)' and chain a Keep Layout or Keep Appearance node "
                                         f"whose reference is UG Invert's output: the sampler then starts from the "
                                         f"inverted photo")
            kw = {"target": (x, y)}
        else:
            kw = {"shift": (x, y), "reference": _reference(reference)}
        return self.make_term(sg.MoveLoss, clip, prompt, words, layer_rule(layers, blocks), weight,
                              start_percent, end_percent, guidance, words, conditioning, **kw)


class UniversalGuidanceSGResize(SelfGuidanceNode):
    NAME = "Resize Object"
    TERM = "resize"
    DESCRIPTION = ("Resizes an object named by a word of the prompt: L1 between the word's thresholded attention "
                   "map and the reference's map (the unguided run from the same noise, or a photo inverted by UG "
                   "Invert) scaled by √factor about its centre, plus L1 between its size and factor × the "
                   "reference's size. The shape target says where the added area goes, so the object grows instead "
                   "of a second copy appearing. Resize needs a stronger step than Move: with strength_mode "
                   "'normalized', forward_strength about 1 (the shapes benchmark's ×2 row).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **sg_inputs(0.7, "Multiplies the loss mean|shape − scaled reference shape| + |size − factor·size_ref| "
                             "(size = fraction of the image)."),
            "factor": ("FLOAT", {"default": 1.5, "min": 0.05, "max": 20.0, "step": 0.05,
                                 "tooltip": "Target size (area) relative to the reference (the unguided run, or "
                                            "the photo inverted by UG Invert on 'reference'): 2 = twice the area, "
                                            "0.5 = half. Costs one extra model pass per guided step."})},
            "optional": {**PROMPT_INPUTS, **CHAIN_INPUT, **REFERENCE_INPUT, **BLOCKS_INPUT}}

    def build(self, clip=None, prompt="", words="", layers="auto", weight=0.7, start_percent=0.0, end_percent=0.6,
              factor=1.5, guidance=None, conditioning=None, reference=None, blocks=""):
        return self.make_term(sg.ResizeLoss, clip, prompt, words, layer_rule(layers, blocks), weight,
                              start_percent, end_percent, guidance, words, conditioning, factor=factor,
                              reference=_reference(reference))


class UniversalGuidanceSGKeepLayout(SelfGuidanceNode):
    NAME = "UG Self-Guidance Keep Layout"
    TERM = "keep_layout"
    DESCRIPTION = ("Keeps the shape and place of the named objects as in the unguided run from the same noise (or "
                   "in a reference latent): L1 between their thresholded attention maps.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": sg_inputs(10.0, "Multiplies the loss mean|shape − shape_reference| over pixels."),
                "optional": {**PROMPT_INPUTS, **REFERENCE_INPUT, **CHAIN_INPUT, **BLOCKS_INPUT}}

    def build(self, clip=None, prompt="", words="", layers="auto", weight=10.0, start_percent=0.0, end_percent=0.6,
              reference=None, guidance=None, conditioning=None, blocks=""):
        return self.make_term(sg.KeepShapeLoss, clip, prompt, words, layer_rule(layers, blocks), weight,
                              start_percent, end_percent, guidance, words, conditioning,
                              reference=_reference(reference))


class UniversalGuidanceSGKeepAppearance(SelfGuidanceNode):
    NAME = "UG Self-Guidance Keep Appearance"
    TERM = "keep_appearance"
    DESCRIPTION = ("Keeps how the named objects look as in the unguided run from the same noise (or in a "
                   "reference, e.g. a photo inverted by UG Invert): L1 between the UNet's decoder activations "
                   "averaged under each object's attention mask.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": sg_inputs(12.0, "Multiplies the loss mean|appearance − appearance_unguided| over "
                                            "feature channels."),
                "optional": {**PROMPT_INPUTS, **CHAIN_INPUT, **REFERENCE_INPUT, **BLOCKS_INPUT}}

    def build(self, clip=None, prompt="", words="", layers="auto", weight=12.0, start_percent=0.0, end_percent=0.6,
              guidance=None, conditioning=None, reference=None, blocks=""):
        return self.make_term(sg.AppearanceLoss, clip, prompt, words, layer_rule(layers, blocks), weight,
                              start_percent, end_percent, guidance, words, conditioning,
                              reference=_reference(reference))


class UniversalGuidanceSGAppearanceTransfer(SelfGuidanceNode):
    NAME = "UG Self-Guidance Appearance Transfer"
    TERM = "appearance_transfer"
    DESCRIPTION = ("Gives the named object the appearance it has in a reference latent (e.g. an encoded photo): "
                   "L1 between decoder activations averaged under the object's attention mask here and under the "
                   "reference object's own mask in the reference (noised to each step's noise level, or its "
                   "inversion from UG Invert). Name the object in the prompt without a colour or texture word "
                   "('a photo of a car', words 'car'): a colour word in the prompt pulls its own colour back at "
                   "every step. Chain a Keep Layout on the same words to hold the object's shape and place.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**sg_inputs(12.0, "Multiplies the loss mean|appearance − appearance_reference|."),
                             "reference": REFERENCE_INPUT["reference"]},
                "optional": {**PROMPT_INPUTS, **CHAIN_INPUT, **BLOCKS_INPUT}}

    def build(self, clip=None, prompt="", words="", layers="auto", weight=12.0, start_percent=0.0, end_percent=0.6,
              reference=None, guidance=None, conditioning=None, blocks=""):
        if reference is None:
            raise GuidanceInputError(f"{self.NAME}: input 'reference' is missing; connect the LATENT of the image "
                                     f"whose appearance to take (e.g. VAE Encode of a photo)")
        return self.make_term(sg.AppearanceLoss, clip, prompt, words, layer_rule(layers, blocks), weight,
                              start_percent, end_percent, guidance, words, conditioning,
                              reference=_reference(reference))


# --------------------------------------------------------------------------------------------- attention map

_HEAT = torch.tensor([[0.0, 0.0, 0.05], [0.35, 0.05, 0.5], [0.85, 0.25, 0.3], [1.0, 0.65, 0.1], [1.0, 1.0, 0.75]])


def colorize(heat: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` in [0, 1] → ``[B, H, W, 3]`` RGB (dark → purple → orange → light yellow)."""
    x = heat.clamp(0, 1) * (len(_HEAT) - 1)
    lo = x.floor().long().clamp(max=len(_HEAT) - 2)
    t = (x - lo.float()).unsqueeze(-1)
    return _HEAT[lo] * (1 - t) + _HEAT[lo + 1] * t


class UniversalGuidanceAttentionMap(CheckedNode):
    NAME = "UG Attention Map"
    DESCRIPTION = ("Shows where words of the prompt attend in the model's cross-attention, as a heat map over the "
                   "image: one model pass on the latent noised to the chosen noise level. Use it to check what a "
                   "word covers before moving or resizing it, and to pick layers.")
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("heat_map", "mask")
    FUNCTION = "render"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        base = sg_inputs(0.0, "")
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model (SD1.x, SD2.x, SDXL, SD3, Flux)."}),
                "clip": ("CLIP", {"tooltip": "The CLIP of the checkpoint: it encodes 'prompt' and finds the words' "
                                             "token positions in it."}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "The prompt to condition the pass on (the positive prompt of the "
                                                 "run you look at)."}), "words": base["words"], "layers": base["layers"],
                "latent": ("LATENT", {"tooltip": "The image to look at, as a latent (e.g. a sampler's output, or "
                                                 "VAE Encode of a photo); an empty latent shows the layout the "
                                                 "model starts from."}),
                "noise_level": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Where in the schedule to look: 0 = the first (noisiest) step, "
                                                     "1 = clean. Layout is decided early (0.2-0.6)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                                 "tooltip": "Seed of the noise added to the latent."}),
            },
            "optional": {"image": ("IMAGE", {"tooltip": "Optional picture to draw the heat map over (e.g. the "
                                                        "decoded latent); resized to the heat map."}),
                         **BLOCKS_INPUT},
        }

    @classmethod
    def problems(cls, values: dict) -> list:
        return SelfGuidanceNode.word_problems(values)

    def render(self, model, clip, prompt, words, layers, latent, noise_level, seed, image=None, blocks=""):
        from .self_guidance_map import attention_heat
        heat = attention_heat(self.NAME, model, clip, prompt, words, layer_rule(layers, blocks), latent,
                              noise_level, seed)
        picture = colorize(heat)
        if image is not None:
            under = image[..., :3].float()
            if under.shape[1:3] != picture.shape[1:3]:
                under = torch.nn.functional.interpolate(under.permute(0, 3, 1, 2), size=picture.shape[1:3],
                                                        mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
            if under.shape[0] != picture.shape[0]:
                under = under[:1].expand(picture.shape[0], -1, -1, -1)
            picture = 0.45 * under + 0.55 * picture
        return (picture.clamp(0, 1), heat)


class UniversalGuidancePrompt(CheckedNode):
    NAME = "UG Prompt"
    DESCRIPTION = ("CLIP Text Encode that also carries its text: connect its output to the sampler's positive input "
                   "and to the 'conditioning' input of the self-guidance nodes, which then find their words in the "
                   "text the model is conditioned on (the prompt is typed once). The conditioning is the same as "
                   "CLIP Text Encode's.")
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The CLIP of the checkpoint (as for CLIP Text Encode)."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                "tooltip": "The positive prompt. Prompt weights such as (dog:1.3) work as in CLIP "
                                           "Text Encode; self-guidance nodes look their words up in this text."})}}

    def encode(self, clip, text):
        from .tokens import PROMPT_KEY, PromptTokens
        if clip is None:
            raise GuidanceInputError(f"{self.NAME}: input 'clip' is missing; connect the CLIP of the checkpoint")
        _, conditioning = encode_text(clip, text)
        info = PromptTokens(text, clip)
        return ([[c, {**d, PROMPT_KEY: info}] for c, d in conditioning],)


SELF_GUIDANCE_NODES = (UniversalGuidancePrompt, UniversalGuidanceSGMove, UniversalGuidanceSGResize,
                       UniversalGuidanceSGKeepLayout, UniversalGuidanceSGKeepAppearance, UniversalGuidanceSGAppearanceTransfer,
                       UniversalGuidanceAttentionMap)
