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
