"""Guided runs use the model's weights in place: no copy of the model.

The stock loaders create weights as inference tensors, which autograd may not save; the bridge gives the run a
normal, frozen tensor on the same storage instead of a copy (``autograd_weights.TrainableWeights``), and puts the
original tensor objects back after the run. Real executor, real loaders, tiny random models; the tiny SD1.5
checkpoint on every host, the tiny Flux model (tests/test_model_families.py) where the host has Flux.

Each run is checked three ways: the bytes of weight copies the bridge counted (its log line), the tensors it
actually put into the modules during the run (same storage as the originals, not inference tensors, frozen,
same dtype), and the cached model after the run (the same tensor objects, bit-identical, still inference
tensors). The output of a guided run with aliases is compared with the same run in copy mode (the bridge's
reference path): the guided update is the gradient of the image loss, so equal outputs mean equal gradients.
"""
from __future__ import annotations

import logging
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import prompts
from conftest import CHECKPOINT
from test_model_families import (FAMILIES, build_prompt, ensure_files, family_folders, host_label, node_output,
                                 output_file)
from test_precision import pack

SIZE = 32  # pixels; latent 4×4
REFERENCE = "ug_alias_ref.png"
WEIGHTS_LINE = re.compile(r"weights: (\d+) inference tensor\(s\) used in place \(([\d.]+) MiB, not copied\), "
                          r"(\d+) bytes of weight copies made")


