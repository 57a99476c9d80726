"""The transformer shapes model (``benchmarks.shapes.mmdit``: joint attention, rectified flow) and its adapter:
the shipped weights load, the capture's text→image map is the softmax over the joint keys sliced to the text keys,
the flow denoiser's x̂0 is exact for the true velocity, and Move through the engine lands nearer its target than
the unguided twin (engine-only, no ComfyUI)."""
import pytest
import torch

import guidance as ug
from benchmarks.shapes import adapter, data, mmdit, models
from benchmarks.shapes import selfguidance as bench
from guidance import selfguidance as sg


@pytest.fixture(scope="module")
def shipped():
    return mmdit.load(), models.load_classifier()


def _block_inputs(net, x, t, tokens):
    """The inputs of every attention block during one forward pass (forward pre-hooks)."""
    seen, hooks = {}, []
    for name, blk in net.blocks().items():
        hooks.append(blk.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args)))
    try:
        with torch.no_grad():
            net(x, t, tokens)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_shipped_mmdit_loads_and_its_maps_are_the_joint_softmax_sliced_to_text_keys(shipped):
    net, _ = shipped
    assert net.LAYERS == mmdit.LAYERS and net.grid == 8 and net.hourglass is not None and net.prediction == "flow"
    assert 2_000_000 < models.parameter_count(net) < 3_200_000
    scenes = data.sample_scenes(3, 5)
    tokens = data.tokens([data.caption(s) for s in scenes])
    torch.manual_seed(0)
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([0.9, 0.6, 0.3])
    with torch.no_grad():
        plain = net(x, t, tokens)
        with net.capture(None, features=True) as rec:
            captured = net(x, t, tokens)
    assert torch.equal(plain, captured)                  # the maps are computed beside the attention
    assert list(rec.maps) == list(mmdit.LAYERS) and rec.feats.shape == (3, 128, 8, 8)
    inputs = _block_inputs(net, x, t, tokens)
    n_txt = data.MAX_TOKENS
    for name, blk in net.blocks().items():
        with torch.no_grad():
            if name.startswith("double"):
                txt, img, vec, _ = inputs[name]
                tq, tk, _, _ = blk.txt.pre(txt, vec)
                iq, ik, _, _ = blk.img.pre(img, vec)
                q, k = torch.cat([tq, iq], 2), torch.cat([tk, ik], 2)     # text first
            else:
                h, vec, _, _ = inputs[name]
                shift, scale, _ = blk.mod(torch.nn.functional.silu(vec)).chunk(3, dim=-1)
                qkv = blk.linear1(mmdit._modulate(blk.norm(h), shift, scale))[..., : 3 * blk.dim]
                q, k, _ = (mmdit._heads(c, blk.heads) for c in qkv.chunk(3, dim=-1))
                q, k = blk.q_norm(q), blk.k_norm(k)
        assert q.shape[2] == n_txt + 64
        probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        hand = probs[:, :, n_txt:, :n_txt].mean(dim=1).reshape(3, 8, 8, n_txt)
        got = rec.maps[name]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), hand, atol=2e-6, rtol=0)
        # the image keys take the rest of each row: the text slice alone does not sum to 1
        assert float(got.sum(-1).max()) < 0.999


