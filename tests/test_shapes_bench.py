"""The shapes self-guidance benchmark's parts: the detector and classifier it measures with, the adapter's capture,
and a small Move run of the shipped model through the engine (no ComfyUI here: the benchmark is engine-only)."""
import math

import pytest
import torch

from benchmarks.shapes import adapter, data, metrics, models
from benchmarks.shapes import selfguidance as bench
from guidance import selfguidance as sg


@pytest.fixture(scope="module")
def shipped():
    torch.manual_seed(0)
    return models.load_unet(), models.load_classifier()


def test_detector_and_classifier_read_rendered_scenes(shipped):
    _, classifier = shipped
    scenes = data.sample_scenes(24, 7)
    found = bench.analyse(classifier, data.render(scenes))
    for scene, det in zip(scenes, found):
        for obj, truth in zip(scene, data.truth(scene)):
            d = det[obj.colour]
            assert d["present"] and d["blobs"] == 1
            assert math.dist(d["centroid"], truth["centroid"]) < 0.02
            assert d["area"] == pytest.approx(truth["area"], rel=0.2)
            assert d["shape"] == obj.shape
        absent = set(data.COLOURS) - {o.colour for o in scene}
        assert all(not det[c]["present"] for c in absent)


def test_adapter_capture_leaves_x0_alone_and_returns_the_requested_layers(shipped):
    model, _ = shipped
    scenes = data.sample_scenes(3, 3)
    denoise = adapter.make_denoiser(model, data.tokens([data.caption(s) for s in scenes]), data.tokens([""]), 3.0)
    x = torch.randn(3, 3, 32, 32) * 2.0
    sigma = torch.full((3,), 2.0)
    with torch.no_grad():
        plain = denoise(x, sigma)
        x0_all, every = denoise(x, sigma, capture=sg.CaptureRequest(None, True))
        x0_two, two = denoise(x, sigma, capture=sg.CaptureRequest(["down8", "up16"], False))
    assert torch.equal(plain, x0_all) and torch.equal(plain, x0_two)
    assert list(every.maps) == list(models.LAYERS) and set(two.maps) == {"down8", "up16"}
    assert two.feats is None and every.feats.shape == (3, 48, 16, 16)
    for name in two.maps:
        assert torch.allclose(two.maps[name], every.maps[name])
    for m in every.maps.values():   # resized to 16×16, rows of a softmax over the 8 tokens
        assert m.shape == (3, 16, 16, data.MAX_TOKENS)
        assert torch.allclose(m.sum(-1), torch.ones(3, 16, 16), atol=1e-4)


def test_move_on_the_shapes_model_gets_nearer_the_target_without_a_decoder(shipped):
    """Six one-object scenes, 20 DDIM steps: Move (layers auto) lands nearer its target than the unguided twin,
    keeps the twin's colour, and never calls the decoder."""
    model, classifier = shipped
    scenes = [s for s in data.sample_scenes(40, bench.SCENE_SEED) if len(s) == 1][:6]
    steps, cfg, seed = 20, 3.0, 0
    noise = adapter.initial_noise(len(scenes), seed, float(adapter.SCHEDULE.ddim_sigmas(steps)[0]))
    twin_images = bench.sample_rows(model, [data.caption(s) for s in scenes], noise, seed, steps, cfg)
    twin = bench.analyse(classifier, twin_images)
    ctx = {"targets": bench.choose_targets(scenes, twin), "oracle": {}}
    edit = bench.Edit("move", "move", 0.1)
    images, stats = bench.run_edit(model, edit, scenes, noise, seed, ctx, steps, cfg, 0.6)
    assert stats["decoder_calls"] == 0 and stats["denoiser_grad_calls"] > 0
    rows = bench.measure(edit, scenes, twin_images, images, twin, bench.analyse(classifier, images), ctx, seed)
    summary = bench.summarise(rows, edit)
    assert summary["error_reduction"] > 2.0, summary
    assert summary["colour_kept"] >= 5 / 6, summary


def test_second_model_captures_like_the_first_and_its_v_output_becomes_x0():
    """The cosine/v model has the capture interface of the shipped one (maps of its own layers, Ψ), and the
    adapter turns its v-prediction into x̂0 on its own schedule (σ up to 316): exact for a stand-in that predicts
    the true v."""
    from benchmarks.shapes import models2

    torch.manual_seed(0)
    net = models2.ShapesUNetV().eval()
    tokens = data.tokens(["red circle", "blue square left of green triangle"])
    denoise = adapter.make_denoiser(net, tokens, data.tokens([""]), 3.0)
    sigma = torch.tensor([1.0, 200.0])
    x = torch.randn(2, 3, 32, 32) * sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        plain = denoise(x, sigma)
        x0, every = denoise(x, sigma, capture=sg.CaptureRequest(None, True))
    assert torch.equal(plain, x0)
    assert list(every.maps) == list(models2.LAYERS) and every.feats.shape == (2, 64, 16, 16)
    for m in every.maps.values():   # resized to the largest layer (32×32), rows of a softmax over the 8 tokens
        assert m.shape == (2, 32, 32, data.MAX_TOKENS)
        assert torch.allclose(m.sum(-1), torch.ones(2, 32, 32), atol=1e-4)
    assert float(adapter.schedule_of(net).ddim_sigmas(50)[0]) == pytest.approx(models2.SIGMA_MAX, rel=1e-3)

    clean = torch.rand(2, 3, 32, 32) * 2 - 1
    noise = torch.randn(2, 3, 32, 32)
    a = (1 / (1 + sigma ** 2).sqrt()).view(-1, 1, 1, 1)
    v = a * noise - a * sigma.view(-1, 1, 1, 1) * clean

    class TrueV(torch.nn.Module):
        prediction, schedule, LAYERS = "v", models2.COSINE, models2.LAYERS

        def forward(self, z, t, tok):
            return v

    exact = adapter.make_denoiser(TrueV(), tokens, data.tokens([""]), 1.0)
    torch.testing.assert_close(exact(clean + sigma.view(-1, 1, 1, 1) * noise, sigma), clean, atol=1e-4, rtol=0)


