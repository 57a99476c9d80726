"""Self-guidance in the engine: property functions on synthetic maps, the losses, and internal terms in the sampler
(capture in the same denoiser call, no decode, references), on a tiny denoiser whose "attention" depends on x."""
from __future__ import annotations

import math

import pytest
import torch

from guidance import VE, Guidance, GuidanceTerm, ImageLoss, Settings, Stats, sample_universal
from guidance import selfguidance as sg


def blob(h, w, cx, cy, r, batch=1):
    """``[B, H, W, 1]`` Gaussian blob centred at (cx, cy) ∈ [0, 1]² with radius r (fraction of the side)."""
    ys = (torch.arange(h) + 0.5) / h
    xs = (torch.arange(w) + 0.5) / w
    g = torch.exp(-(((xs[None] - cx) ** 2 + (ys[:, None] - cy) ** 2) / (2 * r * r)))
    return g[None, :, :, None].repeat(batch, 1, 1, 1)


def disk(h, w, cx, cy, r):
    ys = (torch.arange(h) + 0.5) / h
    xs = (torch.arange(w) + 0.5) / w
    return (((xs[None] - cx) ** 2 + (ys[:, None] - cy) ** 2) <= r * r).float()[None, :, :, None]


# ------------------------------------------------------------------------------------------------- properties

@pytest.mark.parametrize("cx,cy", [(0.5, 0.5), (0.25, 0.7), (0.8, 0.2)])
def test_centroid_of_a_blob_is_its_centre(cx, cy):
    c = sg.centroid(blob(64, 64, cx, cy, 0.06))
    torch.testing.assert_close(c[0, 0], torch.tensor([cx, cy]), atol=2e-3, rtol=0)


def test_normalised_centroid_ignores_the_softmax_floor_the_raw_one_does_not():
    a = blob(32, 32, 0.2, 0.5, 0.05) + 0.2  # a floor everywhere, as a softmax over few tokens leaves
    raw, norm = sg.centroid(a, normalized=False)[0, 0], sg.centroid(a)[0, 0]
    assert abs(float(norm[0]) - 0.2) < 0.01 and float(raw[0]) > 0.35  # the raw one is pulled to the centre


def test_size_of_a_disk_is_its_area_fraction():
    for r in (0.15, 0.3):
        s = float(sg.size(disk(64, 64, 0.5, 0.5, r))[0, 0])
        assert abs(s - math.pi * r * r) < 0.02, (r, s)


def test_losses_are_zero_only_for_equal_maps():
    a = blob(16, 16, 0.3, 0.4, 0.1, batch=2)
    b = blob(16, 16, 0.6, 0.4, 0.1, batch=2)
    same = sg.Internals({"l": a}, torch.randn(2, 5, 8, 8))
    other = sg.Internals({"l": b}, torch.randn(2, 5, 8, 8))
    for loss in (sg.KeepShapeLoss([0]), sg.AppearanceLoss([0])):
        assert torch.equal(loss(same, same), torch.zeros(2))
        assert bool((loss(same, other) > 0).all())
    move = sg.MoveLoss([0], target=(0.3, 0.4))
    assert float(move(same).max()) < 2e-3 and float(move(other).min()) > 0.1
    by = sg.MoveLoss([0], shift=(0.3, 0.0), reference="original")
    assert float(by(other, same).max()) < 2e-3  # b is a moved by +0.3 in x
    grow = sg.ResizeLoss([0], factor=2.0)
    assert float(grow(same, same).min()) > 0 and float(sg.ResizeLoss([0], factor=1.0)(same, same).max()) == 0
    for loss in (move, by, grow):
        v = loss(other, same)
        assert v.shape == (2,) and v.dtype == torch.float32 and bool((v >= 0).all())


def test_losses_average_over_tokens_and_layers():
    a, b = blob(16, 16, 0.3, 0.3, 0.1), blob(16, 16, 0.7, 0.7, 0.1)
    internals = sg.Internals({"x": torch.cat([a, b], -1), "y": torch.cat([a, a], -1)})
    target = (0.3, 0.3)
    both = sg.MoveLoss([0, 1], target=target)(internals)
    per = [sg.MoveLoss([t], layers=[layer], target=target)(internals) for layer in ("x", "y") for t in (0, 1)]
    torch.testing.assert_close(both, torch.stack(per).mean(0))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="exactly one"):
        sg.MoveLoss([1], target=(0.1, 0.1), shift=(0.1, 0))
    with pytest.raises(ValueError, match="relative to a reference"):
        sg.MoveLoss([1], shift=(0.1, 0))
    with pytest.raises(ValueError, match="needs a reference"):
        sg.KeepShapeLoss([1], reference="absolute")
    with pytest.raises(ValueError, match="no token"):
        sg.MoveLoss([], target=(0, 0))
    internals = sg.Internals({"l": blob(8, 8, 0.5, 0.5, 0.1)})
    with pytest.raises(ValueError, match="no attention maps captured for the layers"):
        sg.MoveLoss([0], layers=["nope"], target=(0, 0))(internals)
    with pytest.raises(ValueError, match="outside the context"):
        sg.MoveLoss([3], target=(0, 0))(internals)


