"""Self-guidance in a real ComfyUI: attention capture on the tiny random SD1.5 checkpoint's UNet, the nodes, token
lookup with ComfyUI's own tokenizers. The nodes are called as the executor calls them (inference mode) so that
runs can be inspected; one test goes through the executor with an API prompt."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import prompts
from conftest import CHECKPOINT
from headless.host import pack_module
from sd15_nodes import PROMPT, SIZE, encode, node, sample, sd  # noqa: F401 - sd is a fixture


def move_term(host, clip, weight, target=(0.15, 0.5), words="cat", layers="all", chain=None, end=0.6):
    with torch.inference_mode():
        return node(host, "UniversalGuidanceSGMove").build(clip, PROMPT, words, layers, weight, 0.0, end,
                                                           "to (x, y)", target[0], target[1], guidance=chain)[0]


def run(host, sd, guidance, seed, steps=6, cfg=3.0, **knobs):
    """(output latent, the run's report entry) on the checkpoint's own model (``sd15_nodes.sample``)."""
    return sample(host, sd[0], sd, guidance, seed=seed, steps=steps, cfg=cfg, **knobs)


def last_guided(run_entry, term):
    values = [(e["step"], e["repeat"], e["terms"][term]) for e in run_entry["trace"] if term in e["terms"]]
    return values[-1][2], values


# ------------------------------------------------------------------------------------------------- capture

def one_pass(host, sd, model_options_patch, seed=3):
    """One stock-Euler run (3 steps) on a clone of the model whose model_options ``model_options_patch`` edits."""
    import comfy.sample
    model, clip, _ = sd
    clone = model.clone()
    model_options_patch(clone)
    latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(clone, noise, 3, 3.0, "euler", "normal", encode(clip, PROMPT),
                                   encode(clip, "blurry"), latent, seed=seed)


def test_capture_returns_the_stock_output_wraps_existing_patches_and_maps_equal_softmax(host, sd):
    ac = pack_module("nodes.attention_capture")
    model, _, _ = sd
    unet = model.model.diffusion_model
    layers = ac.attention_layers(unet)
    assert layers and all(k[0] in ("input", "middle", "output") for k in layers.values())
    seen = []

    def existing(q, k, v, extra_options):  # another pack's attn2 replace (as IPAdapter installs one)
        seen.append((q.detach().clone(), k.detach().clone(), list(extra_options["cond_or_uncond"]),
                     extra_options["n_heads"]))
        return ac._stock_attention()(q, k, v, extra_options)

    plain = one_pass(host, sd, lambda m: None)
    name = next(iter(layers))
    kind, bid, index = layers[name]
    captures = []

    def install(m):
        m.set_model_attn2_replace(existing, kind, bid, index)
        capture = ac.AttentionCapture(unet, {name: layers[name]}, 77, False)
        m.model_options = capture.model_options(m.model_options)
        captures.append(capture)

    patched = one_pass(host, sd, install)
    assert torch.equal(plain, patched), "the capture changed the sampler's output"
    assert len(seen) == 3, "the attn2 replace that was there before did not run"
    # The last call's maps against a softmax computed here from the same q, k.
    q, k, chunks, heads = seen[-1]
    rows = [i for i, c in enumerate(chunks) if c == 0]
    b = q.shape[0] // len(chunks)
    qc = torch.cat([q[i * b:(i + 1) * b] for i in rows]).float()
    kc = torch.cat([k[i * b:(i + 1) * b] for i in rows]).float()
    d = qc.shape[-1] // heads
    qh = qc.view(b, -1, heads, d).transpose(1, 2)
    kh = kc.view(b, -1, heads, d).transpose(1, 2)
    expected = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(1)      # [B, HW, L]
    expected = expected.view(b, expected.shape[1], -1, 77).sum(2)
    got = captures[0].maps[name]
    assert got.shape[-1] == 77 and got.shape[1] * got.shape[2] == expected.shape[1]
    torch.testing.assert_close(got.reshape(b, -1, 77), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), rtol=1e-5, atol=1e-5)


def test_layer_rules_and_scales_of_the_tiny_unet(host, sd):
    ac = pack_module("nodes.attention_capture")
    unet = sd[0].model.diffusion_model
    layers, scales = ac.attention_layers(unet), ac.layer_scales(unet)
    assert set(scales) == set(layers)
    coarse = ac.resolve_layer_rule("coarse decoder", unet)
    assert coarse and all(n.startswith("output") for n in coarse)
    assert {scales[n] for n in coarse} == {max(scales[n] for n in layers if n.startswith("output"))}
    assert ac.resolve_layer_rule("all", unet) == list(layers)
    assert set(ac.resolve_layer_rule("all decoder", unet)) == {n for n in layers if n.startswith("output")}


# ------------------------------------------------------------------------------------------------ guidance

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_move_brings_the_centroid_nearer_the_target(host, sd, seed):
    _, clip, _ = sd
    guided, g_run = run(host, sd, move_term(host, clip, 1.0), seed)
    plain, p_run = run(host, sd, move_term(host, clip, 1.0), seed, forward_strength=1e-9)  # capture, no effect
    g_loss, g_values = last_guided(g_run, "move:cat")
    p_loss, _ = last_guided(p_run, "move:cat")
    assert g_loss < p_loss, (g_loss, p_loss)
    assert all(v >= 0 for _, _, v in g_values)
    assert g_run["trace"] and all(e["phase"] == "forward" for e in g_run["trace"])
    assert "0 guided decodes" in g_run["lines"][0]  # pure self-guidance decodes nothing


def test_resize_grows_the_soft_size(host, sd):
    _, clip, _ = sd
    with torch.inference_mode():
        def term(weight):
            return node(host, "UniversalGuidanceSGResize").build(clip, PROMPT, "cat", "all", weight, 0.0, 0.6,
                                                                 2.0)[0]
        _, g_run = run(host, sd, term(1.0), 4)
        _, p_run = run(host, sd, term(1.0), 4, forward_strength=1e-9)
    g, p = last_guided(g_run, "resize:cat")[0], last_guided(p_run, "resize:cat")[0]
    assert g < p, (g, p)  # |size − 2·size_unguided| shrinks: the guided size grew towards twice the twin's
    assert "reference passes" in g_run["lines"][0]


def test_self_guidance_and_image_guidance_in_one_run_both_lower_their_losses(host, sd):
    _, clip, _ = sd
    target = torch.zeros(1, SIZE, SIZE, 3)
    target[:, :, : SIZE // 2] = 1.0

    def chain(w_move, w_image):
        with torch.inference_mode():
            image = node(host, "UniversalGuidanceImage").build(target, "l2", w_image, 0.0, 1.0)[0]
        return move_term(host, clip, w_move, chain=image)

    _, g_run = run(host, sd, chain(1.0, 1.0), 5)
    _, p_run = run(host, sd, chain(1.0, 1.0), 5, forward_strength=1e-9)
    for term in ("move:cat", "image"):
        g, p = last_guided(g_run, term)[0], last_guided(p_run, term)[0]
        assert g < p, (term, g, p)
    assert "0 guided decodes" not in g_run["lines"][0]


def test_the_cached_model_keeps_its_patches(host, sd):
    model, clip, _ = sd
    before = copy.deepcopy({k: v for k, v in model.model_options.items() if k != "transformer_options"})
    to_before = repr(model.model_options.get("transformer_options", {}))
    run(host, sd, move_term(host, clip, 1.0), 0, steps=2)
    assert repr(model.model_options.get("transformer_options", {})) == to_before
    assert {k: v for k, v in model.model_options.items() if k != "transformer_options"}.keys() == before.keys()


def test_self_guidance_without_jacobian_is_a_clear_error(host, sd):
    _, clip, _ = sd
    with pytest.raises(Exception, match="turn 'jacobian' on"):
        run(host, sd, move_term(host, clip, 1.0), 0, steps=2, jacobian=False)


def test_executor_runs_move_and_the_report_image(host, sd):
    """Through ComfyUI's validator and executor: Move alone on the KSampler, report image saved."""
    p = prompts.base(CHECKPOINT, size=SIZE)
    p["2"]["inputs"]["text"] = PROMPT
    p["40"] = {"class_type": "UniversalGuidanceSGMove", "inputs": {
        "clip": ["1", 1], "prompt": PROMPT, "words": "cat", "layers": "auto", "weight": 4.0,
        "start_percent": 0.0, "end_percent": 0.6, "mode": "to (x, y)", "x": 0.2, "y": 0.5}}
    p["5"] = {"class_type": "UniversalGuidanceKSampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "vae": ["1", 2],
        "guidance": ["40", 0], "seed": 1, "steps": 4, "cfg": 3.0, "scheduler": "normal", "denoise": 1.0,
        **{**prompts.KNOBS, "forward_strength": 0.2}, "strength_mode": "normalized"}}
    p["8"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 1], "filename_prefix": "ug_report"}}
    result = host.run(p)
    err = result.error()
    assert result.success, err and (err["exception_message"], err["traceback"][-3:]) or result.messages
    assert result.outputs["8"]["images"]


