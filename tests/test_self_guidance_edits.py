"""Self-guidance edits in a real ComfyUI (tiny random SD1.5 checkpoint): terms with different windows in one run,
the prompt the words are looked up in against the conditioning the sampler gets (UG Prompt), real-image editing
through inversion (UG Invert), and several reference images in one run (composition)."""
from __future__ import annotations

import pytest
import torch

import prompts
from conftest import CHECKPOINT
from headless.host import pack_module

SIZE = 64  # pixels: latent 8×8
PROMPT = "a photo of a cat on a red sofa"
NEGATIVE = "blurry"


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


def sg(host, name, *args, **kw):
    with torch.inference_mode():
        return node(host, name).build(*args, **kw)[0]


def run(host, sd, guidance, seed=0, steps=6, cfg=3.0, positive=None, latent=None, noise=True, sigmas=None,
        **knobs):
    """(output latent, the run's report entry) of the Universal Guidance SAMPLER through ComfyUI's sample_custom."""
    import comfy.sample
    model, clip, vae = sd
    bridge = pack_module("nodes.comfy_bridge")
    settings = {**prompts.KNOBS, "strength_mode": "normalized", "forward_strength": 0.3, **knobs}
    with torch.inference_mode():
        sampler = node(host, "UniversalGuidanceSampler").get_sampler(vae, guidance, **settings)[0]
        if sigmas is None:
            sigmas = bridge.sigmas_for(model, "normal", steps, 1.0)
        latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8) if latent is None else latent
        noise_t = comfy.sample.prepare_noise(latent, seed) if noise else torch.zeros_like(latent)
        out = comfy.sample.sample_custom(model, noise_t, cfg, sampler, sigmas,
                                         positive if positive is not None else encode(clip, PROMPT),
                                         encode(clip, NEGATIVE), latent, seed=seed)
    return out, sampler.ug_runs.runs[-1]


def term_values(run_entry, term):
    return [(e["step"], e["terms"][term]) for e in run_entry["trace"] if term in e["terms"]]


# ------------------------------------------------------------------------------------ terms, different windows

def test_terms_with_different_windows_run_together(host, sd):
    """Keep Layout on 0–0.3 (needs the unguided twin) with Move on 0–0.6 (needs none): the twin is dropped after
    step 3 of 10 while Move still guides; each term guides its own steps."""
    _, clip, _ = sd
    keep = sg(host, "UniversalGuidanceSGKeepLayout", clip, PROMPT, "sofa", "all", 10.0, 0.0, 0.3)
    both = sg(host, "UniversalGuidanceSGMove", clip, PROMPT, "cat", "all", 4.0, 0.0, 0.6, "to (x, y)", 0.2, 0.5,
              guidance=keep)
    _, entry = run(host, sd, both, steps=10)
    assert [s for s, _ in term_values(entry, "keep_layout:sofa")] == [0, 1, 2]
    assert [s for s, _ in term_values(entry, "move:cat")] == [0, 1, 2, 3, 4, 5]
    assert "3 reference passes" in entry["lines"][0]
