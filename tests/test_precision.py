"""Every precision users run, in the real executor on the CPU: the diffusion model in fp16, bf16 and fp8 weights, the
VAE in half precision, the guidance networks under autocast, as a GPU runs them.

How the CPU is made to compute as a GPU does, with ComfyUI's own settings (set for one test, then restored):

* weights: ``--fp16-unet`` / ``--bf16-unet`` (``comfy.cli_args.args``), fp8 through the stock ``UNETLoader``'s
  ``weight_dtype`` where the host has it (v0.3.64), else ``--fp8_e4m3fn-unet``;
* compute dtype: on the CPU ComfyUI stores half weights but computes in fp32 (``manual_cast_dtype``), so
  ``comfy.model_management.unet_manual_cast`` answers "no cast" for fp16/bf16 weights and fp16 for fp8 weights, as it
  does on a GPU that supports them;
* VAE: ``--fp16-vae`` / ``--bf16-vae`` (v0.3.64 reads them at load time; the 2024-03 host fixes ``VAE_DTYPE`` at
  import, so that is set instead);
* the guidance networks' autocast, which the pack applies on CUDA only: its ``autocast_dtype`` answers the half dtype
  on the CPU too.

* fp8 compute (scaled-fp8 and fp8 "fast" layers): ``--supports-fp8-compute`` (``SUPPORT_FP8_OPS``); torch 2.14 runs
  ``torch._scaled_mm`` on the CPU.

Each run is one tiny prompt (16×16 pixels, 1 step; 2 where step positions matter). fp16 and bf16 kernels on the CPU
of torch 2.14 are about as fast as fp32 ones, so half-precision ops really run in half precision: overflows,
underflows and dtype mismatches are the GPU's.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

import prompts
import random_networks as rn
from conftest import CHECKPOINT, ROOT

SIZE = 16
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def has_weight_dtype() -> bool:
    """The stock UNETLoader offers weight_dtype (fp8 weights) on this host (2024-07 and later)."""
    import nodes
    return "weight_dtype" in nodes.UNETLoader.INPUT_TYPES()["required"]


MODES = ("fp16", "bf16", "fp8", "fp8-fast", "fp8-scaled")
TEXT_CHECKPOINT = "ug-tiny-text.safetensors"


@pytest.fixture(scope="module")
def files(host):
    """The reference image, a tiny CLIP for a network term, and the checkpoint's UNet and VAE as separate files under
    one name per precision (the executor caches a loader's output by its inputs; text encodings come from the shared
    checkpoint)."""
    import folder_paths
    from safetensors.torch import load_file, save_file
    ref = np.zeros((SIZE, SIZE, 3), np.uint8)
    ref[:, : SIZE // 2] = 255
    Image.fromarray(ref).save(os.path.join(host.workdir, "input", "ug_precision_ref.png"))
    clip_dir = os.path.join(host.workdir, "models", "universal_guidance", "clip")
    os.makedirs(clip_dir, exist_ok=True)
    folder_paths.add_model_folder_path("ug_clip", clip_dir)
    _, clip_path = rn.write_tiny_clip(clip_dir, "vit")
    unet_dir = host.model_dir("diffusion_models")
    os.makedirs(unet_dir, exist_ok=True)
    for kind in ("diffusion_models", "unet"):  # the folder's name before 2024-10 and after
        if kind in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(kind, unet_dir)
    source = os.path.join(ROOT, "out", "test-models", "checkpoints", CHECKPOINT)
    link = os.path.join(host.model_dir("checkpoints"), TEXT_CHECKPOINT)
    if not os.path.exists(link):
        os.symlink(source, link)
    checkpoint = load_file(source)
    for prefix, folder in (("model.diffusion_model.", unet_dir), ("first_stage_model.", host.model_dir("vae"))):
        part = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
        path = os.path.join(folder, "ug-tiny-" + prefix.split(".")[0] + ".safetensors")
        save_file(part, path)
        for mode in MODES:
            link = os.path.join(folder, f"ug-tiny-{mode}.safetensors")
            if os.path.exists(link):
                continue
            if mode == "fp8-scaled" and folder == unet_dir and FP8:
                # a scaled-fp8 file as Comfy-Org ships them: Linear weights in fp8 and the "scaled_fp8" marker
                # (empty: ComfyUI then multiplies in fp8 on a GPU with fp8 compute)
                scaled = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in part.items()}
                save_file({**scaled, "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, link)
            else:
                os.symlink(path, link)
    return {"ref": ref.astype(np.float64) / 255.0, "clip": os.path.basename(clip_path)}


def use_precision(monkeypatch, mode: str) -> list:
    """ComfyUI set up as a GPU runs ``mode`` weights (see the module docstring): fp16 / bf16 weights computed in
    their dtype with a VAE and autocast of the same dtype; fp8 weights computed in fp16 with a bf16 VAE and bf16
    autocast (an RTX 40xx). Returns the list that records the devices the pack asked an autocast dtype for."""
    import comfy.model_management as mm
    from comfy.cli_args import args
    if mode in HALF:
        monkeypatch.setattr(args, f"{mode}_unet", True)
    elif not has_weight_dtype():  # fp8 weights where UNETLoader has no weight_dtype
        monkeypatch.setattr(args, "fp8_e4m3fn_unet", True)
    original = mm.unet_manual_cast

    def manual_cast(weight_dtype, device, *a, **k):
        if weight_dtype in (torch.float16, torch.bfloat16):
            return None  # computes in the weights' own dtype
        if weight_dtype in FP8:
            return torch.float16
        return original(weight_dtype, device, *a, **k)

    monkeypatch.setattr(mm, "unet_manual_cast", manual_cast)
    vae = mode if mode in HALF else "bf16"
    monkeypatch.setattr(args, f"{vae}_vae", True)
    if "VAE_DTYPE" in vars(mm):  # the 2024-03 host reads the flags once, at import
        monkeypatch.setattr(mm, "VAE_DTYPE", HALF[vae])
    return force_autocast(monkeypatch, vae)


def pack(name: str, folder: str = "nodes"):
    """A module of the pack as the executor's nodes use it (found from a node class, whatever the folder name)."""
    import importlib

    import nodes
    package = nodes.NODE_CLASS_MAPPINGS["UniversalGuidanceKSampler"].__module__.rsplit(".nodes.", 1)[0]
    return importlib.import_module(f"{package}.{folder}.{name}")