def test_largest_blob_area_is_measured_apart_from_second_copies():
    """A second copy of an object adds to the colour's area but not to its largest blob's (the Resize row's
    measure): one red disk, then the same disk plus a smaller copy."""
    big, copy = data.Obj("red", "circle", 9.0, 10.0, 6.0), data.Obj("red", "circle", 24.0, 22.0, 4.5)
    one, two = metrics.detect(data.render([(big,), (big, copy)]))
    d1, d2 = one["red"], two["red"]
    assert d1.blobs == 1 and d1.largest_area == pytest.approx(d1.area, rel=1e-6)
    assert d2.blobs == 2 and d2.area == pytest.approx(d1.area * (1 + (4.5 / 6.0) ** 2), rel=0.05)
    assert d2.largest_area == pytest.approx(d1.area, rel=1e-6)


def test_a_shape_only_caption_points_each_object_at_its_own_words():
    """``object_positions(scene, colourless)`` follows ``caption(scene, colourless)`` for one- and two-object scenes
    and every relation (one word: above / below; two words: left of / right of)."""
    seen = set()
    for scene in data.sample_scenes(40, 5):
        for colourless in ((), (0,), (1,), (0, 1)):
            if max(colourless, default=0) >= len(scene):
                continue
            words = data.caption(scene, colourless).split()
            for i, (obj, pos) in enumerate(zip(scene, data.object_positions(scene, colourless))):
                assert words[pos["shape"] - 1] == obj.shape
                if i in colourless:
                    assert pos["colour"] is None and obj.colour not in words[:pos["shape"]][-1:]
                else:
                    assert words[pos["colour"] - 1] == obj.colour
            seen.add((len(scene), len(words)))
    assert {(1, 1), (1, 2)} <= seen and any(n == 2 and w >= 5 for n, w in seen)


def test_an_inverted_scene_is_reconstructed_and_moved_against_its_own_trajectory(shipped):
    """Two rendered two-object scenes, 12 DDIM steps: inversion then unguided sampling returns the picture (mean
    |Δ| < 0.03 of the RGB range), and Move + keep against the inversion trajectory brings the first object nearer
    its target than the reconstruction, the keep terms reading the trajectory."""
    from types import SimpleNamespace

    from benchmarks.shapes import inversion

    model, classifier = shipped
    scenes = [s for s in data.sample_scenes(30, bench.SCENE_SEED) if len(s) == 2][:2]
    args = SimpleNamespace(steps=12, cfg=3.0, iterations=3, end=0.6, strength=0.2, sets=[0])
    res = inversion.run_set(model, classifier, scenes, args, 0)
    assert res["reconstruction"]["mean_abs"] < 0.03, res["reconstruction"]
    assert res["reconstruction"]["object_shift_mean"] < 0.02, res["reconstruction"]
    moved = bench.summarise(res["rows"]["move_keep"], bench.Edit("move_keep", "move_keep", 0.1))
    assert moved["error_reduction"] > 1.2, moved


def test_the_real_image_edit_keeps_the_other_object_and_not_the_moved_one():
    """``inversion.REAL_IMAGE_WEIGHTS``: Move + keep of a two-object scene has the move term and the other object's
    keep-shape and keep-appearance terms against the given reference, and no keep term on the moved object (a zero
    weight leaves its term out, not the other object's)."""
    from benchmarks.shapes import inversion

    scene = next(s for s in data.sample_scenes(20, bench.SCENE_SEED) if len(s) == 2)
    ref = torch.zeros(1, 3, 32, 32)          # a reference latent stands in for the trajectory
    edit = bench.Edit("move_keep", "move_keep", 0.2, weights=inversion.REAL_IMAGE_WEIGHTS)
    ctx = {"targets": [(0.25, 0.25)], "oracle": {}, "keep_reference": lambda idx: ref}
    terms = bench.build_guidance(edit, [scene], ctx, [0]).terms
    assert [t.name for t in terms] == ["move", "other_shape", "other_appearance"]
    assert all(t.loss.reference is ref for t in terms[1:])
    everything = bench.build_guidance(bench.Edit("move_keep", "move_keep", 0.2), [scene], {**ctx}, [0]).terms
    assert [t.name for t in everything] == ["move", "keep_appearance", "other_shape", "other_appearance"]
