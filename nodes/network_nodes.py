"""The five guidance-loss nodes of the paper: CLIP text, segmentation, face, object detection, style.

Each node loads its network through ``model_files`` (ComfyUI's ``folder_paths``; standard files download on first
use), builds one loss term with its reference embedding computed once, and appends it to the incoming
UG_GUIDANCE. The networks themselves live in ``guidance/``.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import torch

from .. import guidance as G
from ..guidance.download import WEIGHT_FILES
from ..guidance.preprocess import to_bchw
from . import model_files
from .errors import GuidanceInputError
from .guidance_nodes import AUGMENT_INPUT, CHAIN_INPUT, LossNode, add_term, term_inputs

AUTO = "auto (from file)"
_CACHE: "OrderedDict[tuple, torch.nn.Module]" = OrderedDict()
_CACHE_SIZE = 4


def cached_network(key: tuple, build):
    """Loaded networks shared between nodes and prompts (a CLIP used by a text and a style node loads once)."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    with torch.inference_mode(False):
        net = build()
    _CACHE[key] = net
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return net


def _fail(node: str, input_name: str, error: Exception):
    return GuidanceInputError(f"{node}: input '{input_name}': {error}")


def _file_arch(name: str, architecture: str, known: list, node: str, input_name: str = "architecture") -> str:
    """The architecture for a weight file: the widget's choice, the standard table's, or a prefix of the name."""
    if architecture != AUTO:
        return architecture
    if name in WEIGHT_FILES:
        return WEIGHT_FILES[name].arch
    stem = os.path.basename(name).lower()
    matches = [a for a in known if stem.startswith(a.lower())]
    if matches:
        return max(matches, key=len)
    raise GuidanceInputError(f"{node}: input '{input_name}': cannot tell the architecture of {name!r} from its "
                             f"name; choose it in '{input_name}'")


def _clip_archs() -> list:
    """The open_clip architectures offered: those built from the weight file alone (no Hugging Face tokenizer or
    text tower fetched while the model is built)."""
    from ..guidance.clip import local_clip_archs
    return local_clip_archs()


def _load_clip(node: str, clip_model: str, architecture: str):
    import open_clip

    from ..guidance.clip import clip_arch_problem
    path = model_files.resolve("ug_clip", clip_model, node, "clip_model")
    # Every open_clip name is matched against the file name, so a file of a refused architecture is named as such
    # (rather than matched to a shorter, wrong prefix such as ViT-B-16 for ViT-B-16-SigLIP-256...).
    arch = _file_arch(clip_model, architecture, list(open_clip.list_models()), node)
    problem = clip_arch_problem(arch)
    if problem:
        source = (f"'{AUTO}' took the architecture {arch!r} from the file name {clip_model!r}; "
                  if architecture == AUTO else "")
        raise GuidanceInputError(f"{node}: input 'architecture': {source}{problem}")
    try:
        return cached_network(("clip", path, arch), lambda: G.load_clip(arch, path))
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        raise _fail(node, "clip_model", e) from None


def _clip_inputs(default: str = "ViT-B-32.pt") -> dict:
    return {
        "clip_model": (model_files.choices("ug_clip"), {
            "default": default,
            "tooltip": "open_clip / OpenAI CLIP weights in models/universal_guidance/clip (standard files are "
                       "downloaded on first use)."}),
        "architecture": ([AUTO] + _clip_archs(), {
            "default": AUTO, "tooltip": "open_clip architecture of the file; 'auto' reads it from the standard "
                                        "table or from the start of the file name (e.g. ViT-B-32...)."}),
    }


class ClipNode(LossNode):
    """A loss node with a CLIP model and architecture (text and style)."""

    FILE_INPUTS = {"clip_model": "ug_clip"}

    @classmethod
    def list_problem(cls, name: str, value):
        if name == "architecture" and isinstance(value, str):
            from ..guidance.clip import clip_arch_problem
            return clip_arch_problem(value)
        return super().list_problem(name, value)


