"""Guided calls in a real ComfyUI: a TAESD guidance decoder loaded by the stock VAELoader, the CFG-branch option,
activation checkpointing (low_memory), and the bound on a guided update."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import prompts
import random_networks as rn
from conftest import CHECKPOINT

SIZE = 32


@pytest.fixture(scope="module")
def taesd(host):
    """Random full-size TAESD (and TAESD-XL) files in models/vae_approx, as the stock VAELoader wants them."""
    folder = host.model_dir("vae_approx")
    rn.write_taesd(folder, "taesd", seed=0)
    rn.write_taesd(folder, "taesdxl", seed=1)
    ref = np.zeros((SIZE, SIZE, 3), np.uint8)
    ref[:, : SIZE // 2] = 255
    Image.fromarray(ref).save(os.path.join(host.workdir, "input", "ug_half.png"))
    return folder


def graph(seed, knobs, guidance_vae=None, decode_with_taesd=True, cfg=2.0):
    p = prompts.ksampler_guided(CHECKPOINT, "ug_half.png", size=SIZE, steps=3, seed=seed, cfg=cfg,
                                knobs={**knobs}, save=False)
    p["12"] = {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}}
    if guidance_vae:
        p["5"]["inputs"]["guidance_vae"] = ["12", 0]
    p["6"]["inputs"]["vae"] = ["12", 0] if decode_with_taesd else ["1", 2]
    p["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"taesd_{seed}"}}
    return p


def image_of(host, result):
    info = result.outputs["7"]["images"][0]
    return np.asarray(Image.open(os.path.join(host.workdir, "output", info["filename"])).convert("RGB")) / 255.0


def run_ok(host, prompt):
    result = host.run(prompt)
    err = result.error()
    assert result.success, err and (err["exception_message"], err["traceback"][-3:]) or result.messages
    return result


def test_vae_loader_lists_the_tiny_taesd(host, taesd):
    import nodes
    assert {"taesd", "taesdxl"} <= set(nodes.VAELoader.vae_list())


def test_taesd_guidance_lowers_the_image_loss(host, taesd):
    """Guided through TAESD's decoder (backward guidance, where a cheap decoder saves the most): the image TAESD
    decodes from the output is nearer the reference."""
    ref = np.zeros((SIZE, SIZE, 3))
    ref[:, : SIZE // 2] = 1.0
    unguided = image_of(host, run_ok(host, graph(3, {"forward_strength": 0.0}, guidance_vae=True)))
    guided = image_of(host, run_ok(host, graph(3, {"forward_strength": 0.0, "backward_steps": 3,
                                                   "backward_lr": 0.5}, guidance_vae=True)))
    d_u, d_g = ((unguided - ref) ** 2).mean(), ((guided - ref) ** 2).mean()
    assert d_g < 0.9 * d_u, (d_g, d_u)


def test_unconnected_guidance_vae_equals_the_sampler_vae(host, taesd):
    """Not connecting guidance_vae decodes with the sampler's VAE: the same output latent, bit for bit, as
    connecting that same VAE."""
    knobs = {"forward_strength": 1.0}
    plain = graph(4, knobs, decode_with_taesd=False)
    same = graph(4, knobs, decode_with_taesd=False)
    same["5"]["inputs"]["guidance_vae"] = ["1", 2]
    a = image_of(host, run_ok(host, plain))
    b = image_of(host, run_ok(host, same))
    assert np.array_equal(a, b)


def test_guidance_vae_of_another_family_is_a_clear_error(host, taesd):
    p = graph(5, {"forward_strength": 1.0}, guidance_vae=True)
    p["12"]["inputs"]["vae_name"] = "taesdxl"
    result = host.run(p)
    assert not result.success
    msg = result.error()["exception_message"]
    assert "input 'guidance_vae'" in msg and "0.13025" in msg and "0.18215" in msg and "taesd" in msg, msg


# ------------------------------------------------------------------------------- in-process: branch, memory

@pytest.fixture(scope="module")
def sd(host):
    import nodes
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT)[:3]
        pos = nodes.CLIPTextEncode().encode(clip, "a cat")[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    return model, vae, pos, neg


def sample(host, sd, seed=0, steps=2, **knobs):
    """The KSampler node called as the executor calls it; returns (latent, forward calls of the UNet)."""
    import nodes
    model, vae, pos, neg = sd
    calls = []
    unet = model.model.diffusion_model
    handle = unet.register_forward_pre_hook(
        lambda m, args: calls.append((args[0].shape[0], torch.is_grad_enabled() and args[0].requires_grad)))
    img = torch.zeros(1, SIZE, SIZE, 3)
    img[:, :, : SIZE // 2] = 1.0
    try:
        with torch.inference_mode():
            guidance = host.node_types["UniversalGuidanceImage"]().build(img, "l2", 100.0, 0.0, 1.0)[0]
            latent = nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
            out = host.node_types["UniversalGuidanceKSampler"]().sample(
                model, pos, neg, latent, vae, guidance, seed, steps, 2.0, "normal", 1.0,
                **{**prompts.KNOBS, **knobs})
    finally:
        handle.remove()
    return out[0]["samples"], calls


def test_cond_branch_runs_the_backward_on_half_the_batch(host, sd):
    _, combined = sample(host, sd, forward_strength=1.0)
    assert combined == [(2, True), (2, True)]  # cond and uncond batched, both with autograd
    latent, cond = sample(host, sd, forward_strength=1.0, cfg_branch="cond")
    assert cond == [(1, True), (1, False), (1, True), (1, False)]  # the gradient's branch alone; the other no_grad
    assert torch.isfinite(latent).all()
    _, uncond = sample(host, sd, forward_strength=1.0, cfg_branch="uncond")
    assert sorted(uncond) == sorted(cond)
    plain, _ = sample(host, sd, forward_strength=0.0, cfg_branch="cond")
    ref, _ = sample(host, sd, forward_strength=0.0)
    assert torch.equal(plain, ref)  # unguided calls are untouched
    # same CFG prediction either way: with a tiny strength the outputs agree closely
    a, _ = sample(host, sd, forward_strength=1e-6, strength_mode="normalized")
    b, _ = sample(host, sd, forward_strength=1e-6, strength_mode="normalized", cfg_branch="cond")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_low_memory_gives_the_same_result(host, sd):
    a, _ = sample(host, sd, seed=7, forward_strength=2.0, strength_mode="normalized")
    b, _ = sample(host, sd, seed=7, forward_strength=2.0, strength_mode="normalized", low_memory=True)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    unet = sd[0].model.diffusion_model
    assert not any("forward" in m.__dict__ for m in unet.modules())  # the wrappers are gone afterwards


def test_huge_strength_stays_finite_and_is_reported(host, sd, caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="universal_guidance"):
        latent, _ = sample(host, sd, seed=1, forward_strength=1.0e6)
    assert torch.isfinite(latent).all() and latent.abs().max() < 1e4
    assert any("capped at max_step" in r.getMessage() for r in caplog.records)