# ---------------------------------------------------------------------------------------- in the sampler

class AttentionDenoiser:
    """x: [B, 1, H, W]. D(x, σ) = x / (1 + σ²) (a N(0, 1) prior), and an "attention" softmax over 3 tokens whose
    logits are affine in x per pixel (token 1 follows bright pixels, token 2 dark ones). Records each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, capture=None):
        self.calls.append({"grad": torch.is_grad_enabled() and x.requires_grad, "capture": capture})
        s = sigma.view(-1, 1, 1, 1)
        x0 = x / (1 + s * s)
        if capture is None:
            return x0
        z = x[:, 0]
        logits = torch.stack([torch.zeros_like(z), 3 * z, -3 * z], dim=-1)
        maps = {"a": torch.softmax(logits, -1)}
        maps["b"] = maps["a"]
        feats = torch.cat([x, x * x], dim=1) if capture.features else None
        return x0, sg.Internals(maps, feats)


def sigmas(n=8, smax=5.0, smin=0.05):
    return torch.tensor([smax * (smin / smax) ** (i / (n - 1)) for i in range(n)] + [0.0])


def run(guidance, settings, seed=0, den=None, decode=None, stats=None):
    den = den or AttentionDenoiser()
    sig = sigmas()
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * float(sig[0])
    decode = decode or (lambda z: z.repeat(1, 3, 1, 1))
    out = sample_universal(den, x, sig, guidance=guidance, decode=decode, settings=settings, parameterization=VE,
                           generator=torch.Generator().manual_seed(1), stats=stats)
    return out, den


def term(loss, weight=1.0, start=0.0, end=1.0):
    return Guidance().add(GuidanceTerm("sg", loss, weight, start, end))


def final_centroid(out, token=1):
    logits = torch.stack([torch.zeros_like(out[:, 0]), 3 * out[:, 0], -3 * out[:, 0]], -1)
    return sg.centroid(torch.softmax(logits, -1)[..., token:token + 1])[:, 0]


def test_pure_internal_guidance_runs_no_decoder_and_moves_the_centroid():
    decodes = []

    def decode(z):
        decodes.append(1)
        return z.repeat(1, 3, 1, 1)

    target = torch.tensor([0.15, 0.5])
    stats = Stats()
    guided, den = run(term(sg.MoveLoss([1], target=(0.15, 0.5)), 1.0),
                      Settings(forward_strength=3.0, strength_mode="normalized", step_bound=0.0, x0_bound=0.0),
                      decode=decode, stats=stats)  # (the toy's steps are far past the schedule-safe bound)
    plain, _ = run(None, Settings(forward_strength=0.0))
    assert decodes == [] and stats.decoder_calls == 0
    # one denoiser call per iteration, with a capture request on every guided call, under autograd
    assert len(den.calls) == 8 and all(c["capture"] is not None and c["grad"] for c in den.calls)
    assert stats.denoiser_grad_calls == 8
    err_g = (final_centroid(guided) - target).norm(dim=1)
    err_u = (final_centroid(plain) - target).norm(dim=1)
    assert bool((err_g < 0.6 * err_u).all()), (err_g, err_u)
    assert [e["phase"] for e in stats.trace] == ["forward"] * 8
    assert all(set(e["terms"]) == {"sg"} for e in stats.trace)


def test_weight_zero_internal_term_changes_nothing_and_captures_nothing():
    plain, _ = run(None, Settings(forward_strength=0.0))
    out, den = run(term(sg.MoveLoss([1], target=(0.1, 0.1)), 0.0), Settings(forward_strength=1.0))
    assert torch.equal(out, plain)
    assert all(c["capture"] is None and not c["grad"] for c in den.calls)


def test_internal_terms_need_the_jacobian():
    with pytest.raises(ValueError, match="turn 'jacobian' on"):
        run(term(sg.MoveLoss([1], target=(0.1, 0.1))), Settings(jacobian=False))


def test_backward_guidance_skips_internal_terms_and_image_terms_still_decode():
    ref = torch.zeros(1, 3, 16, 16)
    g = term(sg.MoveLoss([1], target=(0.15, 0.5)), 1.0).add(GuidanceTerm("image", ImageLoss(ref), 1.0))
    stats = Stats()
    run(g, Settings(forward_strength=0.5, strength_mode="normalized", backward_steps=2), stats=stats)
    forward = [e for e in stats.trace if e["phase"] == "forward"]
    backward = [e for e in stats.trace if e["phase"] == "backward"]
    assert all(set(e["terms"]) == {"sg", "image"} for e in forward)
    assert backward and all(set(e["terms"]) == {"image"} for e in backward)
    assert stats.decoder_calls == len(forward) + len(backward)


def test_original_reference_is_the_unguided_twin():
    """Keep-shape against the original with weight 0 on a chained term: the twin is stepped every step; its final
    latent is the unguided result from the same noise (checked through a term that records it)."""
    seen = []

    class Spy(sg.KeepShapeLoss):
        def __call__(self, internals, reference=None):
            seen.append(reference.maps["a"].clone())
            return super().__call__(internals, reference)

    stats = Stats()
    out, den = run(term(Spy([1]), 1e-9), Settings(forward_strength=1e-9), stats=stats)
    plain, pden = run(None, Settings(forward_strength=0.0))
    # the twin's captures equal the plain run's attention at every step
    sig = sigmas()
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * float(sig[0])
    for i in range(len(sig) - 1):
        z = x[:, 0]
        expected = torch.softmax(torch.stack([torch.zeros_like(z), 3 * z, -3 * z], -1), -1)
        torch.testing.assert_close(seen[i], expected)
        x0 = x / (1 + sig[i] ** 2)
        x = VE.step(x, x0, float(sig[i]), float(sig[i + 1]))
    assert stats.reference_calls == len(sig) - 1  # one no-grad pass per step (the last step reuses nothing)


def test_reference_latent_is_noised_to_each_sigma():
    seen = []

    class Spy(sg.AppearanceLoss):
        def __call__(self, internals, reference=None):
            seen.append(reference.feats[:, :1].clone())
            return super().__call__(internals, reference)

    z_ref = torch.full((1, 1, 16, 16), 2.0)
    run(term(Spy([1], reference=z_ref), 1.0, 0.0, 0.5), Settings(forward_strength=0.1))
    assert len(seen) == 4  # guided steps 0..3 of 8
    sig = sigmas()
    for i, feats in enumerate(seen):
        noise = (feats - 2.0) / float(sig[i])
        if i:  # one fixed noise for every step
            torch.testing.assert_close(noise, first, atol=1e-4, rtol=0)
        first = noise if not i else first
        assert feats.shape[0] == 3


def test_reference_passes_cover_the_steps_that_need_them():
    """The cost of references as the sampler states it: a reference latent is one no-grad pass per guided step that
    needs it; the twin ("original") one per step from the first step to the last that needs it, so the unguided
    steps before a late window pay a second denoiser call each."""
    z_ref = torch.full((1, 1, 16, 16), 2.0)
    for reference, window, passes in (("original", (0.5, 1.0), 8), ("original", (0.0, 0.5), 4),
                                      (z_ref, (0.5, 1.0), 4)):
        stats = Stats()
        run(term(sg.KeepShapeLoss([1], reference=reference), 1.0, *window), Settings(forward_strength=0.1),
            stats=stats)
        assert stats.reference_calls == passes, (reference, window)
        assert stats.denoiser_calls == 8 + passes  # one call per step (k = 1) plus the reference passes


def test_auto_layers_count_the_most_compact_map_per_token():
    """Layer x: token 0 compact (a blob), token 1 diffuse; layer y the reverse. "auto" uses, per token, the layer
    where its map is compact: the loss equals the mean of the two compact maps' losses."""
    blob0, blob1 = blob(16, 16, 0.3, 0.3, 0.06), blob(16, 16, 0.7, 0.6, 0.06)
    wide = blob(16, 16, 0.5, 0.5, 0.6)
    internals = sg.Internals({"x": torch.cat([blob0, wide], -1), "y": torch.cat([wide, blob1], -1)})
    w = sg.compact_layers(internals.token_maps([0, 1]))
    assert w[:, 0].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    target = (0.2, 0.2)
    auto = sg.MoveLoss([0, 1], layers="auto", target=target)(internals)
    only = (sg.MoveLoss([0], layers=["x"], target=target)(internals) +
            sg.MoveLoss([1], layers=["y"], target=target)(internals)) / 2
    torch.testing.assert_close(auto, only)
    assert not torch.allclose(sg.MoveLoss([0, 1], target=target)(internals), only)
    assert sg.MoveLoss([0], layers="auto", target=target).request.layers is None  # every layer is captured


