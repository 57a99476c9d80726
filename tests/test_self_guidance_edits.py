"""Self-guidance edits in a real ComfyUI (tiny random SD1.5 checkpoint): terms with different windows in one run,
the prompt the words are looked up in against the conditioning the sampler gets (UG Prompt), real-image editing
through inversion (UG Invert), and several reference images in one run (composition)."""
from __future__ import annotations

import pytest
import torch

import prompts
from conftest import CHECKPOINT
from headless.host import pack_module
from sd15_nodes import encode, node, sd  # noqa: F401 - sd is a fixture

SIZE = 64  # pixels: latent 8×8
PROMPT = "a photo of a cat on a red sofa"
NEGATIVE = "blurry"


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
    assert "UG Move Object" in msg and "input 'prompt'" in msg and "UG Prompt" in msg, msg
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


# --------------------------------------------------------------------------- real-image editing: UG Invert

INV_STEPS, INV_CFG = 6, 2.0


def image_latent(host, sd, seed=7):
    """VAE Encode of a smooth random picture: the 'real image' to edit."""
    import nodes
    g = torch.Generator().manual_seed(seed)
    picture = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(SIZE, SIZE),
                                              mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    with torch.inference_mode():
        return nodes.VAEEncode().encode(sd[2], picture)[0]


def invert_node(host, sd, latent, steps=INV_STEPS, cfg=INV_CFG, iterations=3, positive=None):
    model, clip, _ = sd
    with torch.inference_mode():
        return node(host, "UniversalGuidanceInvert").invert(
            model, positive or encode(clip, PROMPT), encode(clip, NEGATIVE), latent, steps, "normal", 1.0, cfg,
            iterations)


def save_picture(host, name, seed):
    import os
    import numpy as np
    from PIL import Image
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    path = os.path.join(host.workdir, "input", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(small).resize((SIZE, SIZE), Image.BILINEAR).save(path)
    return name


def saved_latent(host, result, node_id):
    import os
    from safetensors.torch import load_file
    info = result.outputs[node_id]["latents"][0]
    path = os.path.join(host.workdir, "output", info.get("subfolder", ""), info["filename"])
    return load_file(path)["latent_tensor"].float()


# max |reconstructed − encoded| / max |encoded| on the tiny random SD1.5 (6 steps, 8 fixed-point iterations, cfg 1):
# measured 0.12 (the same for the stock sampler and the UG sampler). A random UNet's large Jacobian makes the first
# step (σ 14.6 → 5.1) the hardest to invert: 4 steps gave 0.42; plain DDIM inversion (1 iteration) is several times
# worse; a sampler that did not start from the inversion would be off by the noise (σ_max ≈ 14.6).
RECONSTRUCTION_TOL = 0.2


def test_executor_invert_then_sample_returns_the_latent(host, sd):
    """LoadImage → VAE Encode → UG Invert → stock SamplerCustom (euler, no added noise, UG Invert's sigmas) returns
    the encoded latent; so does the Universal Guidance sampler with a Keep Layout term on the inversion (it starts
    from the inverted latent whatever noise SamplerCustom adds: add_noise on here)."""
    p = prompts.base(CHECKPOINT, size=SIZE)
    p["2"]["inputs"]["text"] = PROMPT
    p["11"] = {"class_type": "LoadImage", "inputs": {"image": save_picture(host, "ug_invert.png", 3)}}
    p["12"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["1", 2]}}
    p["13"] = {"class_type": "UniversalGuidanceInvert", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent": ["12", 0], "steps": 6,
        "scheduler": "normal", "denoise": 1.0, "cfg": 1.0, "iterations": 8}}
    p["14"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    p["15"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["1", 0], "add_noise": False, "noise_seed": 0, "cfg": 1.0, "positive": ["2", 0],
        "negative": ["3", 0], "sampler": ["14", 0], "sigmas": ["13", 1], "latent_image": ["13", 0]}}
    p["40"] = {"class_type": "UniversalGuidanceSGKeepLayout", "inputs": {
        "clip": ["1", 1], "prompt": PROMPT, "words": "cat", "layers": "all", "weight": 10.0,
        "start_percent": 0.0, "end_percent": 0.6, "reference": ["13", 0]}}
    p["20"] = {"class_type": "UniversalGuidanceSampler", "inputs": {
        "vae": ["1", 2], "guidance": ["40", 0], **{**prompts.KNOBS, "forward_strength": 1e-9},
        "strength_mode": "normalized"}}
    p["21"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["1", 0], "add_noise": True, "noise_seed": 5, "cfg": 1.0, "positive": ["2", 0],
        "negative": ["3", 0], "sampler": ["20", 0], "sigmas": ["13", 1], "latent_image": ["13", 0]}}
    for i, src in (("30", "12"), ("31", "15"), ("32", "21")):
        p[i] = {"class_type": "SaveLatent", "inputs": {"samples": [src, 0], "filename_prefix": f"inv_{i}"}}
    result = host.run(p)
    err = result.error()
    assert result.success, err and (err["exception_message"], err["traceback"][-3:]) or result.messages
    encoded, stock, guided = (saved_latent(host, result, i) for i in ("30", "31", "32"))
    scale = float(encoded.abs().max())
    stock_err = float((stock - encoded).abs().max()) / scale
    guided_err = float((guided - encoded).abs().max()) / scale
    print(f"reconstruction error (max abs / max |latent|): stock euler {stock_err:.4g}, UG sampler {guided_err:.4g}")
    assert stock_err < RECONSTRUCTION_TOL and guided_err < RECONSTRUCTION_TOL, (stock_err, guided_err)