class UniversalGuidanceCLIPText(ClipNode):
    NAME = "UG CLIP Text Guidance"
    DESCRIPTION = "Pulls the image towards a text prompt: −cosine similarity of CLIP image and text embeddings."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text": ("STRING", {"multiline": True, "default": "",
                                    "tooltip": "What the image should show, as CLIP understands it."}),
                **_clip_inputs(),
                "cutouts": ("INT", {"default": 0, "min": 0, "max": 64,
                                    "tooltip": "Random crops scored and averaged (0 = the whole image only). More "
                                               "cutouts give steadier, less adversarial gradients at more cost."}),
                **term_inputs(100.0, "Multiplies the loss (−cosine similarity, in [−1, 1]); 100 = CLIP's logit "
                                     "scale, as the official code's −logits. The paper published no Stable "
                                     "Diffusion s0 for CLIP text (its CLIP scripts use RN50); start with the "
                                     "sampler's 'normalized' mode at 0.2."),
            },
            "optional": {**CHAIN_INPUT, **AUGMENT_INPUT},
        }

    @classmethod
    def problems(cls, values: dict) -> list:
        text = values.get("text")
        empty = isinstance(text, str) and not text.strip()
        return super().problems(values) + ["input 'text': empty; write what the image should show" if empty else None]

    def build(self, text, clip_model, architecture, cutouts, weight, start_percent, end_percent, guidance=None,
              augment=0):
        node = self.NAME
        model = _load_clip(node, clip_model, architecture)
        try:
            loss = G.CLIPTextLoss(model, text, cutouts=cutouts)
        except ValueError as e:
            raise _fail(node, "text", e) from None
        return add_term(node, guidance, "clip_text", loss, weight, start_percent, end_percent, augment)


class UniversalGuidanceStyle(ClipNode):
    NAME = "UG Style Guidance"
    DESCRIPTION = ("Pulls the image towards the style of a reference image: −cosine of CLIP image embeddings "
                   "(paper), optionally plus a Gram-matrix loss on CLIP features.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "style_image": ("IMAGE", {"tooltip": "The style reference."}),
                **_clip_inputs("RN50.pt"),
                "gram_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.01,
                                          "tooltip": "Weight of the Gram-matrix loss (relative error of feature "
                                                     "correlations) next to the embedding loss (weight 1)."}),
                **term_inputs(600.0, "Multiplies the loss (−cosine in [−1, 1], plus the Gram term). The "
                                     "official loss is −100·cosine with s0 = 6, which is weight 600 in this unit; "
                                     "tuned with CLIP RN50 (RN50.pt), recurrence k = 6, CFG 3."),
            },
            "optional": {**CHAIN_INPUT, **AUGMENT_INPUT},
        }

    def build(self, style_image, clip_model, architecture, gram_weight, weight, start_percent, end_percent,
              guidance=None, augment=0):
        node = self.NAME
        model = _load_clip(node, clip_model, architecture)
        try:
            loss = G.StyleLoss(model, to_bchw(style_image), gram_weight=gram_weight)
        except ValueError as e:
            raise _fail(node, "style_image", e) from None
        return add_term(node, guidance, "style", loss, weight, start_percent, end_percent, augment)


def _seg_archs() -> list:
    from ..guidance.segmentation import SEGMENTATION_ARCHS
    return list(SEGMENTATION_ARCHS)


