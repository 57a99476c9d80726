"""API-format prompts used by the integration tests (what the frontend sends to POST /prompt)."""
from __future__ import annotations

KNOBS = dict(forward_strength=1.0, recurrence=1, backward_steps=0, backward_lr=0.1, start_percent=0.0,
             end_percent=1.0)


def base(checkpoint: str, *, size: int = 64, batch: int = 1) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
    }


def image_guidance(reference: str, *, weight: float = 100.0, loss: str = "l2", node_id: str = "10",
                   chain=None, mask_from_alpha: bool = False) -> dict:
    p = {"11": {"class_type": "LoadImage", "inputs": {"image": reference}},
         node_id: {"class_type": "UniversalGuidanceImage",
                   "inputs": {"image": ["11", 0], "loss": loss, "weight": weight, "start_percent": 0.0,
                              "end_percent": 1.0}}}
    if mask_from_alpha:
        p[node_id]["inputs"]["mask"] = ["11", 1]
    if chain is not None:
        p[node_id]["inputs"]["guidance"] = chain
    return p


def ksampler_guided(checkpoint: str, reference: str, *, seed=0, steps=4, cfg=2.0, size=64, knobs=None,
                    weight=100.0, save=True, extra=None) -> dict:
    p = base(checkpoint, size=size)
    p.update(image_guidance(reference, weight=weight))
    p["5"] = {"class_type": "UniversalGuidanceKSampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
        "vae": ["1", 2], "guidance": ["10", 0], "seed": seed, "steps": steps, "cfg": cfg,
        "scheduler": "normal", "denoise": 1.0, **{**KNOBS, **(knobs or {})}, **(extra or {})}}
    p["6"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}
    if save:
        p["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"ug_{seed}"}}
    return p


def samplercustom_guided(checkpoint: str, reference: str, *, seed=0, steps=4, cfg=2.0, size=64, knobs=None,
                         weight=100.0) -> dict:
    p = base(checkpoint, size=size)
    p.update(image_guidance(reference, weight=weight))
    p["20"] = {"class_type": "UniversalGuidanceSampler", "inputs": {
        "vae": ["1", 2], "guidance": ["10", 0], **{**KNOBS, **(knobs or {})}}}
    p["21"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal",
                                                          "steps": steps, "denoise": 1.0}}
    p["5"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["1", 0], "add_noise": True, "noise_seed": seed, "cfg": cfg, "positive": ["2", 0],
        "negative": ["3", 0], "sampler": ["20", 0], "sigmas": ["21", 0], "latent_image": ["4", 0]}}
    p["6"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}
    p["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"ugc_{seed}"}}
    return p


def samplercustomadvanced_guided(checkpoint: str, reference: str, *, seed=0, steps=4, cfg=2.0, size=64,
                                 knobs=None, weight=100.0) -> dict:
    """SamplerCustomAdvanced (ComfyUI 2024-04 and later) with the Universal Guidance SAMPLER."""
    p = samplercustom_guided(checkpoint, reference, seed=seed, steps=steps, cfg=cfg, size=size, knobs=knobs,
                             weight=weight)
    p["22"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
    p["23"] = {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0],
                                                     "negative": ["3", 0], "cfg": cfg}}
    p["5"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["22", 0], "guider": ["23", 0], "sampler": ["20", 0], "sigmas": ["21", 0],
        "latent_image": ["4", 0]}}
    p["7"]["inputs"]["filename_prefix"] = f"ugca_{seed}"
    return p
