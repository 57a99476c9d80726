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
from benchmarks.digits import demo, metrics, models, quality  # noqa: E402
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
    out = tmp_path / "bench"
    quality.main(["--out", str(out), "--samples", "2", "--configs", "unguided,best"])
    records = _valid_json(out / "quality.json")
    names = [r["name"] for r in records]
    assert names[0].startswith("real digits") and "unguided" in names and any(n.startswith("best") for n in names)
    for r in records:
        assert {"name", "settings", "validity", "fd", "seconds", "evaluations"} <= set(r)
        assert 0.0 <= r["validity"] <= 1.0 and (r["fd"] is None or math.isfinite(r["fd"]))
        assert {"denoiser", "guidance_network"} <= set(r["evaluations"])
    unguided = next(r for r in records if r["name"] == "unguided")
    assert unguided["evaluations"] == {"denoiser": 50, "denoiser_with_grad": 0, "guidance_network": 0}
    best = next(r for r in records if r["name"].startswith("best"))
    settings = ug.Settings(**best["settings"])
    objective = ug.Guidance().add(ug.GuidanceTerm("classifier", lambda img: img.new_zeros(img.shape[0])))
    guided_iterations = sum(settings.recurrence for i in range(50)
                            if settings.start_percent <= i / 50 and (i / 50 < settings.end_percent
                                                                     or settings.end_percent >= 1))
    assert best["evaluations"]["denoiser"] == ug.total_iterations(50, objective, settings)
    assert best["evaluations"]["denoiser_with_grad"] == guided_iterations
    # backward guidance evaluates the classifier more often than once per guided iteration
    assert best["evaluations"]["guidance_network"] > guided_iterations
    w, h = _png_size(out / "quality.png")
    assert w > 600 and h > 100


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