def test_word_not_in_the_prompt_names_node_input_and_words(host, sd):
    _, clip, _ = sd
    with pytest.raises(Exception) as info:
        move_term(host, clip, 1.0, words="dog")
    msg = str(info.value)
    assert "UG Move Object" in msg and "input 'words'" in msg and "'dog'" in msg and "'sofa'" in msg


# ------------------------------------------------------------------------------------------------- tokens

def sdxl_tokenizer_clip():
    """ComfyUI's own SDXL tokenizer (CLIP-G and CLIP-L) behind the ``tokenize`` call of ``comfy.sd.CLIP``."""
    from comfy import sdxl_clip

    class TokenizerOnly:
        tokenizer = sdxl_clip.SDXLTokenizer()

        def tokenize(self, text, return_word_ids=False):
            return self.tokenizer.tokenize_with_weights(text, return_word_ids)

    return TokenizerOnly()


def test_token_positions(host, sd):
    tokens = pack_module("nodes.tokens")
    _, clip, _ = sd
    find = lambda prompt, words: tokens.token_positions(clip, prompt, words, "N")  # noqa: E731
    assert find("a photo of a dog on a beach", "dog") == ([5], 77)
    assert find("a photo of a (dog:1.3) on a beach", "dog") == ([5], 77)
    assert find("a dog and a dog", "dog") == ([2, 5], 77)
    several, _ = find("a photo of a zebracornette", "zebracornette")
    assert len(several) > 1 and several == list(range(several[0], several[0] + len(several)))
    assert find("a red ball", "red ball") == ([2, 3], 77)
    long_prompt = " ".join(["grass"] * 80) + " dog"
    positions, length = find(long_prompt, "dog")
    assert length == 154 and positions == [77 + 1 + (80 - 75)]  # chunk 2 starts with SOT at 77
    xl = sdxl_tokenizer_clip()
    assert tokens.token_positions(xl, "a photo of a dog", "dog", "N") == ([5], 77)
    with pytest.raises(Exception, match="input 'words'.*'cat' is not in the prompt.*'dog'"):
        tokens.token_positions(xl, "a photo of a dog", "cat", "N")


