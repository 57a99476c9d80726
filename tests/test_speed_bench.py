"""The speed benchmark (benchmarks/speed.py) end to end on the session's ComfyUI host and the tiny checkpoint."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import CHECKPOINT

from benchmarks import speed


def test_speed_benchmark_writes_complete_json(host, tmp_path):
    config = speed.Config(latent=4, steps=2, repeats=1, warmup=1, part_repeats=1, threads=1)
    result = speed.benchmark(host, CHECKPOINT, config, str(tmp_path), log=lambda *_: None)
    path = tmp_path / "speed.json"
    assert result["output"] == str(path)
    data = json.loads(path.read_text())

    assert speed.problems(data) == {}
    for key in ("plain_step_s", "guided_iteration_s", "overhead_ratio", "backward_step_extra_s",
                "no_jacobian_iteration_s", "peak_rss_mb"):
        assert math.isfinite(data[key]) and data[key] > 0, (key, data[key])
    assert set(data["parts"]) == {"denoiser_fwd_bwd_s", "decoder_fwd_bwd_s", "guidance_fwd_bwd_s"}
    assert all(math.isfinite(v) and v > 0 for v in data["parts"].values()), data["parts"]
    assert (data["latent"], data["batch"], data["steps"], data["repeats"]) == (4, 1, 2, 1)
    assert data["cfg"] == config.cfg and data["checkpoint"] == CHECKPOINT
    assert data["machine"]["device"] and data["machine"]["torch"] and data["machine"]["cores"] >= 1
    assert os.path.isfile(os.path.join(data["comfyui"]["path"], "nodes.py"))
    # a guided iteration does a denoiser backward pass on top of a plain step's forward
    assert data["guided_iteration_s"] > data["plain_step_s"]
    # the denoiser's saved activations are counted (what the in-place guard copies on old hosts)
    assert data["extra"]["denoiser_saved_for_backward_mb"]["activations"] > 0
    assert "overhead ratio" in speed.table(data)


def test_guidance_terms_are_pluggable_by_name():
    assert "image" in speed.TERMS
    try:
        @speed.register_term("test-constant")
        def _constant(g, size, batch, gen):
            return lambda image: image.mean(dim=(1, 2, 3))

        assert speed.TERMS["test-constant"] is _constant
    finally:
        speed.TERMS.pop("test-constant", None)


@pytest.mark.parametrize("name", sorted(speed.TERMS))
def test_registered_guidance_terms_build_and_differentiate(host, name):
    """Every term the benchmark can plug in by name builds offline (random weights) and has an input gradient."""
    if name == "clip":
        pytest.importorskip("open_clip")
    g = speed.pack_module("guidance")
    loss_fn = speed.TERMS[name](g, 32, 1, torch.Generator().manual_seed(0))
    if callable(getattr(loss_fn, "prepare", None)):
        loss_fn.prepare(torch.device("cpu"), None)
    with torch.inference_mode(False), torch.enable_grad():
        image = torch.rand(1, 3, 32, 32, requires_grad=True)
        loss = loss_fn(image)
        (grad,) = torch.autograd.grad(loss.sum(), image)
    assert loss.shape == (1,) and torch.isfinite(loss).all()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
