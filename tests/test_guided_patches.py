"""Guided runs with what real workflows add to the model: the stock ControlNet nodes, a LoRA, another pack's
attention patch; and the CFG-branch option where ComfyUI leaves a branch out (cfg 1). Real executor, real loaders,
tiny random ControlNet and LoRA files written in their real formats."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

import prompts
from conftest import CHECKPOINT
from headless import random_models

SIZE = 32  # pixels; latent 4×4
CONTROLNET = "ug-tiny-controlnet.safetensors"
LORA = "ug-tiny-lora.safetensors"


@pytest.fixture(scope="module")
def files(host):
    """The reference image (left half white) in input/, a ControlNet and a LoRA for the tiny checkpoint."""
    ref = np.zeros((SIZE, SIZE, 3), np.uint8)
    ref[:, : SIZE // 2] = 255
    Image.fromarray(ref).save(os.path.join(host.workdir, "input", "ug_half.png"))
    for kind, name, write in (("controlnet", CONTROLNET, random_models.write_controlnet),
                              ("loras", LORA, random_models.write_lora)):
        os.makedirs(host.model_dir(kind), exist_ok=True)
        write(os.path.join(host.model_dir(kind), name))
    return ref.astype(np.float64) / 255.0


def graph(seed, strength, *, cfg=2.0, steps=2, extra=None, prefix="patches"):
    p = prompts.ksampler_guided(CHECKPOINT, "ug_half.png", size=SIZE, steps=steps, seed=seed, cfg=cfg,
                                knobs={"forward_strength": strength}, extra=extra, save=False)
    p["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}}
    return p


def with_controlnet(p, advanced=False):
    """The stock ControlNetLoader and ControlNetApply (or ControlNetApplyAdvanced) on the positive prompt, the
    reference image as the hint."""
    p["30"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
    if advanced:
        p["31"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["30", 0], "image": ["11", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        p["5"]["inputs"]["positive"], p["5"]["inputs"]["negative"] = ["31", 0], ["31", 1]
    else:
        p["31"] = {"class_type": "ControlNetApply", "inputs": {
            "conditioning": ["2", 0], "control_net": ["30", 0], "image": ["11", 0], "strength": 1.0}}
        p["5"]["inputs"]["positive"] = ["31", 0]
    return p


def with_lora(p):
    p["40"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": LORA,
                                                      "strength_model": 1.0, "strength_clip": 1.0}}
    p["2"]["inputs"]["clip"] = p["3"]["inputs"]["clip"] = ["40", 1]
    p["5"]["inputs"]["model"] = ["40", 0]
    return p


def image_of(host, result):
    info = result.outputs["7"]["images"][0]
    path = os.path.join(host.workdir, "output", info.get("subfolder", ""), info["filename"])
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64) / 255.0


def run_ok(host, prompt):
    result = host.run(prompt)
    err = result.error()
    assert result.success, err and (err["exception_message"], err["traceback"][-3:]) or result.messages
    return image_of(host, result)


def mse(a, b):
    return float(((a - b) ** 2).mean())


class Weights:
    """The parameters and buffers of the models ComfyUI holds loaded: the tensor objects and their values."""

    def __init__(self, host, kinds: tuple):
        self.entries = []
        for loaded in host.model_management.current_loaded_models:
            module = getattr(loaded.model, "model", None)
            if isinstance(module, torch.nn.Module) and type(module).__name__ in kinds:
                for name, t in list(module.named_parameters()) + list(module.named_buffers()):
                    self.entries.append((module, name, t, t.detach().clone(), t.is_inference()))
        self.kinds = {type(m).__name__ for m, *_ in self.entries}

    def assert_unchanged(self):
        for module, name, t, value, inference in self.entries:
            now = module.get_parameter(name) if name in dict(module.named_parameters()) \
                else module.get_buffer(name)
            assert now is t, f"{type(module).__name__}.{name} was replaced"
            assert now.is_inference() == inference, f"{type(module).__name__}.{name}: inference flag changed"
            assert torch.equal(now, value), f"{type(module).__name__}.{name} changed"


def check_guided_run(host, files, build, kinds, seed):
    """Unguided, then guided (forward guidance): the guided image differs and is nearer the reference; the loaded
    weights of ``kinds`` (the cached models) are the same tensors with the same values after the guided run."""
    unguided = run_ok(host, build(graph(seed, 0.0, prefix=f"u{seed}")))
    weights = Weights(host, kinds)
    assert weights.kinds == set(kinds), (weights.kinds, kinds)
    guided = run_ok(host, build(graph(seed, 2.0, prefix=f"g{seed}")))
    weights.assert_unchanged()
    assert not np.array_equal(guided, unguided)
    assert mse(guided, files) < 0.9 * mse(unguided, files), (mse(guided, files), mse(unguided, files))
    return unguided, guided


# ------------------------------------------------------------------------------------------------ ControlNet

def test_controlnet_apply_guided_run(host, files):
    """A ControlNet runs inside the denoiser call with autograd on: its weights, inference tensors from the stock
    loader, are made usable for the run and put back unchanged."""
    check_guided_run(host, files, with_controlnet, ("BaseModel", "ControlNet"), seed=11)


def test_controlnet_apply_advanced_guided_run(host, files):
    if "ControlNetApplyAdvanced" not in host.node_types:
        pytest.skip("this ComfyUI has no ControlNetApplyAdvanced")
    check_guided_run(host, files, lambda p: with_controlnet(p, advanced=True), ("BaseModel", "ControlNet"),
                     seed=12)


def test_controlnet_changes_the_output(host, files):
    """The hint matters (so the branch tests below see the control): with and without the ControlNet differ."""
    plain = run_ok(host, graph(13, 0.0, prefix="plain"))
    controlled = run_ok(host, with_controlnet(graph(13, 0.0, prefix="cn")))
    assert np.abs(plain - controlled).mean() > 0.01


def test_cfg_branch_with_controlnet(host, files):
    """cfg_branch cond / uncond with a ControlNet: the ControlNet's per-block control is split with the batch
    rows, so the branch is honoured (not replaced by 'combined': a different image) and the prediction is the
    same (at a vanishing strength the images agree with 'combined')."""
    def run(strength, which):
        extra = {"cfg_branch": which, "strength_mode": "normalized"}
        return run_ok(host, with_controlnet(graph(14, strength, steps=1, extra=extra, prefix=f"{which}{strength:g}")))

    combined, tiny_combined = run(2.0, "combined"), run(1e-6, "combined")
    for branch in ("cond", "uncond"):
        assert np.abs(combined - run(2.0, branch)).max() > 2 / 255, branch
        assert np.abs(tiny_combined - run(1e-6, branch)).max() <= 1 / 255, branch


# ------------------------------------------------------------------------------------------------ LoRA

def test_lora_guided_run(host, files):
    """LoraLoader on model and CLIP: the LoRA-patched weights (inference tensors) are used under autograd and left
    as ComfyUI patched them."""
    unguided, _ = check_guided_run(host, files, with_lora, ("BaseModel",), seed=21)
    assert np.abs(run_ok(host, graph(21, 0.0, prefix="nolora")) - unguided).mean() > 0.01  # the LoRA is in effect


# ------------------------------------------------------------------------------ another pack's attn2 patch

class Attn2Patch:
    """A cross-attention replacement as other packs install one (IPAdapter-style): it holds a small network loaded
    by its node, under the executor's inference mode, and adds its output to the attention."""

    def __init__(self, dim: int):
        self.proj = torch.nn.Linear(dim, dim)
        torch.nn.init.normal_(self.proj.weight, std=0.5 / dim ** 0.5)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention
        return optimized_attention(q, k, v, extra_options["n_heads"]) + self.proj(q)