def force_autocast(monkeypatch, name: str) -> list:
    calls = []

    def autocast_dtype(device):
        calls.append(device)
        return HALF[name]

    monkeypatch.setattr(pack("guided_calls"), "autocast_dtype", autocast_dtype)
    return calls


def graph(files, mode: str, *, seed=3, steps=1, weight=100.0, clip_weight=0.05, knobs=None) -> dict:
    """KSampler guided by the reference image (and a tiny CLIP text term: a network under autocast). ``mode`` other
    than fp32: the UNet and the VAE come from the stock UNETLoader and VAELoader under that precision's names."""
    p = prompts.ksampler_guided(CHECKPOINT, "ug_precision_ref.png", size=SIZE, steps=steps, seed=seed,
                                weight=weight, knobs={"strength_mode": "paper", **(knobs or {})})
    p["7"]["inputs"]["filename_prefix"] = f"precision_{mode}"
    if clip_weight:
        p["12"] = {"class_type": "UniversalGuidanceCLIPText", "inputs": {
            "text": "a red apple", "clip_model": files["clip"], "architecture": "auto (from file)", "cutouts": 0,
            "weight": clip_weight, "start_percent": 0.0, "end_percent": 1.0, "guidance": ["10", 0]}}
        p["5"]["inputs"]["guidance"] = ["12", 0]
    if mode != "fp32":
        # the text encoder from its own name: a checkpoint loaded here under half-precision flags must not be the
        # executor's cached output for the shared checkpoint name that other tests use
        p["1"]["inputs"]["ckpt_name"] = TEXT_CHECKPOINT
        name = f"ug-tiny-{mode}.safetensors"
        p["40"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name}}
        if has_weight_dtype():
            p["40"]["inputs"]["weight_dtype"] = {"fp8": "fp8_e4m3fn", "fp8-fast": "fp8_e4m3fn_fast"}.get(mode,
                                                                                                        "default")
        p["41"] = {"class_type": "VAELoader", "inputs": {"vae_name": name}}
        p["5"]["inputs"]["model"] = ["40", 0]
        p["5"]["inputs"]["vae"] = p["6"]["inputs"]["vae"] = ["41", 0]
    return p


def run_ok(host, prompt):
    result = host.run(prompt)
    err = result.error()
    assert result.success, err and (err["exception_message"], err["traceback"][-3:]) or result.messages
    return result


def run_error(host, prompt) -> str:
    result = host.run(prompt)
    assert not result.success, "the run succeeded"
    err = result.error()
    assert err is not None, result.messages
    return err["exception_message"]


def image_of(host, result) -> np.ndarray:
    info = result.outputs["7"]["images"][0]
    path = os.path.join(host.workdir, "output", info.get("subfolder", ""), info["filename"])
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64) / 255.0