# ------------------------------------------------------------------------------------ resize and appearance

def test_scaled_shape_scales_the_area_about_the_centroid():
    a = disk(32, 32, 0.35, 0.6, 0.12) * 0.6 + 0.2
    for factor in (2.0, 0.5):
        s0, s = sg.shape(a), sg.scaled_shape(a, factor)
        assert float(s.mean() / s0.mean()) == pytest.approx(factor, rel=0.12)
        torch.testing.assert_close(sg.centroid(s, False), sg.centroid(s0, False), atol=0.01, rtol=0)


def test_resize_prefers_one_larger_object_to_a_second_copy():
    """The reference has one blob. Twice its area as one larger blob in place, or as the same blob plus a second
    copy elsewhere, both double the soft size; the resize loss must rate the larger blob far better (a soft size
    alone rates them alike, and is what drew second copies)."""
    ref = sg.Internals({"l": disk(32, 32, 0.35, 0.4, 0.12)})
    larger = sg.Internals({"l": disk(32, 32, 0.35, 0.4, 0.12 * math.sqrt(2))})
    copies = sg.Internals({"l": torch.maximum(disk(32, 32, 0.35, 0.4, 0.12), disk(32, 32, 0.75, 0.7, 0.12))})
    for edited in (larger, copies):   # both double the soft size
        assert float(sg.size(edited.maps["l"]) / sg.size(ref.maps["l"])) == pytest.approx(2.0, rel=0.1)
    loss = sg.ResizeLoss([0], factor=2.0)
    assert float(loss(copies, ref)) > 3 * float(loss(larger, ref))
    size_only = sg.ResizeLoss([0], factor=2.0, shape_weight=0.0)
    assert float(size_only(copies, ref)) < 0.02   # the paper's size term cannot tell them apart