class UniversalGuidanceSegmentation(LossNode):
    FILE_INPUTS = {"model": "ug_segmentation"}
    NAME = "UG Segmentation Guidance"
    DESCRIPTION = ("Makes the image match a segmentation map: per-pixel cross-entropy of a torchvision "
                   "segmentation network (21 VOC classes) on the decoded image.")

    @classmethod
    def INPUT_TYPES(cls):
        from ..guidance.segmentation import VOC_CLASSES
        return {
            "required": {
                "model": (model_files.choices("ug_segmentation"), {
                    "default": "lraspp_mobilenet_v3_large-d234d4ea.pth",
                    "tooltip": "torchvision segmentation weights (VOC labels) in "
                               "models/universal_guidance/segmentation."}),
                "architecture": ([AUTO] + _seg_archs(), {"default": AUTO,
                                                         "tooltip": "Network of the file; 'auto' reads it from "
                                                                    "the file name."}),
                "class_name": (list(VOC_CLASSES), {"default": "person",
                                                   "tooltip": "Only with a MASK target (ignored when "
                                                              "segmentation_map is connected): the class the "
                                                              "masked area should show."}),
                "outside_mask": (["background", "ignore"], {
                    "default": "background",
                    "tooltip": "Only with a MASK target (ignored when segmentation_map is connected): what "
                               "the area outside the mask should be — 'background', or 'ignore' (anything)."}),
                "input_size": ("INT", {"default": 520, "min": 64, "max": 2048, "step": 8,
                                       "tooltip": "The decoded image's shorter side is resized to this for the "
                                                  "network (the paper: 520)."}),
                **term_inputs(400.0, "Multiplies the loss (mean per-pixel cross-entropy). The paper's s0 = 400 "
                                     "was tuned with LRASPP-MobileNetV3 (lraspp_mobilenet_v3_large) and a fully "
                                     "labelled map, with recurrence k = 10 and CFG 1.5–2."),
            },
            "optional": {
                "segmentation_map": ("IMAGE", {"tooltip": "Target as an image in the VOC colour palette (black = "
                                                          "background, VOC's border colour or other colours = "
                                                          "don't care). Resized nearest-neighbour."}),
                "mask": ("MASK", {"tooltip": "Target as a mask: 1 = class_name, 0 = outside_mask."}),
                **CHAIN_INPUT,
                **AUGMENT_INPUT,
                "reduction": (["all pixels", "labelled pixels"], {
                    "default": "all pixels",
                    "tooltip": "The cross-entropy is summed over the labelled pixels and divided by the number of "
                               "all pixels (the official code; its maps are fully labelled) or of the labelled "
                               "ones only (1/f times stronger when a fraction f is labelled: use ≈400·f)."}),
            },
        }

    def build(self, model, architecture, class_name, outside_mask, input_size, weight, start_percent, end_percent,
              segmentation_map=None, mask=None, guidance=None, augment=0, reduction="all pixels"):
        node = self.NAME
        from ..guidance import segmentation as S
        if (segmentation_map is None) == (mask is None):
            raise GuidanceInputError(f"{node}: inputs 'segmentation_map' / 'mask': connect exactly one of them "
                                     f"as the target")
        try:
            if segmentation_map is not None:
                target = S.colors_to_class_map(segmentation_map)
            else:
                target = S.mask_to_class_map(mask, class_name, outside=outside_mask)
        except ValueError as e:
            raise _fail(node, "segmentation_map" if mask is None else "mask", e) from None
        path = model_files.resolve("ug_segmentation", model, node, "model")
        arch = _file_arch(model, architecture, _seg_archs(), node)
        try:
            net = cached_network(("seg", path, arch), lambda: S.load_segmentation_model(arch, path))
            loss = S.SegmentationLoss(net, target, input_size=input_size, reduction=reduction.split()[0])
        except (ValueError, RuntimeError) as e:
            raise _fail(node, "model", e) from None
        return add_term(node, guidance, "segmentation", loss, weight, start_percent, end_percent, augment)


class UniversalGuidanceFace(LossNode):
    FILE_INPUTS = {"model": "ug_face"}
    NAME = "UG Face Guidance"
    DESCRIPTION = ("Makes the generated face look like a reference face: MTCNN finds the face (no gradient), "
                   "InceptionResnetV1 (VGGFace2) embeds the crop, loss = L1 or 1−cosine between embeddings.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "reference": ("IMAGE", {"tooltip": "A photo with a clearly visible face."}),
                "model": (model_files.choices("ug_face"), {
                    "default": "20180402-114759-vggface2.pt",
                    "tooltip": "InceptionResnetV1 weights in models/universal_guidance/face."}),
                "loss": (["l1", "cosine"], {"default": "l1",
                    "tooltip": "l1: mean absolute difference of the 512-d embeddings "
                                                       "(paper); cosine: 1 − cosine similarity."}),
                "crop": (["detect", "full"], {"default": "detect",
                    "tooltip": "detect: MTCNN finds the face in every decoded image "
                                                         "(steps without a face are skipped and counted in the "
                                                         "log); full: use the whole image (close-up portraits)."}),
                **term_inputs(20000.0, "Multiplies the loss. The paper's s0 = 20000 with the l1 loss (mean over the "
                                       "512 dims, as here), InceptionResnetV1-VGGFace2, recurrence k = 2."),
            },
            "optional": {**CHAIN_INPUT, **AUGMENT_INPUT},
        }

    def build(self, reference, model, loss, crop, weight, start_percent, end_percent, guidance=None, augment=0):
        node = self.NAME
        from ..guidance import face as F
        path = model_files.resolve("ug_face", model, node, "model")
        try:
            net = cached_network(("face", path), lambda: F.load_face_model(path))
        except (ImportError, ValueError, RuntimeError) as e:
            raise _fail(node, "model", e) from None
        try:
            term = F.FaceLoss(net, to_bchw(reference), loss=loss, crop=crop)
        except (ImportError, ValueError) as e:
            raise _fail(node, "reference", e) from None
        return add_term(node, guidance, "face", term, weight, start_percent, end_percent, augment)