def loaded_diffusion_model():
    """The most recently loaded diffusion model (BaseModel) in ComfyUI's memory manager."""
    import comfy.model_management as mm
    for loaded in mm.current_loaded_models:
        model = getattr(getattr(loaded, "model", None), "model", None)
        if hasattr(model, "diffusion_model"):
            return model
    raise AssertionError("no diffusion model is loaded")


def log_lines(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "universal_guidance")


_unguided = {}


def unguided(host, files, mode: str) -> np.ndarray:
    """The unguided image of ``graph(files, mode)`` (one run per precision, shared by the tests)."""
    if mode not in _unguided:
        _unguided[mode] = image_of(host, run_ok(host, graph(files, mode, knobs={"forward_strength": 0.0})))
    return _unguided[mode]


# ------------------------------------------------------------------------------------- guided runs per precision

@pytest.mark.parametrize("mode", ["fp16", "bf16", "fp8"])
def test_guided_run_in_precision_lowers_the_loss(host, files, monkeypatch, caplog, mode):
    if mode == "fp8" and not FP8:
        pytest.skip("this torch has no float8 dtypes")
    autocast_calls = use_precision(monkeypatch, mode)
    base = unguided(host, files, mode)
    with caplog.at_level(logging.INFO, logger="universal_guidance"):
        guided = image_of(host, run_ok(host, graph(files, mode, knobs={"forward_strength": 2.0})))
    model = loaded_diffusion_model()  # the setup took effect: half weights, computed in their own dtype
    weight_dtype = next(model.diffusion_model.parameters()).dtype
    if mode in HALF:
        assert weight_dtype == HALF[mode] and model.manual_cast_dtype is None, (weight_dtype, model.manual_cast_dtype)
    else:
        assert weight_dtype == torch.float8_e4m3fn and model.manual_cast_dtype == torch.float16
    assert np.isfinite(guided).all()
    d_u, d_g = ((base - files["ref"]) ** 2).mean(), ((guided - files["ref"]) ** 2).mean()
    assert d_g < 0.9 * d_u, (mode, d_g, d_u)
    assert autocast_calls and all(d.type == "cpu" for d in autocast_calls)  # the networks ran under autocast
    assert "skipped" not in log_lines(caplog)


# ------------------------------------------------------------------------------------------- fp16 loss scaling

def test_fp16_weight_that_overflowed_the_fixed_scale_still_guides(host, files, monkeypatch, caplog):
    """weight 1e5 on an fp16 model: the gradient is finite unscaled, but a fixed scale of 2¹⁰ overflowed it, every
    update was skipped and the output was the unguided image. The scale now starts divided by the weight."""
    use_precision(monkeypatch, "fp16")
    base = unguided(host, files, "fp16")
    with caplog.at_level(logging.INFO, logger="universal_guidance"):
        guided = image_of(host, run_ok(host, graph(files, "fp16", weight=1.0e5, clip_weight=0.0,
                                                   knobs={"forward_strength": 2.0})))
    assert np.isfinite(guided).all()
    assert np.abs(guided - base).max() > 0.05
    assert "skipped" not in log_lines(caplog)


def test_fp16_run_whose_every_update_was_skipped_says_so(host, files, monkeypatch, caplog):
    """weight 1e6 on an fp16 model at this size: the gradient overflows fp16 even unscaled, so the one update is
    skipped and counted; the run succeeds (the unguided image) and says that guidance did nothing."""
    use_precision(monkeypatch, "fp16")
    base = unguided(host, files, "fp16")
    with caplog.at_level(logging.INFO, logger="universal_guidance"):
        out = image_of(host, run_ok(host, graph(files, "fp16", weight=1.0e6, clip_weight=0.0,
                                                knobs={"forward_strength": 2.0})))
    lines = log_lines(caplog)
    assert "every guidance update was skipped (1 of 1: non-finite gradients), so the output is unguided" in lines
    assert "fp16 loss scale lowered" not in lines  # started unscaled: the weight already scales the loss
    assert np.array_equal(out, base)


def test_fp16_scaled_gradient_overflow_backs_off_within_the_step(host, files, monkeypatch, caplog):
    """A loss scale far too high for fp16 (2⁴⁰, 2³³ after the weight 100): the scaled gradient overflows, the scale is
    halved and the gradient recomputed from the same graph, then taken unscaled (one halving allowed here, to keep
    the test short); nothing is skipped and the run is guided."""
    use_precision(monkeypatch, "fp16")
    monkeypatch.setattr(pack("guided_calls"), "LOSS_SCALE", 2.0 ** 40)
    monkeypatch.setattr(pack("sampler", "guidance"), "LOSS_SCALE_BACKOFFS", 1)
    base = unguided(host, files, "fp16")
    with caplog.at_level(logging.INFO, logger="universal_guidance"):
        guided = image_of(host, run_ok(host, graph(files, "fp16", clip_weight=0.0,
                                                   knobs={"forward_strength": 2.0})))
    lines = log_lines(caplog)
    assert (f"fp16 loss scale lowered from {2.0 ** 33:g} to 1 after gradient overflows (2 extra backward pass(es))"
            in lines), lines
    assert "skipped" not in lines
    assert np.isfinite(guided).all() and np.abs(guided - base).max() > 0.05


