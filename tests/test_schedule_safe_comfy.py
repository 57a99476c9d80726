"""In a real ComfyUI (tiny random SD1.5): the schedule-safe bound of a guided update on a 10-step run and on a
zero-terminal-SNR run (ComfyUI's ModelSamplingDiscrete ``zsnr``), measured from the outside; and Ψ (the appearance
features) taken from the conditional UNet call when cond and uncond run as separate calls (``cfg_branch = cond``).

The sampler is called as the executor calls it (inference mode, ComfyUI's ``sample_custom``); the engine's entry
point in the bridge is wrapped to watch each step: the next sample from the guided x̂0 against the next sample from
the plain denoiser at the same x (one extra no-grad model call per step, made here)."""
from __future__ import annotations

import torch

from headless.host import pack_module
from sd15_nodes import PROMPT, SIZE, node, sample, sd  # noqa: F401 - sd is a fixture


def move_term(host, clip, start=0.0, end=1.0):
    with torch.inference_mode():
        return node(host, "UniversalGuidanceSGMove").build(clip, PROMPT, "cat", "all", 1.0, start, end,
                                                           "to (x, y)", 0.15, 0.5)[0]


def keep_appearance_term(host, clip):
    with torch.inference_mode():
        return node(host, "UniversalGuidanceSGKeepAppearance").build(clip, PROMPT, "cat", "all", 1.0, 0.0, 1.0)[0]


def run(host, model, sd, guidance, *, steps, seed=0, cfg=3.0, **knobs):
    return sample(host, model, sd, guidance, seed=seed, steps=steps, cfg=cfg, **knobs)


def watch_steps(monkeypatch):
    """Per step of the next guided run: (σ_i, σ_{i+1}, RMS Δx_{i+1}, RMS Δx̂0), the guided update's effect."""
    bridge = pack_module("nodes.comfy_bridge")
    original = bridge.sample_universal
    rows = []

    def spy(denoise, x, sigmas, **kwargs):
        param, on_step = kwargs["parameterization"], kwargs["callback"]

        def callback(info):
            i = info["i"]
            sig, nxt = float(sigmas[i]), float(sigmas[i + 1])
            with torch.no_grad():
                plain = denoise(info["x"], sigmas[i] * info["x"].new_ones([info["x"].shape[0]]))
            dx = param.step(info["x"], info["denoised"], sig, nxt) - param.step(info["x"], plain, sig, nxt)
            rms = lambda t: float(t.float().flatten(1).pow(2).mean(1).sqrt().max())  # noqa: E731
            rows.append((sig, nxt, rms(dx), rms(info["denoised"] - plain)))
            on_step(info)

        return original(denoise, x, sigmas, **{**kwargs, "callback": callback})

    monkeypatch.setattr(bridge, "sample_universal", spy)
    return rows


def zsnr_model(model):
    import comfy_extras.nodes_model_advanced as advanced
    with torch.inference_mode():
        return advanced.ModelSamplingDiscrete().patch(model, "eps", True)[0]


def check_bound(rows, entry, kappa=0.2, delta=20.0):
    relative = [dx / nxt for _, nxt, dx, _ in rows if nxt > 0]
    assert max(relative) <= kappa * (1 + 1e-3), [round(r, 3) for r in relative]
    assert max(d0 for *_, d0 in rows) <= delta * (1 + 1e-3)
    line = next((ln for ln in entry["lines"] if ln.startswith("step bound")), None)
    assert line is not None and "acted on" in line, entry["lines"]
    return relative, line


def test_ten_steps_the_next_sample_moves_at_most_kappa_of_its_noise_level(host, sd, monkeypatch):
    """10 steps of SD's normal schedule, normalized s = 0.3, guided on the second half (where the steps' σ ratios
    are largest; CI time): without the bound the update moves the next sample by 0.3·(σ_i/σ_{i+1} − 1) of its
    noise level, about 0.7 at the step to the last σ."""
    model, clip, _ = sd
    rows = watch_steps(monkeypatch)
    _, entry = run(host, model, sd, move_term(host, clip, start=0.5), steps=10)
    assert len(rows) == 10 and rows[-1][1] == 0.0
    _, line = check_bound(rows, entry)
    assert "max shrink ×" in line  # it acted here
    assert sum(dx > 0 for _, nxt, dx, _ in rows if nxt > 0) == 4  # the guided steps with a next noise level


def test_zsnr_first_step_is_bounded(host, sd, monkeypatch):
    """ComfyUI's zero-terminal-SNR sampling (ModelSamplingDiscrete, zsnr on): the first σ is about 4096, so a
    strength sized against it moves x_1 by hundreds of its noise level; bounded to κ."""
    model, clip, _ = sd
    z = zsnr_model(model)
    rows = watch_steps(monkeypatch)
    out, entry = run(host, z, sd, move_term(host, clip, end=0.3), steps=4)
    assert rows[0][0] > 1000.0, rows[0]  # the zsnr schedule is in use
    relative, _ = check_bound(rows, entry)
    assert relative[0] > 0.05  # the first step was guided, not skipped
    assert bool(torch.isfinite(out).all())


# -------------------------------------------------------------------------------------------- Ψ: cond branch

def test_appearance_features_come_from_the_cond_call(host, sd, monkeypatch):
    """cfg_branch = cond runs the cond rows (with autograd) and the uncond rows in two UNet calls. Ψ must be the
    cond call's decoder features: watched here with hooks of the test's own on the same block."""
    model, clip, _ = sd
    ac = pack_module("nodes.attention_capture")
    unet = model.model.diffusion_model
    seen, calls = {}, []

    def pre(module, args, kwargs):
        seen["chunks"] = list((kwargs.get("transformer_options") or {}).get("cond_or_uncond") or [0])

    def post(module, inputs, output):
        seen["outputs"].append((seen["chunks"], output.detach().float().clone()))

    original = ac.captured_call

    def spy(*args, **kwargs):
        seen["outputs"] = []
        x0, internals = original(*args, **kwargs)
        calls.append((seen["outputs"], internals.feats))
        return x0, internals

    handles = [unet.register_forward_pre_hook(pre, with_kwargs=True),
               unet.output_blocks[-2][-1].register_forward_hook(post)]
    monkeypatch.setattr(ac, "captured_call", spy)
    try:
        run(host, model, sd, keep_appearance_term(host, clip), steps=3, cfg_branch="cond")
    finally:
        for h in handles:
            h.remove()
    split = [(outs, feats) for outs, feats in calls if len(outs) == 2]
    assert split, "no guided call ran cond and uncond separately"
    for outs, feats in split:
        cond = [o for chunks, o in outs if chunks == [0]]
        uncond = [o for chunks, o in outs if chunks == [1]]
        assert len(cond) == 1 and len(uncond) == 1, [c for c, _ in outs]
        assert not torch.allclose(cond[0], uncond[0])  # the two calls' features differ: the check can tell
        torch.testing.assert_close(feats.detach().float(), cond[0], rtol=0, atol=0)
