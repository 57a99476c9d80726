"""Self-guidance on joint-attention transformers (SD3's MMDiT, Flux) in a real ComfyUI v0.3.64: the text→image
attention capture on the tiny random SD3 and Flux files of test_model_families (loaded by the stock loaders), the
nodes through ComfyUI's own sampling, and the word → token lookup with ComfyUI's own T5 / CLIP tokenizers.

On a host without SD3 / Flux (the 2024-03 default) the capture tests skip; the refusal there is tested on a
stand-in network of Flux's block layout."""
from __future__ import annotations

import copy

import pytest
import torch

import prompts
from headless.host import pack_module
from sd15_nodes import node
from test_model_families import FAMILIES, ensure_files, family_folders, host_label

SIZE = 64            # pixels: latent 8×8 (4×4 image tokens)
PROMPT = "a photo of a cat on a red sofa"
FAMILY_NAMES = ("flux", "sd3")


def _supported(host, fam):
    import comfy.supported_models
    missing = [name for name in fam.requires if not hasattr(comfy.supported_models, name)]
    if missing:
        pytest.skip(f"{fam.name}: {host_label(host)} has no {', '.join(missing)} model support; this runs on ComfyUI "
                    f"v0.3.64 (COMFYUI_PATH=…)")


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def dit(request, host):
    """(family, model, clip, vae) loaded by the stock loaders, as the executor would (inference mode)."""
    import nodes
    fam = FAMILIES[request.param]
    _supported(host, fam)
    names = ensure_files(fam)
    with family_folders(host, fam):
        with torch.inference_mode():
            if "diffusion_models" in names:
                model = nodes.UNETLoader().load_unet(names["diffusion_models"], "default")[0]
                vae = nodes.VAELoader().load_vae(names["vae"])[0]
                clip = nodes.CLIPLoader().load_clip(names["text_encoders"], "sd3")[0]
            else:
                model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(names["checkpoints"])[:3]
        yield fam, model, clip, vae


def conditioning(fam, clip, text):
    import nodes
    with torch.inference_mode():
        cond = nodes.CLIPTextEncode().encode(clip, text)[0]
        if fam.flux_guidance is not None:
            cond = [[c, {**d, "guidance": fam.flux_guidance}] for c, d in cond]
    return cond