def keep_layout_on(host, clip, reference, words="cat", weight=10.0):
    return sg(host, "UniversalGuidanceSGKeepLayout", clip, PROMPT, words, "all", weight, 0.0, 0.6, reference)


def test_a_sampler_schedule_other_than_the_inversions_is_an_error(host, sd):
    _, clip, _ = sd
    inverted, sigmas = invert_node(host, sd, image_latent(host, sd), steps=3, iterations=1)
    term = keep_layout_on(host, clip, inverted)
    with pytest.raises(Exception) as info:
        run(host, sd, term, steps=4, cfg=INV_CFG)
    msg = str(info.value)
    assert "keep_layout:cat" in msg and "made with 3 steps" in msg and "runs 4" in msg and "UG Invert" in msg, msg
    with pytest.raises(Exception, match="differs from the inversion's"):
        run(host, sd, term, sigmas=sigmas * 1.1, cfg=INV_CFG)


# ------------------------------------------------------------------------- composition: several references

def test_appearance_from_two_images_and_layout_from_a_third_in_one_run(host, sd):
    """Two Appearance Transfer terms (cat from image A, sofa from image B) and Keep Layout from image C: one
    reference pass per distinct reference and guided step, each term reading its own reference."""
    _, clip, _ = sd
    a, b, c = (image_latent(host, sd, seed) for seed in (11, 12, 13))

    def chain(ref_cat, ref_sofa):
        layout = keep_layout_on(host, clip, c, words="cat, sofa")
        cat = sg(host, "UniversalGuidanceSGAppearanceTransfer", clip, PROMPT, "cat", "all", 12.0, 0.0, 0.6,
                 ref_cat, guidance=layout)
        return sg(host, "UniversalGuidanceSGAppearanceTransfer", clip, PROMPT, "sofa", "all", 12.0, 0.0, 0.6,
                  ref_sofa, guidance=cat)

    _, three = run(host, sd, chain(a, b), steps=3)
    _, shared = run(host, sd, chain(a, a), steps=3)
    guided = {s for s, _ in term_values(three, "appearance_transfer:sofa")}
    assert guided == {0, 1}
    assert f"{3 * len(guided)} reference passes" in three["lines"][0], three["lines"][0]
    assert f"{2 * len(guided)} reference passes" in shared["lines"][0], shared["lines"][0]  # A shared: one pass
    sofa_b = dict(term_values(three, "appearance_transfer:sofa"))[0]
    sofa_a = dict(term_values(shared, "appearance_transfer:sofa"))[0]
    cat_1 = dict(term_values(three, "appearance_transfer:cat"))[0]
    cat_2 = dict(term_values(shared, "appearance_transfer:cat"))[0]
    assert sofa_a != sofa_b and cat_1 == cat_2  # the sofa reads its own reference; the cat's is unchanged
