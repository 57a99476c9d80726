"""Shen et al. 2024 and TFG in the engine: random augmentation after one decode, the Polyak step sizes, Gaussian
smoothing of the objective, and the bound on a guided update."""
from __future__ import annotations

import pytest
import torch

from guidance import VE, Guidance, GuidanceTerm, ImageLoss, Settings, Stats, sample_universal
from guidance.augment import Augmenter, Smoothing, noise_fraction, reduce


def smooth_images(batch=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------- augmentation

@pytest.mark.parametrize("spatial", [False, True])
def test_augmentation_keeps_shapes_and_gradients_and_is_reproducible(spatial):
    image = smooth_images().requires_grad_(True)
    aug = Augmenter(5, spatial=spatial, seed=3)
    out = aug(image)
    assert out.shape == (10, 3, 32, 32)
    (out * torch.linspace(-1, 1, 32)).sum().backward()
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    again = Augmenter(5, spatial=spatial, seed=3)(image.detach())
    torch.testing.assert_close(out.detach(), again)
    assert not torch.allclose(Augmenter(5, spatial=spatial, seed=4)(image.detach()), again)
    second = aug(image.detach())  # the next call of the same run draws new parameters
    assert not torch.allclose(second, again)
    aug.reset()
    torch.testing.assert_close(aug(image.detach()), again)  # reset: the run starts over


def test_global_rng_is_left_alone():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    Augmenter(2, spatial=False, seed=0)(smooth_images())
    assert torch.equal(torch.rand(3), expected)


def test_spatial_terms_get_colour_changes_only():
    """A grey image stays a per-pixel affine function of itself (no translation, resize or cutout)."""
    grey = smooth_images(batch=1)[:, :1].repeat(1, 3, 1, 1)
    out = Augmenter(4, spatial=True, seed=1)(grey)
    for view in out:
        x, y = grey[0, 0].flatten(), view[0].flatten()
        corr = torch.corrcoef(torch.stack([x, y]))[0, 1]
        assert corr > 0.999, corr
    moved = Augmenter(4, spatial=False, seed=1)(grey)
    assert min(float(torch.corrcoef(torch.stack([grey[0, 0].flatten(), v[0].flatten()]))[0, 1]) for v in moved) < 0.99


def test_augmented_term_averages_views_in_one_call():
    calls = []

    def loss(image):
        calls.append(image.shape[0])
        return image.mean(dim=(1, 2, 3))

    term = GuidanceTerm("t", loss, 1.0, augment=4)
    value = Guidance().add(term)(smooth_images(batch=3), 0.0)
    assert calls == [12] and value.shape == (3,)


def test_reduce_mean_and_logmeanexp():
    v = torch.tensor([1.0, 2.0, 3.0, 5.0])  # 2 views × 2 images
    torch.testing.assert_close(reduce(v, 2, "mean"), torch.tensor([2.0, 3.5]))
    lme = reduce(v, 2, "logmeanexp")
    torch.testing.assert_close(lme, -torch.log((torch.exp(-torch.tensor([1.0, 2.0])) +
                                                 torch.exp(-torch.tensor([3.0, 5.0]))) / 2))
    assert bool((lme <= reduce(v, 2, "mean")).all())  # Jensen


# ---------------------------------------------------------------------------------------------------- polyak

class Identity:
    """D(x, σ) = x: the clean prediction is the sample itself (so ∇ₓ = ∇_x̂0)."""

    def __call__(self, x, sigma, capture=None):
        return x * 1.0


class Distance:
    """L = ‖x − x*‖ per image (floor 0)."""

    def __init__(self, target):
        self.target = target

    def __call__(self, image):
        return (image - self.target).flatten(1).norm(dim=1)


def one_step(settings, x, target, sigma=2.0):
    decode = lambda z: z  # noqa: E731  (the "image" is the latent)
    g = Guidance().add(GuidanceTerm("d", Distance(target), 1.0))
    stats = Stats()
    out = sample_universal(Identity(), x, torch.tensor([sigma, 0.0]), guidance=g, decode=decode,
                           settings=settings, parameterization=VE, stats=stats)
    return out, stats


def test_classical_polyak_step_lands_on_the_minimizer():
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2
    target = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    out, stats = one_step(Settings(forward_strength=1.0, strength_mode="polyak_loss", max_step=0), x, target)
    torch.testing.assert_close(out, target, rtol=1e-5, atol=1e-5)
    half, _ = one_step(Settings(forward_strength=0.5, strength_mode="polyak_loss", max_step=0), x, target)
    torch.testing.assert_close(half, (x + target) / 2, rtol=1e-5, atol=1e-5)


def test_shen_polyak_step_matches_its_closed_form():
    """ε moves by ρ·∇ with ρ = s0·‖ε‖/‖∇‖²; for D = identity, ε = (x − D)/σ = 0 … so use D(x) = x/2."""
    class Half:
        def __call__(self, x, sigma, capture=None):
            return x * 0.5

    sigma, s0 = 2.0, 0.3
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2)) * 2
    target = torch.zeros_like(x)
    g = Guidance().add(GuidanceTerm("d", Distance(target), 1.0))
    out = sample_universal(Half(), x, torch.tensor([sigma, 0.0]), guidance=g, decode=lambda z: z,
                           settings=Settings(forward_strength=s0, strength_mode="polyak", max_step=0),
                           parameterization=VE)
    d = x * 0.5
    eps = (x - d) / sigma
    # ∇ₓ‖D(x)‖ = 0.5·D/‖D‖
    grad = 0.5 * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    rho = s0 * eps.flatten(1).norm(dim=1) / grad.flatten(1).norm(dim=1) ** 2
    expected = d - sigma * rho.view(-1, 1, 1, 1) * grad
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_backward_polyak_optimizer_lands_on_the_minimizer():
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    target = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    out, stats = one_step(Settings(forward_strength=0.0, backward_steps=1, backward_lr=1.0,
                                   backward_optimizer="polyak"), x, target)
    torch.testing.assert_close(out, target, rtol=1e-5, atol=1e-5)