def test_fp16_autocast_alone_scales_the_loss(host, files, monkeypatch):
    """fp32 model and VAE, guidance networks under fp16 autocast (a GPU without bf16: T4, V100): the loss is
    scaled, as for an fp16 model."""
    force_autocast(monkeypatch, "fp16")
    bridge = pack("comfy_bridge")
    seen = []
    original = bridge.sample_universal

    def spy(*args, **kwargs):
        seen.append(kwargs["loss_scale"])
        return original(*args, **kwargs)

    monkeypatch.setattr(bridge, "sample_universal", spy)
    run_ok(host, graph(files, "fp32", steps=1, knobs={"forward_strength": 1.0}))
    assert seen == [1024.0]


# ---------------------------------------------------------------------------------------- non-finite outputs

def test_fp16_output_past_the_range_is_an_error(host, files, monkeypatch):
    """fp16 without the bound on an update (max_step 0): a large step pushes the latent past what the fp16 VAE can
    decode. That was a black image reported as success; it is an error naming the node and what to do."""
    use_precision(monkeypatch, "fp16")
    msg = run_error(host, graph(files, "fp16", clip_weight=0.0, knobs={"forward_strength": 1000.0, "max_step": 0.0}))
    assert msg.startswith("Universal KSampler:"), msg
    assert "NaN" in msg and "max_step" in msg and "forward_strength" in msg, msg


# ------------------------------------------------------------------------------ operations without a backward pass

def test_scaled_fp8_file_is_refused_before_the_run(host, files, monkeypatch):
    """A scaled-fp8 file on a GPU with fp8 compute: ComfyUI's scaled-fp8 layers multiply with torch._scaled_mm,
    which has no derivative. A clear error before the run, naming what to change (it failed inside autograd)."""
    if not has_weight_dtype() or not FP8:
        pytest.skip("this ComfyUI has no scaled-fp8 layers (added 2024-10); run with COMFYUI_PATH=<newer>")
    import comfy.model_management as mm
    use_precision(monkeypatch, "fp8")
    monkeypatch.setattr(mm, "SUPPORT_FP8_OPS", True)  # --supports-fp8-compute: what an RTX 40xx / H100 reports
    msg = run_error(host, graph(files, "fp8-scaled", clip_weight=0.0, knobs={"forward_strength": 1.0}))
    assert msg.startswith("Universal KSampler: input 'model':"), msg
    assert "scaled-fp8" in msg and "torch._scaled_mm" in msg and "jacobian" in msg, msg
    assert "derivative" not in msg  # refused up front, not translated from autograd's failure


def test_fp8_fast_layers_still_guide(host, files, monkeypatch):
    """ComfyUI's fp8 "fast" layers (weight_dtype fp8_e4m3fn_fast, or --fast) fall back to a cast weight when their
    input needs a gradient, so they are not refused: the guided run works on a GPU with fp8 compute."""
    if not has_weight_dtype() or not FP8:
        pytest.skip("this ComfyUI has no fp8 fast layers (added 2024-08); run with COMFYUI_PATH=<newer>")
    import comfy.model_management as mm
    import comfy.ops
    use_precision(monkeypatch, "fp8")
    monkeypatch.setattr(mm, "SUPPORT_FP8_OPS", True)
    base = unguided(host, files, "fp8")
    guided = image_of(host, run_ok(host, graph(files, "fp8-fast", clip_weight=0.0,
                                               knobs={"forward_strength": 2.0})))
    model = loaded_diffusion_model()
    assert any(isinstance(m, comfy.ops.fp8_ops.Linear) for m in model.diffusion_model.modules())
    assert np.isfinite(guided).all()
    d_u, d_g = ((base - files["ref"]) ** 2).mean(), ((guided - files["ref"]) ** 2).mean()
    assert d_g < 0.9 * d_u, (d_g, d_u)