class UniversalGuidanceDetection(LossNode):
    FILE_INPUTS = {"model": "ug_detection"}
    NAME = "UG Object Detection Guidance"
    DESCRIPTION = ("Places objects in boxes: the training losses of torchvision Faster R-CNN ResNet50-FPN v2 "
                   "(COCO) against the target boxes, on the decoded image.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "boxes": ("STRING", {"multiline": True, "default": "64,96,320,448,person; 300,200,480,460,dog",
                                     "tooltip": "'x0,y0,x1,y1,label; …' — COCO category names (or ids 1–90). "
                                                "Pixels of a width×height image, or relative (0–1) when "
                                                "coordinates is 'relative'."}),
                "coordinates": (["pixels", "relative"], {"default": "pixels",
                    "tooltip": "How the box numbers are given."}),
                "width": ("INT", {"default": 512, "min": 8, "max": 16384, "step": 8,
                                  "tooltip": "Width of the image the pixel boxes refer to (the generated size); "
                                             "boxes are scaled if the output differs."}),
                "height": ("INT", {"default": 512, "min": 8, "max": 16384, "step": 8,
                                   "tooltip": "Height of the image the pixel boxes refer to."}),
                "model": (model_files.choices("ug_detection"), {
                    "default": "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth",
                    "tooltip": "Faster R-CNN ResNet50-FPN v2 (COCO) weights in "
                               "models/universal_guidance/detection."}),
                "box_regression": ("BOOLEAN", {"default": False,
                                               "tooltip": "Also use the box-regression loss of the detection "
                                                          "head (off in the paper)."}),
                "detector_size": ("INT", {"default": 800, "min": 64, "max": 2048, "step": 32,
                                          "tooltip": "The detector resizes the image's shorter side to this "
                                                     "(torchvision default 800; smaller is faster)."}),
                **term_inputs(100.0, "Multiplies the summed detector losses. The paper's s0 = 100 with Faster R-CNN "
                                     "ResNet50-FPN v2, recurrence k = 5, CFG 1.5 (the official code takes the "
                                     "gradient through the unconditional branch; here through the CFG "
                                     "prediction unless the sampler's cfg_branch says otherwise)."),
            },
            "optional": {**CHAIN_INPUT, **AUGMENT_INPUT},
        }

    @classmethod
    def problems(cls, values: dict) -> list:
        boxes, coordinates, width, height = (values.get(k) for k in ("boxes", "coordinates", "width", "height"))
        problem = None
        if isinstance(boxes, str) and None not in (coordinates, width, height):
            from ..guidance import detection as D
            try:
                D.parse_boxes(boxes, image_size=(height, width), relative=coordinates == "relative")
            except ValueError as e:
                problem = f"input 'boxes': {e}"
        return super().problems(values) + [problem]

    def build(self, boxes, coordinates, width, height, model, box_regression, detector_size, weight,
              start_percent, end_percent, guidance=None, augment=0):
        node = self.NAME
        from ..guidance import detection as D
        try:
            target = D.parse_boxes(boxes, image_size=(height, width), relative=coordinates == "relative")
        except ValueError as e:
            raise _fail(node, "boxes", e) from None
        path = model_files.resolve("ug_detection", model, node, "model")
        try:
            net = cached_network(("det", path, detector_size), lambda: D.load_detection_model(
                path, min_size=detector_size, max_size=max(1333, detector_size)))
            loss = D.DetectionLoss(net, target, box_regression=box_regression)
        except (ValueError, RuntimeError) as e:
            raise _fail(node, "model", e) from None
        return add_term(node, guidance, "detection", loss, weight, start_percent, end_percent, augment)


NETWORK_NODES = (UniversalGuidanceCLIPText, UniversalGuidanceSegmentation, UniversalGuidanceFace,
                 UniversalGuidanceDetection, UniversalGuidanceStyle)
