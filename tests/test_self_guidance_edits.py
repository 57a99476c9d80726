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


# ------------------------------------------------------------------------------ one source of truth: UG Prompt

def ug_prompt(host, clip, text):
    with torch.inference_mode():
        return node(host, "UniversalGuidancePrompt").encode(clip, text)[0]


def test_ug_prompt_conditions_like_clip_text_encode_and_feeds_the_words(host, sd):
    _, clip, _ = sd
    cond = ug_prompt(host, clip, PROMPT)
    assert torch.equal(cond[0][0], encode(clip, PROMPT)[0][0])
    move = sg(host, "UniversalGuidanceSGMove", None, "", "cat", "all", 4.0, 0.0, 0.6, "to (x, y)", 0.2, 0.5,
              conditioning=cond)
    assert move.terms[0].loss.tokens == [5]  # "cat" in "a photo of a cat on a red sofa"
    _, entry = run(host, sd, move, positive=cond, steps=3)
    assert term_values(entry, "move:cat")


def test_a_prompt_that_differs_from_the_sampler_conditioning_is_an_error(host, sd):
    _, clip, _ = sd
    other = "a photo of a red sofa on a cat"
    typed = sg(host, "UniversalGuidanceSGMove", clip, PROMPT, "cat", "all", 4.0, 0.0, 0.6, "to (x, y)", 0.2, 0.5)
    _, entry = run(host, sd, typed, steps=2)  # typed prompt = the positive prompt: runs as before
    assert term_values(entry, "move:cat")
    with pytest.raises(Exception) as info:
        run(host, sd, typed, steps=2, positive=encode(clip, other))
    msg = str(info.value)
    assert "UG Self-Guidance Move" in msg and "input 'prompt'" in msg and "UG Prompt" in msg, msg
    linked = sg(host, "UniversalGuidanceSGMove", None, "", "cat", "all", 4.0, 0.0, 0.6, "to (x, y)", 0.2, 0.5,
                conditioning=ug_prompt(host, clip, PROMPT))
    with pytest.raises(Exception, match=f"input 'conditioning'.*{other!r}"):
        run(host, sd, linked, steps=2, positive=ug_prompt(host, clip, other))
    with pytest.raises(Exception, match="input 'prompt'.*differs from the text of the UG Prompt"):
        sg(host, "UniversalGuidanceSGMove", None, other, "cat", "all", 4.0, 0.0, 0.6, "to (x, y)", 0.2, 0.5,
           conditioning=ug_prompt(host, clip, PROMPT))
    with pytest.raises(Exception, match="input 'conditioning' carries no prompt text"):
        sg(host, "UniversalGuidanceSGMove", None, "", "cat", "all", 4.0, 0.0, 0.6, "to (x, y)", 0.2, 0.5,
           conditioning=encode(clip, PROMPT))


def test_executor_runs_ug_prompt_into_sampler_and_self_guidance(host, sd):
    p = prompts.base(CHECKPOINT, size=SIZE)
    p["2"] = {"class_type": "UniversalGuidancePrompt", "inputs": {"clip": ["1", 1], "text": PROMPT}}
    p["40"] = {"class_type": "UniversalGuidanceSGMove", "inputs": {
        "conditioning": ["2", 0], "prompt": "", "words": "cat", "layers": "auto", "weight": 4.0,
        "start_percent": 0.0, "end_percent": 0.6, "mode": "to (x, y)", "x": 0.2, "y": 0.5}}
    p["5"] = {"class_type": "UniversalGuidanceKSampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "vae": ["1", 2],
        "guidance": ["40", 0], "seed": 1, "steps": 3, "cfg": 3.0, "scheduler": "normal", "denoise": 1.0,
        **{**prompts.KNOBS, "forward_strength": 0.2}, "strength_mode": "normalized"}}
    p["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "ug_prompt"}}
    result = host.run(p)
    err = result.error()
    assert result.success, err and (err["exception_message"], err["traceback"][-3:]) or result.messages
    p["33"] = {"class_type": "UniversalGuidancePrompt", "inputs": {"clip": ["1", 1], "text": "blurry"}}
    p["5"]["inputs"]["negative"] = ["33", 0]
    p["40"]["inputs"]["conditioning"] = ["33", 0]  # the words looked up in the negative prompt: refused
    result = host.run(p)
    assert not result.success
    err = result.error()
    text = err["exception_message"] if err else str(result.messages)
    assert "'cat' is not in the prompt" in text and "'blurry'" in text, text