def test_resize_and_keep_shape_choose_auto_layers_on_the_reference():
    """Layer x tracks the object in the reference (compact there) but the edited map has spread on it; layer y is
    the reverse. With "auto" the edit is measured on the layer chosen on the reference's maps (x), not on whichever
    layer the edit made compact."""
    obj, wide = disk(16, 16, 0.4, 0.4, 0.15), blob(16, 16, 0.5, 0.5, 0.6)
    ref = sg.Internals({"x": obj, "y": wide})
    edited = sg.Internals({"x": wide, "y": disk(16, 16, 0.4, 0.4, 0.2)})
    for loss in (sg.ResizeLoss([0], layers="auto", factor=1.5), sg.KeepShapeLoss([0], layers="auto")):
        only_x = loss.bound(layers=["x"])(edited, ref)
        torch.testing.assert_close(loss(edited, ref), only_x)
        assert not torch.allclose(loss.bound(layers=["y"])(edited, ref), only_x)


def test_appearance_transfer_reads_the_reference_under_its_own_mask():
    """Reference latent: its object is tracked by layer x; on layer y the word's map sits on the background. The
    edited object already has the reference's appearance (features 1 on the object, 0 elsewhere, on both layers'
    masks), so the transfer loss is zero: the reference is read under its own most compact map. Comparing layer
    by layer would read the reference's background on y and pull the object towards it."""
    obj = disk(16, 16, 0.3, 0.3, 0.15)
    ref_feats = obj.permute(0, 3, 1, 2).repeat(1, 4, 1, 1)             # [1, 4, 16, 16]: 1 on the object
    ref = sg.Internals({"x": obj * 0.8 + 0.1, "y": (1 - obj) * 0.5 + 0.2}, ref_feats)
    here = disk(16, 16, 0.7, 0.6, 0.15)
    edited = sg.Internals({"x": here * 0.8 + 0.1, "y": here * 0.8 + 0.1}, here.permute(0, 3, 1, 2).repeat(1, 4, 1, 1))
    latent = torch.zeros(1, 4, 16, 16)
    transfer = sg.AppearanceLoss([0], layers="auto", reference=latent)
    assert float(transfer(edited, ref)) < 1e-6
    assert float(sg.AppearanceLoss([0], layers="auto", reference=sg.ORIGINAL)(edited, ref)) > 0.4   # layer by layer
    with pytest.raises(ValueError, match="mask_threshold"):
        sg.AppearanceLoss([0], reference=latent, mask_threshold=1.0)