@pytest.fixture(scope="module")
def reference(host):
    ref = np.zeros((SIZE, SIZE, 3), np.uint8)
    ref[:, : SIZE // 2] = 255
    Image.fromarray(ref, "RGB").save(os.path.join(host.workdir, "input", REFERENCE))
    return ref.astype(np.float64) / 255.0


@pytest.fixture
def swaps(monkeypatch):
    """(original, tensor put in its place) for every weight the bridge swapped, recorded after each refresh()."""
    weights = pack("autograd_weights").TrainableWeights
    refresh = weights.refresh
    seen = []

    def spy(self):
        n = refresh(self)
        seen.extend((t, store[name]) for store, name, t in self._swapped)
        return n

    monkeypatch.setattr(weights, "refresh", spy)
    yield seen
    seen.clear()


def weights_lines(caplog) -> list:
    return [m.groups() for r in caplog.records if r.name == "universal_guidance"
            for m in [WEIGHTS_LINE.search(r.getMessage())] if m]


def run(host, prompt, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="universal_guidance"):
        result = host.run(prompt)
    err = result.error()
    assert result.success, err and (err["exception_message"], err["traceback"][-4:]) or result.messages
    return result


def snapshot(*modules) -> dict:
    """Every parameter and buffer: the tensor object, a copy of its bits, whether it is an inference tensor."""
    state = {}
    with torch.inference_mode(False):
        for i, m in enumerate(modules):
            for name, t in list(m.named_parameters()) + list(m.named_buffers()):
                state[f"{i}.{name}"] = (t, t.detach().cpu().clone(), t.is_inference())
    return state


def assert_unchanged(before: dict, *modules):
    after = {}
    for i, m in enumerate(modules):
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            after[f"{i}.{name}"] = t
    assert after.keys() == before.keys()
    inference = 0
    for key, (obj, bits, was_inference) in before.items():
        t = after[key]
        assert t is obj, f"{key}: not the tensor object the cached model had"
        assert t.is_inference() == was_inference, key
        with torch.inference_mode(False):
            assert torch.equal(t.detach().cpu(), bits), f"{key}: the cached model's weight changed"
        inference += was_inference
    assert inference > 0, "the loaders made no inference-tensor weights: this test would not test aliasing"


def assert_aliases(seen: list):
    assert seen, "the bridge swapped no weight: nothing was aliased"
    for orig, now in seen:
        assert now.untyped_storage().data_ptr() == orig.untyped_storage().data_ptr(), "a copy, not an alias"
        assert now.data_ptr() == orig.data_ptr() and now.stride() == orig.stride() and now.shape == orig.shape
        assert now.dtype == orig.dtype and now.device == orig.device
        assert not now.is_inference() and not now.requires_grad
        now._version  # a version counter: autograd can save it


def sd15_prompt(strength: float, max_step: float) -> dict:
    """Guided sampler and a SaveLatent; ``max_step`` (far above any update here) only makes the prompt new."""
    p = prompts.ksampler_guided(CHECKPOINT, REFERENCE, size=SIZE, steps=2, seed=3, save=False,
                                knobs={"forward_strength": strength, "max_step": max_step})
    p["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "alias"}}
    p["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "latents/alias"}}
    return p


def outputs(host, result):
    latent = load_file(output_file(host, result.outputs["8"]["latents"][0]))["latent_tensor"]
    image = np.asarray(Image.open(output_file(host, result.outputs["7"]["images"][0])).convert("RGB"))
    return latent, image.astype(np.float64) / 255.0


def test_sd15_guided_run_copies_no_weights(host, reference, swaps, caplog, monkeypatch):
    weights = pack("autograd_weights").TrainableWeights
    # The reference: the same guided run with copies (what the bridge did before it aliased weights).
    monkeypatch.setattr(weights, "copy_weights", True)
    copied = run(host, sd15_prompt(2.0, 1.0e5), caplog)
    (n_alias, _, copy_bytes), = weights_lines(caplog)
    assert int(n_alias) == 0 and int(copy_bytes) > 1_000_000, "copy mode must count the model's bytes"
    loader = node_output(host, "1")
    unet, vae = loader[0][0].model.diffusion_model, loader[2][0].first_stage_model
    before = snapshot(unet, vae)
    swaps.clear()

    monkeypatch.setattr(weights, "copy_weights", False)
    aliased = run(host, sd15_prompt(2.0, 1.0e6), caplog)
    lines = weights_lines(caplog)
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    n_alias, mib, copy_bytes = lines[0]
    assert int(copy_bytes) == 0 and int(n_alias) > 0 and float(mib) > 1.0, lines
    assert not any("capped at max_step" in r.getMessage() for r in caplog.records)
    assert_aliases(swaps)
    swaps.clear()
    assert node_output(host, "1")[0][0].model.diffusion_model is unet  # the same cached model ran
    assert_unchanged(before, unet, vae)

    # Same gradients: the guided outputs of both paths agree (and differ from the unguided run's).
    unguided = run(host, sd15_prompt(0.0, 1.0e6), caplog)
    (latent_c, image_c), (latent_a, image_a) = outputs(host, copied), outputs(host, aliased)
    latent_0, image_0 = outputs(host, unguided)
    torch.testing.assert_close(latent_a, latent_c, rtol=1e-5, atol=1e-5 * float(latent_c.abs().max()))
    assert float((latent_a - latent_0).abs().max()) > 100 * 1e-5 * float(latent_c.abs().max())
    d = lambda a: float(((a - reference) ** 2).mean())  # noqa: E731
    assert d(image_a) < 0.9 * d(image_0), (d(image_a), d(image_0))


@pytest.fixture
def saved_copies(monkeypatch):
    """(bytes copied, bytes of gradient-path activations saved) of each denoiser call on models whose blocks add a
    residual in place (``autograd_weights._InplaceTargets``), recorded when the call's guard closes."""
    targets = pack("autograd_weights")._InplaceTargets
    close = targets.close
    seen = []

    def spy(self):
        if self.grad_path_bytes:
            seen.append((self.copied_bytes, self.grad_path_bytes))
        return close(self)

    monkeypatch.setattr(targets, "close", spy)
    return seen


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_family_guided_run_copies_no_weights(host, reference, swaps, saved_copies, caplog, family):
    import comfy.supported_models

    fam = FAMILIES[family]
    missing = [name for name in fam.requires if not hasattr(comfy.supported_models, name)]
    if missing:
        pytest.skip(f"{family}: {host_label(host)} has no {missing[0]} support (comfy.supported_models."
                    f"{missing[0]}); this test runs on ComfyUI v0.3.64 (COMFYUI_PATH=…)")
    names = ensure_files(fam)
    with family_folders(host, fam):
        p = build_prompt(fam, names)
        for node in ("9", "18", "19"):  # the stock sampler and the latents: not needed here
            p.pop(node)
        p["11"]["inputs"]["image"] = REFERENCE
        for node in ("7", "17"):
            p[node]["inputs"]["filename_prefix"] = "alias_" + p[node]["inputs"]["filename_prefix"]
        result = run(host, p, caplog)
        lines = weights_lines(caplog)
        assert len(lines) == 2, [r.getMessage() for r in caplog.records]  # strength 0 and the guided run
        for n_alias, mib, copy_bytes in lines:
            assert int(copy_bytes) == 0 and int(n_alias) > 0 and float(mib) > 1.0, lines
        assert_aliases(swaps)
        model = node_output(host, "1")[0][0].model.diffusion_model
        # After the run the cached model holds its own (inference) tensors again, not the aliases.
        swapped_in = {id(now) for _, now in swaps}
        assert sum(t.is_inference() for t in model.parameters()) > 0
        assert not any(id(t) in swapped_in for t in model.parameters())
        images = {k: np.asarray(Image.open(output_file(host, result.outputs[n]["images"][0])).convert("RGB"))
                  .astype(np.float64) / 255.0 for k, n in (("unguided", "7"), ("guided", "17"))}
        d = {k: float(((v - reference) ** 2).mean()) for k, v in images.items()}
        assert d["guided"] < 0.9 * d["unguided"], d
        if family == "flux":
            # Flux's blocks add residuals in place: only the tensors saved from those blocks' inputs are copied
            # (before, every activation on the gradient path was), and the run's gradient is still right (an
            # in-place change to a kept tensor would have been an error when backward unpacked it).
            assert saved_copies, "no guided denoiser call went through the in-place guard"
            copied, on_path = map(sum, zip(*saved_copies))
            assert 0 < copied < 0.25 * on_path, (copied, on_path)
            # the same guided result as copying every saved activation (the bridge's earlier path)
            p.pop("5"), p.pop("6"), p.pop("7")
            p["8"]["inputs"]["max_step"] = 1.0e6  # far above any update here; makes the prompt new
            p["17"]["inputs"]["filename_prefix"] = "alias_copy_all"
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(pack("autograd_weights"), "_host_has_inplace_residual", lambda: True)
                copy_all = run(host, p, caplog)
            image = np.asarray(Image.open(output_file(host, copy_all.outputs["17"]["images"][0])).convert("RGB"))
            np.testing.assert_allclose(image.astype(np.float64) / 255.0, images["guided"], atol=1.5 / 255)
        else:
            assert not saved_copies
        del model
        swaps.clear()