def test_attention_map_node_draws_the_words_heat_map(host, sd):
    """UG Attention Map through the executor: an IMAGE at 8× the latent, a MASK in [0, 1], different per word."""
    from PIL import Image as PILImage
    import os as _os

    def heat(words):
        p = prompts.base(CHECKPOINT, size=SIZE)
        p["50"] = {"class_type": "UniversalGuidanceAttentionMap", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "prompt": PROMPT, "words": words, "layers": "all",
            "latent": ["4", 0], "noise_level": 0.5, "seed": 3}}
        p["51"] = {"class_type": "SaveImage", "inputs": {"images": ["50", 0], "filename_prefix": f"heat_{words}"}}
        p["52"] = {"class_type": "MaskToImage", "inputs": {"mask": ["50", 1]}}
        p["53"] = {"class_type": "SaveImage", "inputs": {"images": ["52", 0], "filename_prefix": f"mask_{words}"}}
        result = host.run(p)
        err = result.error()
        assert result.success, err and (err["exception_message"], err["traceback"][-3:]) or result.messages
        out = []
        for node in ("51", "53"):
            info = result.outputs[node]["images"][0]
            path = _os.path.join(host.workdir, "output", info.get("subfolder", ""), info["filename"])
            out.append(np.asarray(PILImage.open(path).convert("RGB")).astype(np.float64) / 255.0)
        return out

    cat_rgb, cat_mask = heat("cat")
    sofa_rgb, sofa_mask = heat("sofa")
    assert cat_rgb.shape == (SIZE, SIZE, 3) and cat_mask.shape == (SIZE, SIZE, 3)
    assert cat_mask.max() > 0.9 and cat_mask.min() < 0.1  # min-max normalised
    assert np.abs(cat_mask - sofa_mask).mean() > 0.01  # each word has its own map
