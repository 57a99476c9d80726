"""Inversion of a clean latent (guidance/inversion.py) on small smooth denoisers, both parameterizations: sampling
the inverted start with the same schedule returns the latent; more fixed-point iterations bring it nearer; a
different schedule is refused; self-guidance references read the trajectory and the sampler starts from it."""
from __future__ import annotations

import pytest
import torch

from guidance import FLOW, VE, Guidance, GuidanceTerm, Settings, Stats, sample_universal
from guidance.inversion import Trajectory, invert, inversion_start
from guidance.selfguidance import Internals, KeepShapeLoss


def toy_denoiser(param, seed=0):
    """A smooth non-linear x̂0 predictor shaped like a real one: the Gaussian-data optimum ``a·x/(a²+b²)`` plus a
    small non-linear correction that fades as σ → 0 (so x̂0 → x/a there)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 16, generator=g) / 4

    def denoise(x, sigma, capture=None):
        s = float(sigma[0])
        a, b = param.a(s), param.b(s)
        r = a * a + b * b
        flat = x.flatten(1)
        x0 = (a * flat + b * 0.3 * torch.tanh(flat @ w / r ** 0.5)).view_as(x) / r
        if capture is not None:
            maps = torch.softmax(x.flatten(2).transpose(1, 2).reshape(x.shape[0], 2, 2, 4), dim=-1)
            return x0, Internals({"l": maps}, None)
        return x0
    return denoise


def resample(denoise, start, sigmas, param):
    x = start
    for i in range(len(sigmas) - 1):
        s = sigmas[i] * x.new_ones([x.shape[0]])
        x = param.step(x, denoise(x, s), float(sigmas[i]), float(sigmas[i + 1]))
    return x


@pytest.mark.parametrize("param,sigmas", [(VE, torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.2, 0.0])),
                                          (FLOW, torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.0]))])
def test_inversion_then_sampling_returns_the_latent(param, sigmas):
    denoise = toy_denoiser(param)
    latent = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    errors = []
    for iterations in (1, 8):
        traj = invert(denoise, latent, sigmas, param, iterations=iterations)
        assert traj.latents.shape == (7, 2, 4, 2, 2) and torch.equal(traj.latents[-1], latent)
        back = resample(denoise, traj.start, sigmas, param)
        errors.append(float((back - latent).abs().max()))
    assert errors[1] < 1e-4 < errors[0], errors  # DDIM inversion alone is approximate; the fixed point is exact


def test_a_different_schedule_or_size_is_refused():
    sigmas = torch.tensor([4.0, 1.0, 0.0])
    traj = Trajectory(sigmas, torch.zeros(3, 1, 4, 2, 2))
    term = GuidanceTerm("keep", KeepShapeLoss([0], reference=traj), 1.0)
    guidance = Guidance((term,))
    assert torch.equal(inversion_start(guidance, torch.ones(2, 4, 2, 2), sigmas), torch.zeros(2, 4, 2, 2))
    with pytest.raises(ValueError, match="made with 2 steps.*runs 3"):
        inversion_start(guidance, torch.ones(1, 4, 2, 2), torch.tensor([4.0, 2.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="differs from the inversion's at step 0"):
        inversion_start(guidance, torch.ones(1, 4, 2, 2), torch.tensor([5.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="sample at the inverted image's size"):
        inversion_start(guidance, torch.ones(1, 4, 4, 4), sigmas)


def test_the_sampler_starts_from_the_inversion_and_reads_its_trajectory():
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])
    denoise = toy_denoiser(VE)
    latent = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    traj = invert(denoise, latent, sigmas, VE, iterations=8)
    seen = []

    def spy(x, sigma, capture=None):
        if capture is not None and not x.requires_grad:
            seen.append(x.clone())
        return denoise(x, sigma, capture)

    loss = KeepShapeLoss([0, 1], layers=["l"], reference=traj)
    guidance = Guidance((GuidanceTerm("keep", loss, 1.0, 0.0, 0.5),))
    stats = Stats()
    out = sample_universal(spy, torch.randn(1, 4, 2, 2) * 8, sigmas, guidance=guidance, decode=lambda z: z,
                           settings=Settings(forward_strength=1e-9, strength_mode="normalized"), parameterization=VE,
                           stats=stats)
    assert stats.started_from_inversion and any("inverted" in n for n in stats.notes(Settings()))
    assert stats.reference_calls == 2 and [torch.equal(s, traj.latent_at(i)) for i, s in enumerate(seen)] == [True] * 2
    assert float((out - latent).abs().max()) < 1e-4