@pytest.mark.parametrize("kind", ["sage", "flash"])
def test_attention_without_backward_is_refused_before_the_run(host, files, monkeypatch, kind):
    """--use-sage-attention / --use-flash-attention select attention kernels without a backward pass (sage returns
    no graph at all; ComfyUI's flash kernel is a custom op with no autograd formula)."""
    import comfy.ldm.modules.attention as attention
    if not hasattr(attention, f"attention_{kind}"):
        pytest.skip(f"this ComfyUI has no {kind} attention (added 2024-12); run with COMFYUI_PATH=<newer>")
    # what the flag selects when ComfyUI starts (the kernels themselves need CUDA)
    monkeypatch.setattr(attention, "optimized_attention", getattr(attention, f"attention_{kind}"))
    msg = run_error(host, graph(files, "fp32", steps=1, clip_weight=0.0, knobs={"forward_strength": 1.0}))
    assert msg.startswith("Universal KSampler: input 'model':"), msg
    assert f"--use-{kind}-attention" in msg and "jacobian" in msg, msg


@torch.library.custom_op("ug_test::attention_without_backward", mutates_args=())
def _attention_without_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _patched_attention(q, k, v, extra_options):
    heads = extra_options["n_heads"]
    b, n, inner = q.shape
    split = [t.reshape(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v)]
    return _attention_without_backward(*split).transpose(1, 2).reshape(b, n, inner)


class NoBackwardAttentionPatch:
    """Stands in for another pack's node that patches a fast, inference-only attention kernel into the model."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model):
        m = model.clone()
        m.set_model_attn1_replace(_patched_attention, "middle", 0)
        return (m,)


def test_patched_attention_without_backward_is_a_clear_error(host, files, monkeypatch):
    import nodes
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "UGTestNoBackwardAttention", NoBackwardAttentionPatch)
    p = graph(files, "fp32", steps=1, clip_weight=0.0, knobs={"forward_strength": 1.0})
    p["50"] = {"class_type": "UGTestNoBackwardAttention", "inputs": {"model": ["1", 0]}}
    p["5"]["inputs"]["model"] = ["50", 0]
    msg = run_error(host, p)
    assert msg.startswith("Universal KSampler: an operation on the guidance gradient's path has no "
                          "backward pass"), msg
    assert "ug_test" in msg and "attention" in msg and "jacobian" in msg, msg


# -------------------------------------------------------------------------------------------- silent no-op runs

def test_term_whose_window_holds_no_step_is_reported(host, files, caplog):
    """0.9–1.0 with 2 steps (they start at 0 and 0.5 of the run): the term never guides; the run says so."""
    p = prompts.samplercustom_guided(CHECKPOINT, "ug_precision_ref.png", size=SIZE, steps=2, seed=4,
                                     knobs={"forward_strength": 1.0})
    p["10"]["inputs"]["start_percent"] = 0.9
    with caplog.at_level(logging.INFO, logger="universal_guidance"):
        run_ok(host, p)
    lines = log_lines(caplog)
    assert "guidance term 'image' guided no step: its window 0.9–1 holds none of this run's 2 step(s)" in lines, lines


@pytest.mark.parametrize("fp8_matrix_mult", [True, False])
def test_scaled_fp8_layers_are_refused_only_when_they_multiply_in_fp8(host, fp8_matrix_mult):
    """Scaled-fp8 checkpoints (e.g. Flux fp8 "scaled") get ComfyUI's ``scaled_fp8_ops``; with fp8 matrix
    multiplication (an fp8-capable GPU and the checkpoint's fp8 marker) their backward fails, without it they are
    cast to the compute dtype and differentiable. Only the first is refused."""
    import comfy.ops
    if not hasattr(comfy.ops, "scaled_fp8_ops") or not FP8:
        pytest.skip("this ComfyUI has no scaled fp8 layers (added 2024-10); run with COMFYUI_PATH=<newer>")
    # ComfyUI builds them with scale_input = fp8_matrix_mult (both follow the file's fp8 marker)
    ops = comfy.ops.scaled_fp8_ops(fp8_matrix_mult=fp8_matrix_mult, scale_input=fp8_matrix_mult,
                                   override_dtype=torch.float8_e4m3fn)
    layer = ops.Linear(16, 8, dtype=torch.float8_e4m3fn)
    layer.weight = torch.nn.Parameter(torch.randn(8, 16).to(torch.float8_e4m3fn), requires_grad=False)
    net = torch.nn.Sequential(layer).eval()
    x = torch.randn(1, 4, 16, requires_grad=True)
    problem = pack("guided_calls").backward_problem(net)
    if fp8_matrix_mult:
        with pytest.raises(RuntimeError, match="derivative for aten::_scaled_mm is not implemented"):
            net(x).sum().backward()
        assert problem is not None and "scaled-fp8" in problem, problem
    else:
        net(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert problem is None
