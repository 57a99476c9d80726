"""The pack inside a real ComfyUI: real executor, real loaders, a tiny random SD1.5-architecture checkpoint."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import prompts
from conftest import CHECKPOINT

SIZE = 32  # pixels; latent 4×4
STEPS = 3


@pytest.fixture(scope="module")
def reference(host):
    """Left half white, right half black: far from what the random model produces on its own."""
    ref = np.zeros((SIZE, SIZE, 4), np.uint8)
    ref[:, : SIZE // 2, :3] = 255
    ref[:, :, 3] = 255
    ref[: SIZE // 2, :, 3] = 0  # alpha 0 on the top half: LoadImage's MASK is 1 there
    Image.fromarray(ref, "RGBA").save(os.path.join(host.workdir, "input", "ug_ref.png"))
    return ref[..., :3].astype(np.float64) / 255.0


def saved_image(host, result, node="7"):
    info = result.outputs[node]["images"][0]
    path = os.path.join(host.workdir, "output", info.get("subfolder", ""), info["filename"])
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64) / 255.0


def run_ok(host, prompt):
    result = host.run(prompt)
    err = result.error()
    assert result.success, err and (err["exception_message"], err["traceback"][-3:]) or result.messages
    return result


def mse(a, b):
    return float(((a - b) ** 2).mean())


def test_ksampler_chain_runs_and_saves(host, reference):
    result = run_ok(host, prompts.ksampler_guided(CHECKPOINT, "ug_ref.png", size=SIZE, steps=STEPS, seed=1))
    image = saved_image(host, result)
    assert image.shape == (SIZE, SIZE, 3)
    assert np.isfinite(image).all()


BUILDERS = {"ksampler": prompts.ksampler_guided, "samplercustom": prompts.samplercustom_guided,
            "samplercustomadvanced": prompts.samplercustomadvanced_guided}


@pytest.mark.parametrize("builder", list(BUILDERS))
def test_guided_image_is_closer_to_reference(host, reference, builder):
    if builder == "samplercustomadvanced" and "SamplerCustomAdvanced" not in host.node_types:
        pytest.skip("this ComfyUI has no SamplerCustomAdvanced (added 2024-04); run with COMFYUI_PATH=<newer>")
    build = BUILDERS[builder]
    unguided = run_ok(host, build(CHECKPOINT, "ug_ref.png", size=SIZE, steps=STEPS, seed=5,
                                  knobs={"forward_strength": 0.0}))
    guided = run_ok(host, build(CHECKPOINT, "ug_ref.png", size=SIZE, steps=STEPS, seed=5,
                                knobs={"forward_strength": 2.0}))
    d_unguided = mse(saved_image(host, unguided), reference)
    d_guided = mse(saved_image(host, guided), reference)
    assert d_guided < 0.9 * d_unguided, (d_guided, d_unguided)


def test_backward_guidance_and_recurrence_run_in_comfyui(host, reference):
    base = run_ok(host, prompts.ksampler_guided(CHECKPOINT, "ug_ref.png", size=SIZE, steps=2, seed=9,
                                                knobs={"forward_strength": 0.0}))
    both = run_ok(host, prompts.ksampler_guided(
        CHECKPOINT, "ug_ref.png", size=SIZE, steps=2, seed=9,
        knobs={"forward_strength": 0.0, "backward_steps": 3, "backward_lr": 0.5, "recurrence": 2}))
    assert mse(saved_image(host, both), reference) < mse(saved_image(host, base), reference)


def test_missing_vae_is_a_validation_error_naming_node_and_input(host, reference):
    prompt = prompts.ksampler_guided(CHECKPOINT, "ug_ref.png", size=SIZE, steps=STEPS)
    del prompt["5"]["inputs"]["vae"]
    ok, error, _, node_errors = host.validate(prompt)
    assert not ok
    assert "5" in node_errors
    text = str(node_errors["5"])
    assert "vae" in text and "UniversalGuidanceKSampler" in str(node_errors["5"]["class_type"])


def test_all_zero_guidance_is_a_clear_error(host, reference):
    result = host.run(prompts.ksampler_guided(CHECKPOINT, "ug_ref.png", size=SIZE, steps=STEPS, weight=0.0))
    assert not result.success
    err = result.error()
    assert err["node_id"] == "5"
    assert "Universal KSampler" in err["exception_message"]
    assert "input 'guidance'" in err["exception_message"]


def test_bad_window_is_a_validation_error(host, reference):
    prompt = prompts.ksampler_guided(CHECKPOINT, "ug_ref.png", size=SIZE, steps=STEPS,
                                     knobs={"start_percent": 0.6, "end_percent": 0.4})
    ok, _, _, node_errors = host.validate(prompt)
    assert not ok and "5" in node_errors
    assert "start_percent" in str(node_errors["5"])


def test_interrupt_stops_cleanly_and_next_run_matches(host, reference):
    import comfy.utils
    import comfy.model_management as mm

    prompt = prompts.ksampler_guided(CHECKPOINT, "ug_ref.png", size=SIZE, steps=4, seed=21,
                                     knobs={"recurrence": 2})
    updates = []

    def hook(value, total, preview, *args, **kwargs):
        updates.append((value, total))
        if len(updates) == 2:
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        interrupted = host.run(prompt)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert not interrupted.success and interrupted.interrupted
    assert updates[:2] == [(1, 8), (2, 8)]  # progress counts steps × k
    first = run_ok(host, prompt)
    prompt2 = prompts.ksampler_guided(CHECKPOINT, "ug_ref.png", size=SIZE, steps=4, seed=21,
                                      knobs={"recurrence": 2}, extra={"backward_early_stop": 0.0})
    prompt2["7"]["inputs"]["filename_prefix"] = "again"
    second = run_ok(host, prompt2)
    np.testing.assert_array_equal(saved_image(host, first), saved_image(host, second))


def test_cached_model_is_left_as_it_was(host, reference):
    """The sampler swaps inference-tensor weights for trainable copies only while it runs."""
    import nodes
    from comfy import sd  # noqa: F401  (the real loader below)

    node_types = host.node_types
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT)[:3]
        pos = nodes.CLIPTextEncode().encode(clip, "a cat")[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
        img = torch.rand(1, SIZE, SIZE, 3)
        guidance = node_types["UniversalGuidanceImage"]().build(img, "l2", 100.0, 0.0, 1.0)[0]
        unet = model.model.diffusion_model
        before = {n: p for n, p in unet.named_parameters()}
        vae_before = {n: p for n, p in vae.first_stage_model.named_parameters()}
        assert all(p.is_inference() for p in before.values())
        node_types["UniversalGuidanceKSampler"]().sample(
            model, pos, neg, latent, vae, guidance, 0, 2, 2.0, "normal", 1.0, forward_strength=1.0,
            recurrence=1, backward_steps=1, backward_lr=0.1, start_percent=0.0, end_percent=1.0)
        after = {n: p for n, p in model.model.diffusion_model.named_parameters()}
        assert after.keys() == before.keys()
        assert all(after[n] is before[n] for n in before)
        assert all(p.is_inference() for p in after.values())
        assert all(p is vae_before[n] for n, p in vae.first_stage_model.named_parameters())


def test_previews_during_guided_sampling(host, reference):
    """Latent previews are produced from detached tensors while gradients are being taken."""
    import comfy.cli_args
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod

    previews = []
    old = comfy.cli_args.args.preview_method
    comfy.cli_args.args.preview_method = LatentPreviewMethod.Latent2RGB
    comfy.utils.set_progress_bar_global_hook(lambda v, t, p, *a, **k: previews.append(p))
    try:
        run_ok(host, prompts.ksampler_guided(CHECKPOINT, "ug_ref.png", size=SIZE, steps=2, seed=33))
    finally:
        comfy.cli_args.args.preview_method = old
        comfy.utils.set_progress_bar_global_hook(None)
    assert any(p is not None for p in previews)


def test_unsupported_model_type_is_refused(host):
    import comfy.model_sampling
    bridge = host_module(host, "nodes.comfy_bridge")

    class Other(torch.nn.Module):
        pass

    class Base:
        model_sampling = Other()

    with pytest.raises(host_module(host, "nodes.errors").GuidanceInputError, match="input 'model'.*not supported"):
        bridge.parameterization_of(Base(), "Universal KSampler")
    assert comfy.model_sampling.EPS is not None


def host_module(host, name):
    import sys
    for mod_name, mod in sys.modules.items():
        if mod_name.endswith("ComfyUI-UniversalGuidance." + name):
            return mod
    raise LookupError(name)