def latent(fam):
    return torch.zeros(1, 16, SIZE // 8, SIZE // 8)


def stock_run(fam, model, clip, patch, seed=3, steps=2):
    """ComfyUI's own euler sampler on a clone of the model whose model_options ``patch`` edits."""
    import comfy.sample
    clone = model.clone()
    patch(clone)
    lat = latent(fam)
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(lat, seed)
        return comfy.sample.sample(clone, noise, steps, fam.cfg, "euler", "simple", conditioning(fam, clip, PROMPT),
                                   conditioning(fam, clip, ""), lat, seed=seed)


# ------------------------------------------------------------------------------------------------- capture

def test_capture_keeps_the_stock_output_runs_existing_patches_and_maps_equal_the_joint_softmax(host, dit):
    """Maps = the image queries' rows of the softmax over all joint keys (text first), at the text keys, cond rows,
    heads averaged — against a softmax computed here from the q, k another pack's attention override saw; with the
    capture installed the sampler's output is bit for bit the stock one; an attention override and a dit block
    replace that were there before still run."""
    jc = pack_module("nodes.joint_capture")
    ac = pack_module("nodes.attention_capture")
    fam, model, clip, _ = dit
    net = model.model.diffusion_model
    layers = ac.attention_layers(net)
    assert layers and set(layers) == set(jc.joint_layers(net))
    seen, replaced = [], []

    def existing_override(func, *args, **kwargs):  # another pack's attention override
        seen.append((args[0].detach().clone(), args[1].detach().clone(),
                     args[3] if len(args) > 3 else kwargs["heads"], kwargs.get("skip_reshape", False),
                     list(kwargs["transformer_options"].get("cond_or_uncond") or [0])))
        return func(*args, **kwargs)

    name = list(layers)[-1]          # Flux: the single block (one stream); SD3: the last joint block
    key = layers[name]

    def existing_replace(args, extra):  # another pack's dit block replace
        replaced.append(name)
        return extra["original_block"](args)

    tokens, length = pack_module("nodes.tokens").token_positions(clip, PROMPT, "cat", "test")
    captures = []

    def install(m, existing: bool, tokens_=None):
        if existing:
            m.model_options["transformer_options"]["optimized_attention_override"] = existing_override
            m.set_model_patch_replace(existing_replace, "dit", key[0], key[1])
        capture = jc.JointCapture(net, {name: key}, length, True, tokens_)
        m.model_options = capture.model_options(m.model_options)
        capture.open = True
        handle = net.register_forward_pre_hook(capture.start_call, with_kwargs=True)
        captures.append((capture, handle))

    plain = stock_run(fam, model, clip, lambda m: None)
    alone = stock_run(fam, model, clip, lambda m: install(m, False, tokens))
    captures[-1][1].remove()
    wrapped = stock_run(fam, model, clip, lambda m: install(m, True))
    captures[-1][1].remove()
    assert torch.equal(plain, alone), "the capture changed the sampler's output"
    assert torch.equal(plain, wrapped), "the capture with other patches changed the sampler's output"
    n_blocks = len(layers)
    assert len(seen) >= 2 * n_blocks, "the attention override that was there before did not run"
    assert replaced, "the dit block replace that was there before did not run"
    assert not model.model_options.get("transformer_options", {}).get("patches_replace"), "the cached model changed"

    # The last call of the captured block: the softmax over all keys, computed here.
    q, k, heads, skip, chunks = seen[-1]
    if not skip:
        q = q.view(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
        k = k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
    q, k = q.float(), k.float()
    b = q.shape[0] // len(chunks)
    rows = [i for i, c in enumerate(chunks) if c == 0]
    q = torch.cat([q[i * b:(i + 1) * b] for i in rows])
    k = torch.cat([k[i * b:(i + 1) * b] for i in rows])
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)      # [B, H, L, L]
    n_img = (SIZE // 16) ** 2
    n_txt = q.shape[2] - n_img
    expected = probs[:, :, n_txt:, :n_txt].mean(1)                                    # [B, n_img, n_txt]
    expected = expected.view(b, n_img, -1, length).sum(2)
    full = captures[1][0].maps[name]                                                  # every token computed
    assert full.shape == (b, SIZE // 16, SIZE // 16, length)
    torch.testing.assert_close(full.reshape(b, n_img, length), expected, rtol=1e-4, atol=1e-6)
    assert float(full.sum(-1).max()) < 1.0       # the image keys take the rest of each row
    some = captures[0][0].maps[name]                                                  # only the word's tokens
    assert torch.equal(some[..., tokens] != 0, torch.ones_like(some[..., tokens], dtype=torch.bool))
    # the first run's last step saw other q, k; its maps are of the same kind: zero outside the word's tokens
    others = [t for t in range(length) if t not in tokens]
    assert float(some[..., others].abs().max()) == 0.0
    feats = captures[1][0].feats
    assert feats is not None and feats.shape[0] == b and feats.shape[-2:] == (SIZE // 16, SIZE // 16)


def test_chunked_log_sum_exp_matches_autograd(host):
    """The log-sum-exp over all joint keys in chunks, with its recomputing backward pass, against autograd's."""
    jc = pack_module("nodes.joint_capture")
    torch.manual_seed(0)
    with torch.inference_mode(False):
        q = torch.randn(1, 2, 16, 4, dtype=torch.float64, requires_grad=True)
        k = torch.randn(1, 2, 18, 4, dtype=torch.float64, requires_grad=True)
        old = jc.CHUNK_ELEMENTS
        jc.CHUNK_ELEMENTS = 1 * 2 * 18 * 5          # 5 query rows per chunk: 4 chunks, the last one short
        try:
            assert torch.autograd.gradcheck(lambda a, b: jc._JointLogSumExp.apply(a, b, 0.3), (q, k))
            p = jc.joint_text_probs(q, k, slice(6, 16), slice(0, 6), [1, 4])
        finally:
            jc.CHUNK_ELEMENTS = old
        ref = torch.softmax(q @ k.transpose(-1, -2) * 4 ** -0.5, -1)[:, :, 6:16][..., [1, 4]]
        torch.testing.assert_close(p, ref.float())


# ------------------------------------------------------------------------------------------------ guidance

def move_term(host, clip, weight=1.0, target=(0.1, 0.5), chain=None, layers="auto", blocks=""):
    with torch.inference_mode():
        return node(host, "UniversalGuidanceSGMove").build(clip, PROMPT, "cat", layers, weight, 0.0, 1.0,
                                                           "to (x, y)", target[0], target[1], guidance=chain,
                                                           blocks=blocks)[0]


def ug_run(host, dit, guidance, seed, steps=3, **knobs):
    """(output latent, the run's report entry) of the Universal Guidance SAMPLER through ComfyUI's sample_custom."""
    import comfy.sample
    fam, model, clip, vae = dit
    bridge = pack_module("nodes.comfy_bridge")
    settings = {**prompts.KNOBS, "strength_mode": "normalized", "forward_strength": 0.5, **knobs}
    options = copy.deepcopy(model.model_options)
    with torch.inference_mode():
        sampler = node(host, "UniversalGuidanceSampler").get_sampler(vae, guidance, **settings)[0]
        sigmas = bridge.sigmas_for(model, "simple", steps, 1.0)
        lat = latent(fam)
        noise = comfy.sample.prepare_noise(lat, seed)
        out = comfy.sample.sample_custom(model, noise, fam.cfg, sampler, sigmas, conditioning(fam, clip, PROMPT),
                                         conditioning(fam, clip, ""), lat, seed=seed)
    assert model.model_options == options, "the run changed the cached model's options"
    assert not model.model.diffusion_model._forward_pre_hooks, "a hook stayed on the cached model"
    return out, sampler.ug_runs.runs[-1]


def trace_of(run_entry, term):
    return [e["terms"][term] for e in run_entry["trace"] if term in e["terms"]]


def test_move_brings_the_centroid_nearer_the_target(host, dit):
    """The word's map centroid (the Move loss, |centroid − target|) ends nearer the target than in the same run
    with the capture on and no effective strength, for seeds 0, 1, 2 on SD3 and seed 0 on Flux (whose 3072-wide
    blocks, fixed by ComfyUI's model detection, make each CPU run about 10× SD3's); nothing is decoded."""
    fam, _, clip, _ = dit
    for seed in (0,) if fam.name == "flux" else (0, 1, 2):
        guided, g_run = ug_run(host, dit, move_term(host, clip), seed)
        plain, p_run = ug_run(host, dit, move_term(host, clip), seed, forward_strength=1e-9)
        g, p = trace_of(g_run, "move:cat"), trace_of(p_run, "move:cat")
        assert g and p and all(v >= 0 for v in g)
        assert g[-1] < p[-1], (seed, g, p)
        assert not torch.equal(guided, plain)
        assert "0 guided decodes" in g_run["lines"][0]


def test_self_guidance_and_image_guidance_in_one_run_both_lower_their_losses(host, dit):
    fam, _, clip, _ = dit
    picture = torch.zeros(1, SIZE, SIZE, 3)
    picture[:, :, : SIZE // 2] = 1.0
    with torch.inference_mode():
        image = node(host, "UniversalGuidanceImage").build(picture, "l2", 1.0, 0.0, 1.0)[0]
    guidance = move_term(host, clip, chain=image)
    _, g_run = ug_run(host, dit, guidance, 0)
    _, p_run = ug_run(host, dit, guidance, 0, forward_strength=1e-9)
    names = [n for n in g_run["trace"][-1]["terms"]]
    image_name = next(n for n in names if not n.startswith("move"))
    for term in ("move:cat", image_name):
        g, p = trace_of(g_run, term), trace_of(p_run, term)
        assert g[-1] < p[-1], (term, g, p)


def test_resize_keep_layout_keep_appearance_and_appearance_transfer_run_chained(host, dit):
    """The other edits on the joint maps and Ψ (the feature block's image tokens) in one sampler: against the
    unguided twin (Resize, Keep Layout, Keep Appearance) and a reference latent (Appearance Transfer)."""
    fam, _, clip, _ = dit
    reference = {"samples": torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))}
    with torch.inference_mode():
        g = node(host, "UniversalGuidanceSGResize").build(clip, PROMPT, "cat", "auto", 0.7, 0.0, 1.0, 1.5)[0]
        g = node(host, "UniversalGuidanceSGKeepLayout").build(clip, PROMPT, "sofa", "auto", 10.0, 0.0, 1.0,
                                                              guidance=g)[0]
        g = node(host, "UniversalGuidanceSGKeepAppearance").build(clip, PROMPT, "cat", "auto", 12.0, 0.0, 1.0,
                                                                  guidance=g)[0]
        g = node(host, "UniversalGuidanceSGAppearanceTransfer").build(clip, PROMPT, "sofa", "auto", 12.0, 0.0, 1.0,
                                                                      reference=reference, guidance=g)[0]
    out, run_entry = ug_run(host, dit, g, 0)
    last = run_entry["trace"][-1]["terms"]
    assert len(last) == 4 and all(v >= 0 and v == v for v in last.values()), last
    assert torch.isfinite(out).all()


def test_named_blocks_and_unknown_blocks(host, dit):
    fam, model, clip, _ = dit
    ac = pack_module("nodes.attention_capture")
    net = model.model.diffusion_model
    if fam.name == "flux":
        assert ac.resolve_layer_rule("double 0, single 0", net) == ["double0", "single0"]
        blocks = "single 0"
    else:
        last = len(net.joint_blocks) - 1
        assert ac.resolve_layer_rule(f"joint 0-{last}", net) == [f"joint{i}" for i in range(last + 1)]
        assert ac.resolve_layer_rule("double 0", net) == ["joint0"]
        blocks = f"joint {last}"
    with pytest.raises(ValueError, match="no block"):
        ac.resolve_layer_rule("single 40", net) if fam.name == "flux" else ac.resolve_layer_rule("joint 99", net)
    with pytest.raises(ValueError, match="decoder"):
        ac.resolve_layer_rule("coarse decoder", net)
    _, run_entry = ug_run(host, dit, move_term(host, clip, blocks=blocks), 0, steps=2)
    assert trace_of(run_entry, "move:cat")
    bad = move_term(host, clip, blocks="double 77")
    with pytest.raises(Exception, match="no block"):
        ug_run(host, dit, bad, 0, steps=2)


def test_attention_map_node_on_joint_models(host, dit):
    fam, model, clip, _ = dit
    with torch.inference_mode():
        picture, heat = node(host, "UniversalGuidanceAttentionMap").render(
            model, clip, PROMPT, "cat", "auto", {"samples": latent(fam)}, 0.5, 0)
    assert heat.shape == (1, SIZE, SIZE) and picture.shape == (1, SIZE, SIZE, 3)
    assert float(heat.max()) == pytest.approx(1.0) and float(heat.min()) == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------- tokens

def _tokenizers(host):
    try:
        import comfy.text_encoders.flux as flux
        import comfy.text_encoders.sd3_clip as sd3
    except ImportError:
        pytest.skip(f"{host_label(host)} has no T5 tokenizer (SD3 / Flux text encoders)")
    return flux.FluxTokenizer(), sd3.SD3Tokenizer()


def test_t5_and_sd3_token_positions_with_comfyui_tokenizers(host):
    tokens = pack_module("nodes.tokens")
    errors = pack_module("nodes.comfy_bridge")
    flux_tok, sd3_tok = _tokenizers(host)
    flux_layout = [(("t5xxl",), "start")]
    sd3_layout = [(("l", "g"), "start"), (("t5xxl",), "after")]

    def t5_pieces(word):
        return flux_tok.t5xxl.tokenizer(word)["input_ids"][:-1]     # without the end token

    prompt = "a photo of a (red:1.2) teapot on a table"
    teapot = t5_pieces("teapot")
    assert len(teapot) >= 2, teapot  # a word of several sentencepiece pieces: every piece is kept
    pos, length = tokens.positions_in(flux_tok.tokenize_with_weights, flux_layout, prompt, "teapot", "N")
    ids = [t for t, *_ in flux_tok.tokenize_with_weights(prompt)["t5xxl"][0]]
    assert [ids[p] for p in pos] == teapot and length == len(ids) >= 256
    same, _ = tokens.positions_in(flux_tok.tokenize_with_weights, flux_layout, prompt.replace("(red:1.2)", "red"),
                                  "teapot", "N")
    assert same == pos  # prompt weights change nothing
    red, _ = tokens.positions_in(flux_tok.tokenize_with_weights, flux_layout, prompt, "red", "N")
    assert [ids[p] for p in red] == t5_pieces("red")
    # SD3: CLIP-L/G (77) then T5, T5 positions after the CLIP part
    pos3, length3 = tokens.positions_in(sd3_tok.tokenize_with_weights, sd3_layout, prompt, "teapot", "N")
    clip_part = [p for p in pos3 if p < 77]
    t5_part = [p - 77 for p in pos3 if p >= 77]
    clip_ids = [t for t, *_ in sd3_tok.tokenize_with_weights(prompt)["l"][0]]
    assert clip_part and [clip_ids[p] for p in clip_part] == sd3_tok.clip_l.tokenizer("teapot")["input_ids"][1:-1]
    assert t5_part == pos and length3 == 77 + 77
    # a long prompt: the word after the 77th CLIP token is found in the second CLIP chunk and in T5
    long_prompt = " ".join(["green"] * 90) + " teapot"
    posl, lengthl = tokens.positions_in(sd3_tok.tokenize_with_weights, sd3_layout, long_prompt, "teapot", "N")
    assert lengthl > 2 * 77 and any(77 < p < 154 for p in posl) and any(p >= 154 for p in posl)
    posf, _ = tokens.positions_in(flux_tok.tokenize_with_weights, flux_layout, long_prompt, "teapot", "N")
    long_ids = [t for t, *_ in flux_tok.tokenize_with_weights(long_prompt)["t5xxl"][0]]
    assert posf == [90, 91] and [long_ids[p] for p in posf] == teapot  # 90 × 'green' is 90 T5 pieces here
    with pytest.raises(errors.GuidanceInputError, match="'dog' is not in the prompt.*'teapot'"):
        tokens.positions_in(flux_tok.tokenize_with_weights, flux_layout, prompt, "dog", "N")


def test_prompt_node_and_clip_layout_of_the_loaded_sd3_text_encoder(host, dit):
    """The loaded text encoders tell the layout: the tiny models' CLIP-only SD3 encoder attends to CLIP tokens;
    UG Prompt's conditioning drives a Move term on SD3 / Flux."""
    fam, model, clip, _ = dit
    tokens = pack_module("nodes.tokens")
    assert tokens.attended_layout(clip)[0][0][0] == "l"
    with torch.inference_mode():
        cond = node(host, "UniversalGuidancePrompt").encode(clip, PROMPT)[0]
        term = node(host, "UniversalGuidanceSGMove").build(None, "", "cat", "auto", 1.0, 0.0, 1.0, "to (x, y)",
                                                           0.1, 0.5, conditioning=cond)[0]
    _, run_entry = ug_run(host, dit, term, 0, steps=2)
    assert trace_of(run_entry, "move:cat")


# ---------------------------------------------------------------------------------------- older hosts

def _flux_stand_in():
    """A network whose class is named as ComfyUI's Flux (``comfy.ldm.flux.model.Flux``), with Flux's block lists:
    what a Flux model object looks like to the pack, on a host that cannot load one."""
    def init(self):
        torch.nn.Module.__init__(self)
        self.double_blocks = torch.nn.ModuleList([torch.nn.Identity()])
        self.single_blocks = torch.nn.ModuleList([torch.nn.Identity()])
    return type("Flux", (torch.nn.Module,), {"__module__": "comfy.ldm.flux.model", "__init__": init})()


class _Base:
    def __init__(self, net):
        self.diffusion_model = net


def test_joint_models_need_the_attention_override_of_current_hosts(host):
    """SD3 / Flux self-guidance needs ComfyUI's attention override (v0.3.60+): an older host gets an error saying
    so; every other non-UNet model is told which families self-guidance reads."""
    ac = pack_module("nodes.attention_capture")
    jc = pack_module("nodes.joint_capture")
    base = _Base(_flux_stand_in())
    assert jc.kind_of(base.diffusion_model) == "flux"
    if jc.host_supports_joint_capture():
        assert ac.capture_network(base) is base.diffusion_model
    else:
        assert ac.capture_network(base) is None
        message = ac.unsupported_message(base)
        assert "v0.3.60" in message and "SD3 and Flux" in message and "update ComfyUI" in message, message
    other = _Base(torch.nn.Linear(2, 2))
    assert ac.capture_network(other) is None
    message = ac.unsupported_message(other)
    assert "SD1.x, SD2.x, SDXL" in message and "SD3 / Flux" in message and "Linear" in message, message