def test_flow_denoiser_turns_the_true_velocity_into_x0_and_captures_the_cond_rows(shipped):
    net, _ = shipped
    tokens = data.tokens(["red circle", "blue square left of green triangle"])
    clean, noise = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 3, 32, 32)
    sigma = torch.tensor([0.8, 0.25])
    s = sigma.view(-1, 1, 1, 1)
    x = (1 - s) * clean + s * noise

    class TrueVelocity(torch.nn.Module):
        prediction, LAYERS = "flow", mmdit.LAYERS

        def forward(self, z, t, tok):
            return (noise - clean).repeat(z.shape[0] // 2, 1, 1, 1)

    exact = adapter.make_denoiser(TrueVelocity(), tokens, data.tokens([""]), 3.0)
    torch.testing.assert_close(exact(x, sigma), clean, atol=1e-5, rtol=0)
    assert adapter.parameterization_of(net) is ug.FLOW and adapter.parameterization_of(TrueVelocity()) is ug.FLOW
    sig = adapter.schedule_of(net).ddim_sigmas(10)
    assert float(sig[0]) == 1.0 and float(sig[-1]) == 0.0 and bool((sig[1:] < sig[:-1]).all())

    denoise = adapter.make_denoiser(net, tokens, data.tokens([""]), 3.0)
    cond_only = adapter.make_denoiser(net, tokens, data.tokens([""]), 1.0)
    with torch.no_grad():
        plain = denoise(x, sigma)
        x0, internals = denoise(x, sigma, capture=sg.CaptureRequest(["double1"], True))
        _, cond = cond_only(x, sigma, capture=sg.CaptureRequest(["double1"], False))
    assert torch.equal(plain, x0) and set(internals.maps) == {"double1"} and cond.feats is None
    torch.testing.assert_close(internals.maps["double1"], cond.maps["double1"], atol=1e-6, rtol=0)


def test_move_on_the_mmdit_gets_nearer_the_target_than_the_twin_without_a_decoder(shipped):
    """Four one-object scenes, 12 Euler flow steps: Move (layers auto, the engine's defaults) lands nearer its
    target than the unguided twin from the same noise, and never calls the decoder."""
    net, classifier = shipped
    scenes = [s for s in data.sample_scenes(40, bench.SCENE_SEED) if len(s) == 1][:4]
    steps, cfg, seed = 12, 3.0, 0
    noise = adapter.initial_noise(len(scenes), seed, float(adapter.schedule_of(net).ddim_sigmas(steps)[0]))
    twin_images = bench.sample_rows(net, [data.caption(s) for s in scenes], noise, seed, steps, cfg)
    twin = bench.analyse(classifier, twin_images)
    ctx = {"targets": bench.choose_targets(scenes, twin), "oracle": {}}
    edit = bench.Edit("move", "move", 0.1)
    images, stats = bench.run_edit(net, edit, scenes, noise, seed, ctx, steps, cfg, 0.6)
    assert stats["decoder_calls"] == 0 and stats["denoiser_grad_calls"] > 0
    rows = bench.measure(edit, scenes, twin_images, images, twin, bench.analyse(classifier, images), ctx, seed)
    summary = bench.summarise(rows, edit)
    assert summary["error_reduction"] > 2.0, summary   # the shipped MMDiT: 5.1
    assert summary["colour_kept"] >= 3 / 4, summary


def test_word_sensitivity_tells_a_model_that_draws_its_shape_words_from_one_that_does_not(shipped):
    """``word_sensitivity``: on 4 one-object scenes at flow time 0.7, swapping the shape word moves the shipped
    UNet's and the shipped MMDiT's x̂0 by more than 1e-3 (both draw the caption's shape); a copy of the MMDiT whose
    three shape words share one embedding (it cannot tell them apart) scores below 1e-9; the colour word moves all
    three by more than 1e-3."""
    import copy

    from benchmarks.shapes import word_sensitivity as ws

    net, _ = shipped
    scenes = [s for s in data.sample_scenes(20, bench.SCENE_SEED) if len(s) == 1][:4]
    unet = ws.sensitivity(models.load_unet(), scenes, times=(0.7,))["0.7"]
    flow = ws.sensitivity(net, scenes, times=(0.7,))["0.7"]
    blind = copy.deepcopy(net)
    ids = [data.WORD_ID[w] for w in data.SHAPES]
    blind.text.word.weight[ids] = blind.text.word.weight[ids].mean(dim=0)
    blind_row = ws.sensitivity(blind, scenes, times=(0.7,))["0.7"]
    assert unet["shape"] > 1e-3 and unet["colour"] > 1e-3, unet
    assert flow["shape"] > 1e-3 and flow["colour"] > 1e-3, flow
    assert blind_row["shape"] < 1e-9 < 1e-3 < blind_row["colour"], blind_row
    obj = scenes[0][0]
    swapped = ws._swapped(scenes[0], "shape")
    assert sorted(c.split()[1] for c in swapped) == sorted(set(data.SHAPES) - {obj.shape}), swapped
    assert all(c.split()[0] == obj.colour for c in swapped), swapped
