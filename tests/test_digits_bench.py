"""The 8×8 digits quality benchmark and demo (benchmarks/digits): shipped weights, metrics, end-to-end runs.

Fast on purpose (well under a minute on 2 CPU cores): tiny sample counts, one thread.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import guidance as ug  # noqa: E402
from benchmarks import flops  # noqa: E402
from benchmarks.digits import cost, demo, metrics, models, quality  # noqa: E402
from benchmarks.digits.data import decode, load_split  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundle():
    return metrics.load_bundle()


def test_split_is_fixed_and_scaled():
    split = load_split()
    assert split.x_train.shape == (1257, 1, 8, 8) and split.x_test.shape == (540, 1, 8, 8)
    assert float(split.x_train.min()) == -1.0 and float(split.x_train.max()) == 1.0
    assert torch.bincount(split.y_test).min() >= 52  # stratified: 52-55 test digits per class
    img = decode(split.x_test[:2])
    assert img.shape == (2, 3, 8, 8) and float(img.min()) >= 0.0 and float(img.max()) <= 1.0


def test_shipped_weights_load(bundle):
    for name, fname in models.FILES.items():
        path = models.WEIGHTS / fname
        assert path.is_file(), path
        assert path.stat().st_size < 2_000_000
        assert models.read_meta(name)["seed"] >= 0
    x = torch.zeros(4, 1, 8, 8)
    sigma = torch.full((4,), 5.0)
    out = bundle.denoiser(x, sigma)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert bundle.classifier(x).shape == (4, 10) and bundle.evaluator(x).shape == (4, 10)
    assert bundle.evaluator.features(x).shape == (4, models.FEATURE_DIM)
    assert not any(p.requires_grad for p in bundle.denoiser.parameters())


def test_denoiser_is_eps_in_ve_form(bundle):
    """D(x, σ) = x - σ·ε(x/sqrt(1+σ²), t(σ)); at the table's σ_t the timestep is recovered exactly."""
    sched = bundle.denoiser.schedule
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(sched.sigma_to_t(sched.sigmas[t]), t.float(), atol=1e-3)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    s = sched.sigmas[t]
    with torch.no_grad():
        eps = bundle.denoiser.eps_net(x / (1 + s.view(-1, 1, 1, 1) ** 2).sqrt(), t.float())
        assert torch.allclose(bundle.denoiser(x, s), x - s.view(-1, 1, 1, 1) * eps, atol=1e-5)


def test_evaluator_accuracy_on_real_test_split(bundle):
    split = load_split()
    with torch.no_grad():
        acc = float((bundle.evaluator(split.x_test).argmax(1) == split.y_test).float().mean())
        guide_acc = float((bundle.classifier(split.x_test).argmax(1) == split.y_test).float().mean())
    assert acc > 0.95, acc
    assert guide_acc > 0.95, guide_acc


def test_frechet_distance_sanity():
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 4))
    assert abs(metrics.frechet(a, a)) < 1e-6
    shifted = metrics.frechet(a, a + 3.0)
    assert abs(shifted - 36.0) < 1e-6  # |Δμ|² = 4·3², same covariance


def test_guided_validity_beats_unguided(bundle):
    targets = metrics.targets_for(4)
    unguided, _, _ = metrics.generate(bundle, targets, ug.Settings(forward_strength=0.0), seed=0)
    guided, stats, _ = metrics.generate(bundle, targets, ug.Settings(forward_strength=1.0, recurrence=2), seed=0)
    v_un = metrics.score(bundle, unguided, targets)["validity"]
    v_g = metrics.score(bundle, guided, targets)["validity"]
    assert v_g >= v_un + 0.4, (v_un, v_g)
    assert stats.denoiser_grad_calls == 2 * metrics.STEPS and stats.objective_calls == 2 * metrics.STEPS
    assert metrics.score(bundle, guided, targets)["guide_loss"] < metrics.score(bundle, unguided, targets)["guide_loss"]


def _valid_json(path: Path):
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    return json.loads(text)


