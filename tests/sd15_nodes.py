"""What the self-guidance test files share: the tiny SD1.5 checkpoint loaded once per module by the stock loader,
CLIP Text Encode, and a node of the pack, all called as the executor calls them (inference mode)."""
from __future__ import annotations

import pytest
import torch

import prompts
from conftest import CHECKPOINT
from headless.host import pack_module

PROMPT = "a photo of a cat on a red sofa"
SIZE = 64  # pixels: latent 8×8


@pytest.fixture(scope="module")
def sd(host):
    import nodes
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT)[:3]
    return model, clip, vae


def encode(clip, text):
    import nodes
    with torch.inference_mode():
        return nodes.CLIPTextEncode().encode(clip, text)[0]


def node(host, name):
    return host.node_types[name]()


def sample(host, model, sd, guidance, *, seed=0, steps=6, cfg=3.0, prompt=PROMPT, **knobs):
    """(output latent, the run's report entry) of the Universal Guidance SAMPLER through ComfyUI's sample_custom, on
    ``model`` (the checkpoint's or a patched one) with the checkpoint's CLIP and VAE, normalized strength 0.3."""
    import comfy.sample
    _, clip, vae = sd
    bridge = pack_module("nodes.comfy_bridge")
    settings = {**prompts.KNOBS, "strength_mode": "normalized", "forward_strength": 0.3, **knobs}
    with torch.inference_mode():
        sampler = node(host, "UniversalGuidanceSampler").get_sampler(vae, guidance, **settings)[0]
        sigmas = bridge.sigmas_for(model, "normal", steps, 1.0)
        latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        out = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, encode(clip, prompt),
                                         encode(clip, "blurry"), latent, seed=seed)
    return out, sampler.ug_runs.runs[-1]