class UGTestAttn2Patch:
    """A test node of "another pack": it patches every cross-attention block of the model (``attn2`` replace)."""

    made = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model):
        from comfy.ldm.modules.attention import SpatialTransformer
        torch.manual_seed(0)
        out = model.clone()
        unet = out.model.diffusion_model
        blocks = [("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks)]
        for name, seq in blocks:
            for i, block in enumerate(seq):
                for m in block.modules():
                    if isinstance(m, SpatialTransformer):
                        patch = Attn2Patch(m.transformer_blocks[0].attn2.to_q.out_features)
                        self.made.append(patch)
                        out.set_model_attn2_replace(patch, name, i)
                        break
        return (out,)


@pytest.fixture
def attn2_node(host):
    host.node_types["UGTestAttn2Patch"] = UGTestAttn2Patch
    yield UGTestAttn2Patch
    host.node_types.pop("UGTestAttn2Patch", None)


def test_other_packs_attn2_patch_guided_run(host, files, attn2_node):
    """Another pack's attn2 replacement with its own network (inference-tensor weights): guided runs use it with
    autograd; its weights are the same tensors with the same values afterwards."""
    def build(p):
        p["50"] = {"class_type": "UGTestAttn2Patch", "inputs": {"model": ["1", 0]}}
        p["5"]["inputs"]["model"] = ["50", 0]
        return p

    plain = run_ok(host, graph(31, 0.0, prefix="noattn"))
    unguided = run_ok(host, build(graph(31, 0.0, prefix="attn_u")))
    assert np.abs(plain - unguided).mean() > 0.01  # the patch is in effect
    patches = list(attn2_node.made)
    assert patches and all(p.proj.weight.is_inference() for p in patches)
    before = [(p.proj.weight, p.proj.weight.clone()) for p in patches]
    guided = run_ok(host, build(graph(31, 2.0, prefix="attn_g")))
    assert all(p.proj.weight is w and torch.equal(w, v) and w.is_inference() for p, (w, v) in zip(patches, before))
    assert mse(guided, files) < 0.9 * mse(unguided, files), (mse(guided, files), mse(unguided, files))


# ------------------------------------------------------------------------------------------------ cfg 1

def test_uncond_branch_at_cfg_1_guides_through_the_cond_prediction(host, files, caplog):
    """At cfg 1 ComfyUI computes no unconditional prediction: cfg_branch 'uncond' guides through the conditional
    one (as 'combined' does there: the same image) and the run's summary says so."""
    def run(strength, branch, prefix):
        return run_ok(host, graph(41, strength, cfg=1.0, extra={"cfg_branch": branch}, prefix=prefix))

    unguided = run(0.0, "uncond", "c1u")
    with caplog.at_level(logging.INFO, logger="universal_guidance"):
        guided = run(2.0, "uncond", "c1g")
    notes = [r.getMessage() for r in caplog.records if "cfg_branch 'uncond'" in r.getMessage()]
    assert notes and "no unconditional batch in 2 of 2 guided calls" in notes[0], notes
    assert "through the conditional prediction" in notes[0]
    assert not np.array_equal(guided, unguided)
    assert mse(guided, files) < 0.9 * mse(unguided, files)
    combined = run(2.0, "combined", "c1c")
    assert np.abs(combined - guided).max() <= 1 / 255


# ------------------------------------------------------------------------------------------------ the wrapper

def test_branch_wrapper_on_split_and_missing_batches(host):
    """The wrapper as ComfyUI calls it, on a toy model function: the kept branch in the same batch as the other, in
    a batch of its own (ComfyUI splits batches when memory is short, or by hooks) in either order, or absent.
    The gradient reaches exactly the kept branch's rows when it is there, the other rows when it is not."""
    from headless.host import pack_module
    gc = pack_module("nodes.guided_calls")
    COND, UNCOND = gc.COND, gc.UNCOND
    weight = {COND: 2.0, UNCOND: 3.0}

    def apply_model(x, t, **c):
        return x * torch.tensor([weight[ch] for ch in c["transformer_options"]["cond_or_uncond"]]).view(-1, 1)

    def denoiser(batches):
        """A denoiser call: calc_cond_batch's wrapper calls, one per batch, summed per branch (cond + uncond)."""
        def model(x, options):
            wrapper = options.get("model_function_wrapper")
            out = 0
            for chunks in batches:
                xs = torch.cat([x] * len(chunks))
                args = {"input": xs, "timestep": torch.zeros(len(chunks)), "cond_or_uncond": chunks,
                        "c": {"transformer_options": {"cond_or_uncond": chunks}}}
                y = wrapper(apply_model, args) if wrapper else apply_model(xs, args["timestep"], **args["c"])
                out = out + y.sum(0, keepdim=True)
            return out
        return model

    def grad(branch, batches_per_call):
        run = gc.BranchRun(branch)
        options = gc.with_branch({}, branch, run)
        grads = []
        for batches in batches_per_call:
            x = torch.ones(1, 1, requires_grad=True)
            model = denoiser(batches)
            y = run.guided_call(lambda o: model(x, o["model_options"]), {"model_options": options},
                                {"model_options": {}})
            y.sum().backward()
            grads.append(float(x.grad))
        return grads, run.notes()

    together, notes = grad("cond", [[[COND, UNCOND]]])
    assert together == [2.0] and notes == []
    for order in ([[COND], [UNCOND]], [[UNCOND], [COND]]):
        assert grad("cond", [order])[0] == [2.0]
        assert grad("uncond", [order])[0] == [3.0]
    # absent (cfg 1), then present, then absent again, then split with the other batch first: the first call
    # without the kept branch runs again with the gradient; later ones carry it directly; once the branch comes
    # back, the other rows' gradient is cut again.
    calls = [[[COND]], [[COND]], [[COND, UNCOND]], [[COND]], [[COND], [UNCOND]]]
    grads, notes = grad("uncond", calls)
    assert grads == [2.0, 2.0, 3.0, 2.0, 3.0]
    assert len(notes) == 1 and "no unconditional batch in 3 of 5 guided calls" in notes[0], notes