def test_huge_strength_is_capped_and_counted():
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5)) * 2

    class Half:
        def __call__(self, x, sigma, capture=None):
            return x * 0.5

    g = Guidance().add(GuidanceTerm("d", Distance(torch.full_like(x, 3.0)), 1.0))
    stats = Stats()
    sig = torch.tensor([2.0, 1.0, 0.5, 0.0])
    out = sample_universal(Half(), x, sig, guidance=g, decode=lambda z: z,
                           settings=Settings(forward_strength=1e6), parameterization=VE, stats=stats)
    assert stats.capped_updates == 2 * 3 and out.abs().max() < 1000
    assert "capped at max_step = 10" in stats.notes(Settings())[0]
    uncapped = sample_universal(Half(), x, sig, guidance=g, decode=lambda z: z,
                                settings=Settings(forward_strength=1e6, max_step=0), parameterization=VE)
    assert uncapped.abs().max() > 1e4  # the bound is what keeps it small


# ------------------------------------------------------------------------------------------------- smoothing

def test_smoothing_with_zero_strength_equals_no_smoothing():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6)) * 3
    ref = smooth_images(batch=1, size=8)
    sig = torch.tensor([3.0, 1.5, 0.7, 0.2, 0.0])

    class Shrink:
        def __call__(self, x, sigma, capture=None):
            return x / (1 + sigma.view(-1, 1, 1, 1) ** 2)

    def run(**kw):
        g = Guidance().add(GuidanceTerm("img", ImageLoss(ref), 1.0))
        return sample_universal(Shrink(), x, sig, guidance=g, decode=torch.sigmoid,
                                settings=Settings(forward_strength=1.0, **kw), parameterization=VE,
                                generator=torch.Generator().manual_seed(0))

    plain = run()
    assert torch.equal(run(smoothing=0.0, smoothing_samples=4), plain)
    smoothed = run(smoothing=0.5, smoothing_samples=4)
    assert not torch.equal(smoothed, plain) and torch.isfinite(smoothed).all()
    assert torch.equal(run(smoothing=0.5, smoothing_samples=4), smoothed)  # seeded


def test_noise_fraction_is_tfg_sqrt_one_minus_alphabar():
    assert noise_fraction(1.0, 0.0) == 0.0
    assert abs(noise_fraction(1.0, 1.0) - 2 ** -0.5) < 1e-12
    assert abs(noise_fraction(0.5, 0.5) - 2 ** -0.5) < 1e-12  # flow at σ = 0.5
    with pytest.raises(ValueError, match="reduction"):
        Smoothing(0.1, 2, "median")
