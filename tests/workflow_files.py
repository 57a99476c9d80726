"""The example workflows of workflows/ and the explicit file-name substitutions the tests make in them.

The workflows name real model files (``v1-5-pruned-emaonly.safetensors``) and ComfyUI's stock ``example.png``;
the test hosts have the tiny random checkpoint and a generated reference image instead. Only these file-name
inputs are substituted, and only when they hold the value the workflows ship with.
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
from PIL import Image

from conftest import CHECKPOINT, ROOT

WORKFLOW_DIR = os.path.join(ROOT, "example_workflows")  # readable names: ComfyUI's template browser lists them
WORKFLOWS = sorted(glob.glob(os.path.join(WORKFLOW_DIR, "*.json")))
BUILD_DIR = os.path.join(ROOT, "workflows")  # build.py, inputs.py and the shipped input images (inputs/)
TINY_MODELS_ROOT = os.path.join(ROOT, "out", "test-models")  # conftest's cache: checkpoints/<CHECKPOINT>
REFERENCE = "ug_ref.png"

# (node type, input) → (values in the shipped workflows, value on the test host). Guidance-network files are not
# substituted: the standard file names are valid choices whether or not the file is present yet.
FILE_SUBSTITUTIONS = {
    ("CheckpointLoaderSimple", "ckpt_name"): (("v1-5-pruned-emaonly.safetensors",), CHECKPOINT),
    ("LoadImage", "image"): (("example.png", "segmentation_map.png", "face_reference.png", "style.png"),
                             REFERENCE),
    # Flux workflows: the tiny Flux files of test_model_families (a CLIP-L file stands in for T5 in validation)
    ("UNETLoader", "unet_name"): (("flux1-dev.safetensors",), "ug-tiny-flux-dev-v1.safetensors"),
    ("DualCLIPLoader", "clip_name1"): (("clip_l.safetensors",), "ug-tiny-clip-l-v1.safetensors"),
    ("DualCLIPLoader", "clip_name2"): (("t5xxl_fp16.safetensors",), "ug-tiny-clip-l-v1.safetensors"),
    ("VAELoader", "vae_name"): (("ae.safetensors",), "ug-tiny-ae16-v1.safetensors"),
}


def path(key: str) -> str:
    """The example workflow that workflows/build.py wrote for ``key`` (its short name, e.g. ``image.json``)."""
    for p in WORKFLOWS:
        if load(p).get("extra", {}).get("ug_workflow", {}).get("file") == key:
            return p
    raise FileNotFoundError(f"no example workflow for {key!r} in {WORKFLOW_DIR}")


def key_of(p: str) -> str:
    """The short name of an example workflow file (``image.json``)."""
    return load(p)["extra"]["ug_workflow"]["file"]


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_reference(folder: str, size: int = 32) -> str:
    """Left half white, right half black; alpha 0 on the top half (free area after InvertMask)."""
    ref = np.zeros((size, size, 4), np.uint8)
    ref[:, : size // 2, :3] = 255
    ref[:, :, 3] = 255
    ref[: size // 2, :, 3] = 0
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, REFERENCE)
    Image.fromarray(ref, "RGBA").save(path)
    return path


def substitute_files_api(prompt: dict) -> dict:
    """Swap the model/image file names of an API-format prompt for the test host's (in place)."""
    for entry in prompt.values():
        for (node_type, name), (shipped, test_value) in FILE_SUBSTITUTIONS.items():
            if entry["class_type"] == node_type and name in entry["inputs"]:
                assert entry["inputs"][name] in shipped, (node_type, name, entry["inputs"][name])
                entry["inputs"][name] = test_value
    return prompt


def file_changes_ui(workflow: dict) -> dict:
    """``{node id: {input: value}}`` for ``headless.ui_build.set_widgets``: the same substitutions, UI format."""
    changes = {}
    for node in workflow["nodes"]:
        for (node_type, name), (_, test_value) in FILE_SUBSTITUTIONS.items():
            if node["type"] == node_type:
                changes.setdefault(node["id"], {})[name] = test_value
    return changes


def set_args(workflow: dict) -> list[str]:
    """The runner's ``--set`` options for the same substitutions."""
    return [f"--set={nid}.{name}={value}" for nid, values in file_changes_ui(workflow).items()
            for name, value in values.items()]