def _png_size(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


def test_quality_benchmark_end_to_end(tmp_path):
    """Two seeds, two samples per digit: the aggregated records, the SD cost fields, the summary and both plots."""
    out = tmp_path / "bench"
    quality.main(["--out", str(out), "--samples", "2", "--seeds", "0,1",
                  "--configs", "unguided,best:,paper recipe (face)"])
    records = _valid_json(out / "quality.json")
    names = [r["name"] for r in records]
    assert names[0].startswith("real digits") and "unguided" in names and any(n.startswith("best") for n in names)
    assert any(n.startswith("paper recipe (face)") for n in names)
    for r in records:
        assert {"name", "settings", "validity", "validity_std", "fd", "fd_std", "seeds", "per_seed",
                "evaluations"} <= set(r)
        assert r["seeds"] == [0, 1] and len(r["per_seed"]) == 2
        assert 0.0 <= r["validity"] <= 1.0 and (r["fd"] is None or math.isfinite(r["fd"]))
        assert r["validity_std"] >= 0.0
        if r["kind"] == "sampler":
            assert {"sd_tflop", "sd_tflop_std", "sd_tflop_taesd", "sd_tflop_batch", "guide_loss", "eval_loss",
                    "cpu_seconds", "per_image_evaluations"} <= set(r)
            assert r["sd_tflop_taesd"] <= r["sd_tflop"] <= r["sd_tflop_batch"] + 1e-9
            values = [s["validity"] for s in r["per_seed"]]
            assert r["validity"] == pytest.approx(sum(values) / 2)
    p = cost.parts()[0]  # the speed benchmark's counts when out/bench/flops_sd15_64.json exists, else cost.py's copy
    unguided = next(r for r in records if r["name"] == "unguided")
    assert unguided["evaluations"] == {"denoiser": 50, "denoiser_with_grad": 0, "guidance_network": 0, "decoder": 0}
    assert unguided["sd_tflop"] == pytest.approx(50 * p["unet_fwd_b2"] + p["vae_decoder_fwd"], rel=1e-3)
    assert unguided["sd_tflop_taesd"] == pytest.approx(unguided["sd_tflop"])
    paper = next(r for r in records if r["name"].startswith("paper recipe (face)"))
    assert paper["settings"]["max_step"] == 0 and paper["settings"]["recurrence"] == 2
    # forward-only on every step: exactly the speed benchmark's recipe price (benchmarks/flops.py)
    assert paper["sd_tflop"] == pytest.approx(flops.recipe_tflop(p, steps=50, guided_steps=50, recurrence=2,
                                                                  network=cost.NETWORK_TFLOP), rel=1e-3)
    best = next(r for r in records if r["name"].startswith("best"))
    settings = ug.Settings(**best["settings"])
    steps = best["steps"]
    objective = ug.Guidance().add(ug.GuidanceTerm("classifier", lambda img: img.new_zeros(img.shape[0])))
    guided_iterations = sum(settings.recurrence for i in range(steps)
                            if settings.start_percent <= i / steps and (i / steps < settings.end_percent
                                                                        or settings.end_percent >= 1))
    assert best["evaluations"]["denoiser"] == ug.total_iterations(steps, objective, settings)
    assert best["evaluations"]["denoiser_with_grad"] == guided_iterations
    # backward guidance evaluates the classifier more often than once per guided iteration; per image (early stop
    # replayed per sample) never more often than the batch did
    assert best["evaluations"]["guidance_network"] > guided_iterations
    assert guided_iterations <= best["per_image_evaluations"]["guidance_network"] <= best["evaluations"][
        "guidance_network"]
    summary = _valid_json(out / "quality_summary.json")
    assert summary["fd_floor_seeds"] == pytest.approx(records[0]["fd"])
    assert summary["fd_bar"] == pytest.approx(1.5 * summary["fd_floor"]) and summary["fd_floor_std"] > 0
    assert set(summary["meets_bar_seeds_floor"]) <= set(summary["meets_bar"])
    ratio = summary["best"]["vs_paper"][paper["name"]]
    assert ratio == pytest.approx(best["sd_tflop"] / paper["sd_tflop"])
    assert set(summary["official_sd_tflop"]) == {f"{t} ({s} steps, k={k})" for t, s, k in cost.OFFICIAL}
    for png in ("quality.png", "pareto.png"):
        w, h = _png_size(out / png)
        assert w > 600 and h > 100


def test_sd_cost_model_prices_every_call():
    p = cost.COUNTED_SD15_512
    counts = {"denoiser": 30, "denoiser_with_grad": 20, "decoder": 45.5, "guidance_network": 45.5}
    expected = (10 * p["unet_fwd_b2"] + 20 * p["unet_fwd_bwd_b2"] + 45.5 * p["vae_decoder_fwd_bwd"]
                + 45.5 * 4 * cost.NETWORK_TFLOP + p["vae_decoder_fwd"])
    assert cost.price(counts, copies=4, p=p) == pytest.approx(expected)
    taesd = cost.price(counts, copies=4, p=p, decoder="taesd")
    assert expected - taesd == pytest.approx(45.5 * (p["vae_decoder_fwd_bwd"] - p["taesd_decoder_fwd_bwd"]))
    # the official segmentation script (500 steps, k=10): ≈ 42.7 PFLOP per image (REFERENCE_FACTS B §2)
    assert 42_000 < cost.official_tflop(500, 10, p=p) < 43_000
    parts, source = cost.parts(Path("/nonexistent/flops.json"))
    assert parts == p and "cost.py" in source


def test_recipe_copies_and_augmented_generation(bundle):
    best = quality.BEST
    assert quality.Recipe("x", best.settings).copies == 1
    assert quality.Recipe("x", best.settings, augment=4).copies == 4
    smooth = quality.Recipe("x", ug.Settings(smoothing=0.1, smoothing_samples=3), augment=2)
    assert smooth.copies == 6
    names = [r.name for r in quality.ROWS]
    assert len(names) == len(set(names))
    assert {r.group for r in quality.ROWS} >= {"config", "paper", "ablation", "best"}
    assert [r.settings.recurrence for r in quality.PAPER] == [10, 2, 6]
    assert all(r.settings.max_step == 0 and r.settings.backward_steps == 0 for r in quality.PAPER)
    targets = metrics.targets_for(1)
    info = {}
    settings = ug.Settings(forward_strength=1.0, start_percent=0.8, smoothing=0.1, smoothing_samples=2)
    samples, stats, _ = metrics.generate(bundle, targets, settings, steps=10, augment=3, geometric=True, info=info)
    assert samples.shape == (10, 1, 8, 8) and torch.isfinite(samples).all()
    assert stats.objective_calls == 2 and info["per_image"]["guidance_network"] == 2
    assert info["cpu_seconds"] > 0


def test_per_image_counts_replay_the_early_stop():
    """Batch-1 accounting: a sample stops after the evaluation whose loss fell below the threshold."""
    settings = ug.Settings(backward_steps=3, backward_early_stop=0.5)
    stats = ug.Stats(denoiser_calls=2, denoiser_grad_calls=2, decoder_calls=6, objective_calls=6)
    stats.trace = [{"step": 0, "repeat": 0, "phase": "forward"}] + [
        {"step": 0, "repeat": 0, "phase": "backward", "inner": j} for j in range(2)] + [
        {"step": 1, "repeat": 0, "phase": "forward"}] + [
        {"step": 1, "repeat": 0, "phase": "backward", "inner": j} for j in range(2)]
    v = lambda *a: torch.tensor([a])  # [views=1, B=2]
    values = [v(2.0, 2.0), v(0.1, 2.0), v(0.1, 0.2),   # step 0: sample 0 stops after 1 backward evaluation, 1 after 2
              v(2.0, 2.0), v(0.1, 0.1), v(0.1, 0.1)]   # step 1: both stop after 1 (batch loop broke at the second)
    counts = metrics.per_image_counts(stats, values, settings)
    assert counts["guidance_network"] == pytest.approx(2 + (1 + 2) / 2 + 1)
    assert counts["denoiser"] == 2 and counts["decoder"] == counts["guidance_network"]
    # no early stop: the batch's counts
    plain = metrics.per_image_counts(stats, values, ug.Settings(backward_steps=3))
    assert plain["guidance_network"] == 6
    assert metrics.per_image_counts(stats, [], settings)["guidance_network"] == 6


def test_aggregate_and_pareto_front():
    per_seed = [{"validity": 0.9, "fd": 20.0, "sd_tflop": 100.0, "seed": 0},
                {"validity": 1.0, "fd": 22.0, "sd_tflop": 100.0, "seed": 1}]
    rec = quality.aggregate("x", per_seed, kind="sampler")
    assert rec["validity"] == pytest.approx(0.95) and rec["validity_std"] == pytest.approx(0.0707, abs=1e-4)
    assert rec["fd"] == pytest.approx(21.0) and rec["sd_tflop_std"] == 0.0 and rec["seeds"] == [0, 1]
    from benchmarks.digits.plot import _pareto
    pts = [(10, 0.5), (20, 0.4), (30, 0.9), (5, 0.1), (30, 0.95)]
    assert _pareto(pts) == [3, 0, 4]


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = demo.main(["--out", str(out), "--quick"])
    data = _valid_json(out / "metrics.json")
    assert data == json.loads(json.dumps(result))
    assert [c["name"].split(" (")[0] for c in data["columns"]] == [
        "unguided", "forward", "forward + recurrence", "forward + backward + recurrence"]
    for col in data["columns"]:
        assert 0.0 <= col["validity"] <= 1.0 and len(col["validity_per_digit"]) == 10
    w, h = _png_size(out / "grid.png")
    assert h >= 10 * 64 and w >= 4 * 64 * data["shown_per_digit"]
