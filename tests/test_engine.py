"""Unit tests of the Universal Guidance engine (guidance/), on tiny nets, on the CPU.

The "diffusion model" is the exact posterior-mean denoiser of Gaussian data ``x0 ~ N(0, c²)`` (plus an optional
small random-conv perturbation so that its Jacobian is not a multiple of the identity); the "VAE decoder" is a fixed
random 1x1 conv from 4 latent channels to RGB, a nearest 2x upsample and a sigmoid. Every reference value below is
computed independently of the engine's own helpers.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from guidance import (FLOW, VE, Guidance, GuidanceTerm, ImageLoss, Parameterization, Settings, Stats,
                      sample_universal, total_iterations)
from guidance.parameterization import A_MIN

N_STEPS = 8
BATCH = 4
LATENT = (4, 8, 8)


# --------------------------------------------------------------------------------------------------------------
# tiny networks
# --------------------------------------------------------------------------------------------------------------

class TinyDenoiser(nn.Module):
    """``D(x, σ) = E[x0 | x]`` for ``x0 ~ N(0, c²)`` under ``x = a(σ)·x0 + σ·n``, plus ``nl·tanh(conv(x))``.

    The conv's parameters keep ``requires_grad=True`` (like a real model), so any call made with grad enabled
    returns a tensor attached to an autograd graph.
    """

    def __init__(self, kind: str, c: float = 1.0, nl: float = 0.1, seed: int = 0):
        super().__init__()
        self.kind, self.c, self.nl = kind, c, nl
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.2)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.view(-1, 1, 1, 1).to(x.dtype)
        a = torch.ones_like(s) if self.kind == "ve" else 1.0 - s
        kappa = a * self.c ** 2 / (a * a * self.c ** 2 + s * s)
        out = kappa * x
        if self.nl:
            out = out + self.nl * torch.tanh(self.conv(x))
        return out


class TinyDecoder(nn.Module):
    """Fixed random 1x1 conv 4 → 3, nearest 2x upsample, then sigmoid (or identity when ``linear``)."""

    def __init__(self, seed: int = 1, linear: bool = False):
        super().__init__()
        self.linear = linear
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(4, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.7)
            self.conv.bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        img = F.interpolate(self.conv(z), scale_factor=2, mode="nearest")
        return img if self.linear else torch.sigmoid(img)


class Recorder:
    """Wraps a callable and records, per call, σ, whether grad was enabled and whether the result has a graph."""

    def __init__(self, fn):
        self.fn = fn
        self.sigmas, self.grad_enabled, self.out_requires_grad, self.in_requires_grad = [], [], [], []

    @property
    def calls(self) -> int:
        return len(self.grad_enabled)

    def __call__(self, x, *args):
        self.grad_enabled.append(torch.is_grad_enabled())
        self.in_requires_grad.append(bool(x.requires_grad))
        if args and torch.is_tensor(args[0]):
            self.sigmas.append(float(args[0][0]))
        out = self.fn(x, *args)
        self.out_requires_grad.append(bool(out.requires_grad))
        return out


class CallCounter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def sigmas_for(kind: str, n: int = N_STEPS) -> torch.Tensor:
    if kind == "ve":  # geometric 10 → 0.1, then 0 (k-diffusion style)
        return torch.cat([torch.exp(torch.linspace(math.log(10.0), math.log(0.1), n)), torch.zeros(1)])
    return torch.linspace(1.0, 0.0, n + 1)  # rectified flow, starting at pure noise


def start_latent(kind: str, sigmas: torch.Tensor, seed: int = 0, batch: int = BATCH) -> torch.Tensor:
    n = torch.randn((batch,) + LATENT, generator=torch.Generator().manual_seed(seed))
    return n * float(sigmas[0])  # E[x0] = 0, so x = a·x0 + b·n starts as b·n (plus a·x0 ≈ 0 at the top σ)


def target_image() -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    return torch.rand(1, 3, 16, 16, generator=gen) * 0.6 + 0.2


def param_of(kind: str) -> Parameterization:
    return VE if kind == "ve" else FLOW


def run(kind: str, settings: Settings, *, guidance=None, denoise=None, decode=None, sigmas=None, x=None,
        gen_seed=1, **kw) -> torch.Tensor:
    sigmas = sigmas_for(kind) if sigmas is None else sigmas
    x = start_latent(kind, sigmas) if x is None else x
    return sample_universal(denoise or TinyDenoiser(kind), x, sigmas, guidance=guidance,
                            decode=decode or TinyDecoder(), settings=settings, parameterization=param_of(kind),
                            generator=torch.Generator().manual_seed(gen_seed), **kw)


def image_guidance(weight: float = 1.0, start: float = 0.0, end: float = 1.0, name: str = "image"):
    loss = ImageLoss(target_image())
    return Guidance().add(GuidanceTerm(name, loss, weight=weight, start_percent=start, end_percent=end)), loss


def final_loss(out: torch.Tensor, loss: ImageLoss, decode=None) -> torch.Tensor:
    with torch.no_grad():
        return loss((decode or TinyDecoder())(out))


# --------------------------------------------------------------------------------------------------------------
# 1. s = 0, k = 1, m = 0 is exactly a plain Euler / DDIM sampler
# --------------------------------------------------------------------------------------------------------------

def reference_euler(denoise, x: torch.Tensor, sigmas: torch.Tensor, kind: str) -> torch.Tensor:
    """Written from the formulas, independently of guidance.parameterization."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        with torch.no_grad():
            d = denoise(x, torch.full((x.shape[0],), s))
        if kind == "ve":
            x = d + (s_next / s) * (x - d)
        else:  # n̂ = (x - (1-σ)D)/σ is the noise the model implies; x' = (1-σ')D + σ'·n̂
            n_hat = (x - (1 - s) * d) / s
            x = (1 - s_next) * d + s_next * n_hat
    return x


DYADIC = {"ve": torch.tensor([16.0, 8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0]),
          "flow": torch.tensor([1.0, 0.875, 0.75, 0.5, 0.25, 0.125, 0.0625, 0.0])}


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_zero_strength_reproduces_euler_exactly(kind):
    den = TinyDenoiser(kind)
    guid, _ = image_guidance()
    # Dyadic σ: every product/quotient by σ is exact in float32, so any correct order of operations gives the
    # same bits and the comparison can be exact for both families.
    sig = DYADIC[kind]
    x = start_latent(kind, sig)
    ref = reference_euler(den, x, sig, kind)
    for g in (None, guid):
        out = run(kind, Settings(forward_strength=0.0), guidance=g, denoise=den, sigmas=sig, x=x)
        assert torch.equal(out, ref)
    # Generic σ (geometric VE / linear flow schedules).
    sig = sigmas_for(kind)
    x = start_latent(kind, sig, seed=3)
    ref = reference_euler(den, x, sig, kind)
    out = run(kind, Settings(forward_strength=0.0), guidance=guid, denoise=den, sigmas=sig, x=x)
    if kind == "flow":  # the reference uses the engine's own order of operations: bit-exact
        assert torch.equal(out, ref)
    else:  # (σ'/σ)(x - D) vs σ'·((x - D)/σ): one float32 rounding apart per step
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # and the sampler really moves the latent (the comparison above is not vacuous)
    assert (out - x).abs().max() > 0.3


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_active_guidance_with_zero_strength_and_no_backward_changes_nothing(kind):
    den = TinyDenoiser(kind)
    sig = DYADIC[kind]
    x = start_latent(kind, sig, seed=7)
    ref = reference_euler(den, x, sig, kind)
    guid, _ = image_guidance()
    assert guid.active(0.0)
    counted = Recorder(den)
    out = run(kind, Settings(forward_strength=0.0, backward_steps=0, recurrence=1), guidance=guid,
              denoise=counted, sigmas=sig, x=x)
    assert torch.equal(out, ref)
    assert counted.calls == len(sig) - 1 and not any(counted.grad_enabled)
    # A term of weight 0 is inactive: a positive strength then changes nothing either.
    zero_w, _ = image_guidance(weight=0.0)
    out = run(kind, Settings(forward_strength=50.0, backward_steps=3), guidance=zero_w, denoise=den, sigmas=sig,
              x=x)
    assert torch.equal(out, ref)
    # Nothing to guide: recurrence is not applied (k only repeats guided steps), result still exact.
    counted = Recorder(den)
    out = run(kind, Settings(forward_strength=0.0, recurrence=3), guidance=guid, denoise=counted, sigmas=sig, x=x)
    assert torch.equal(out, ref) and counted.calls == len(sig) - 1


# --------------------------------------------------------------------------------------------------------------
# 2. re-noise has the right marginal
# --------------------------------------------------------------------------------------------------------------

RENOISE_CASES = [("ve", 0.5, 1.0), ("ve", 0.0, 2.0), ("ve", 3.0, 10.0),
                 ("flow", 0.5, 0.75), ("flow", 0.0, 0.4), ("flow", 0.6, 1.0), ("flow", 0.1, 0.9)]


@pytest.mark.parametrize("kind,sigma_next,sigma", RENOISE_CASES)
def test_renoise_marginal(kind, sigma_next, sigma):
    n_samples = 200_000
    gen = torch.Generator().manual_seed(123)
    mu, c = 0.3, 0.7
    x0 = mu + c * torch.randn(n_samples, generator=gen, dtype=torch.float64)
    a = (lambda s: 1.0) if kind == "ve" else (lambda s: 1.0 - s)
    x_next = a(sigma_next) * x0 + sigma_next * torch.randn(n_samples, generator=gen, dtype=torch.float64)
    noise = torch.randn(n_samples, generator=gen, dtype=torch.float64)
    x = param_of(kind).renoise(x_next, sigma_next, sigma, noise)
    # conditional on x0: x | x0 ~ N(a(σ)·x0, σ²)
    r = x - a(sigma) * x0
    tol_mean = 5 * sigma / math.sqrt(n_samples)
    assert abs(float(r.mean())) < tol_mean
    assert float(r.var()) == pytest.approx(sigma ** 2, rel=5 * math.sqrt(2 / n_samples))
    corr = float(torch.corrcoef(torch.stack([r, x0]))[0, 1])
    assert abs(corr) < 5 / math.sqrt(n_samples)
    # marginal: mean a·μ, variance a²c² + σ²
    assert float(x.mean()) == pytest.approx(a(sigma) * mu, abs=5 * math.sqrt(a(sigma) ** 2 * c * c + sigma ** 2)
                                            / math.sqrt(n_samples))
    var = a(sigma) ** 2 * c * c + sigma ** 2
    assert float(x.var()) == pytest.approx(var, rel=5 * math.sqrt(2 / n_samples))


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_recurrence_keeps_the_marginal_inside_the_sampler(kind):
    """Constant data x0 = 0.5 with its exact (constant) denoiser: x at σ_i must be 0.5·a_i + b_i·n, also after the
    re-noise of self-recurrence, at every step of a real run (checked through the callback's ``x``)."""
    c0 = 0.5
    sig = sigmas_for(kind, 6)
    x = torch.randn((4, 4, 64, 64), generator=torch.Generator().manual_seed(11)) * float(sig[0])
    if kind == "flow":
        x = x + (1 - float(sig[0])) * c0

    def denoise(z, s):
        return torch.full_like(z, c0) + 0.0 * z

    def flat_loss(img):  # zero gradient: Adam's update is exactly 0, only the recurrence acts
        return (img * 0.0).flatten(1).mean(1)

    seen = []
    guid = Guidance().add(GuidanceTerm("flat", flat_loss))
    sample_universal(denoise, x, sig, guidance=guid, decode=lambda z: z[:, :3], parameterization=param_of(kind),
                     settings=Settings(forward_strength=0.0, backward_steps=1, recurrence=3),
                     generator=torch.Generator().manual_seed(0), callback=lambda d: seen.append(d))
    assert len(seen) == len(sig) - 1
    n = x.numel()
    for i, d in enumerate(seen):
        s = float(sig[i])
        a = 1.0 if kind == "ve" else 1.0 - s
        r = (d["x"] - a * c0).double()
        assert float(r.var()) == pytest.approx(s * s, rel=6 * math.sqrt(2 / n)), f"step {i}"
        assert abs(float(r.mean())) < 6 * s / math.sqrt(n)


# --------------------------------------------------------------------------------------------------------------
# 3. guidance lowers the objective
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,settings,factor", [
    ("ve", Settings(forward_strength=3000.0), 0.75),
    ("ve", Settings(forward_strength=0.0, backward_steps=5), 0.6),
    ("flow", Settings(forward_strength=3000.0), 0.75),
    ("flow", Settings(forward_strength=0.0, backward_steps=5), 0.6),
])
def test_guidance_lowers_the_objective(kind, settings, factor):
    guid, loss = image_guidance()
    unguided = final_loss(run(kind, Settings(forward_strength=0.0), guidance=guid), loss)
    guided = final_loss(run(kind, settings, guidance=guid), loss)
    assert torch.all(guided < factor * unguided), (guided, unguided)


# --------------------------------------------------------------------------------------------------------------
# 4. recurrence count and bookkeeping
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_recurrence_counts(kind):
    k, m, n = 3, 2, 8
    settings = Settings(forward_strength=100.0, recurrence=k, backward_steps=m, start_percent=0.25,
                        end_percent=0.75)
    guid, _ = image_guidance()
    den, dec = Recorder(TinyDenoiser(kind)), CallCounter(TinyDecoder())
    progress, interrupts = [], CallCounter(lambda: None)
    stats = Stats()
    sig = sigmas_for(kind, n)
    run(kind, settings, guidance=guid, denoise=den, decode=dec, sigmas=sig, stats=stats,
        on_iteration=lambda done, total: progress.append((done, total)), interrupt=interrupts)
    guided_steps = [i for i in range(n) if 0.25 <= i / n < 0.75]
    assert guided_steps == [2, 3, 4, 5]
    expected_calls = len(guided_steps) * k + (n - len(guided_steps))
    assert den.calls == expected_calls == 16
    # σ seen by the denoiser: σ_i once outside, k times (re-noised back to σ_i) inside the window
    expected_sigmas = []
    for i in range(n):
        expected_sigmas += [float(sig[i])] * (k if i in guided_steps else 1)
    assert den.sigmas == expected_sigmas
    assert stats.steps == n
    assert stats.iterations == expected_calls
    assert stats.denoiser_calls == expected_calls
    assert stats.denoiser_grad_calls == len(guided_steps) * k == sum(den.grad_enabled)
    # one decoder pass per forward-guidance iteration + one per backward step, nothing duplicated
    assert dec.calls == stats.decoder_calls == stats.objective_calls == len(guided_steps) * k * (1 + m)
    assert sum(t["phase"] == "forward" for t in stats.trace) == len(guided_steps) * k
    total = total_iterations(n, guid, settings)
    assert total == expected_calls
    assert progress == [(i + 1, total) for i in range(total)]
    assert interrupts.calls == expected_calls + len(guided_steps) * k * m


def test_total_iterations():
    guid, _ = image_guidance(start=0.5)
    assert total_iterations(10, guid, Settings(recurrence=4)) == 5 * 4 + 5
    assert total_iterations(10, image_guidance()[0], Settings(recurrence=4)) == 40
    assert total_iterations(10, None, Settings(recurrence=4)) == 10
    assert total_iterations(10, Guidance(), Settings(recurrence=4)) == 10
    assert total_iterations(10, guid, Settings(recurrence=4, forward_strength=0.0)) == 10
    assert total_iterations(10, guid, Settings(recurrence=4, forward_strength=0.0, backward_steps=1)) == 25


# --------------------------------------------------------------------------------------------------------------
# 5. determinism
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_determinism_per_seed(kind):
    guid, _ = image_guidance()
    den, dec = TinyDenoiser(kind), TinyDecoder()  # (module init draws from the global RNG: do it first)
    nets = dict(guidance=guid, denoise=den, decode=dec)
    settings = Settings(forward_strength=1000.0, recurrence=3, backward_steps=2)
    state = torch.random.get_rng_state()
    a = run(kind, settings, gen_seed=42, **nets)
    b = run(kind, settings, gen_seed=42, **nets)
    assert torch.equal(a, b)
    # the re-noise comes from the given generator only, never from the global RNG
    assert torch.equal(torch.random.get_rng_state(), state)
    c = run(kind, settings, gen_seed=43, **nets)
    assert (a - c).abs().max() > 1e-2
    # k = 1 never draws noise: the generator's seed does not matter
    one = Settings(forward_strength=1000.0, recurrence=1, backward_steps=2)
    assert torch.equal(run(kind, one, gen_seed=1, **nets), run(kind, one, gen_seed=2, **nets))


# --------------------------------------------------------------------------------------------------------------
# 6. no autograd graph where nothing guides
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ve", "flow"])
@pytest.mark.parametrize("case", ["none", "empty", "term_window", "zero_weight", "zero_strength"])
def test_guidance_off_builds_no_graph(kind, case):
    guid, _ = image_guidance()
    settings = Settings(forward_strength=500.0, recurrence=2)
    if case == "none":
        guid = None
    elif case == "empty":
        guid = Guidance()
    elif case == "term_window":  # a term that would only start after the last step
        guid = image_guidance(start=0.95)[0]
    elif case == "zero_weight":
        guid = image_guidance(weight=0.0)[0]
    else:
        settings = Settings(forward_strength=0.0, recurrence=2)
    den = Recorder(TinyDenoiser(kind))
    stats = Stats()
    with torch.enable_grad():
        out = run(kind, settings, guidance=guid, denoise=den, stats=stats)
    assert den.calls == N_STEPS
    assert not any(den.grad_enabled) and not any(den.out_requires_grad)
    assert not out.requires_grad and out.grad_fn is None
    assert stats.denoiser_grad_calls == 0 and stats.decoder_calls == 0


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_graph_only_inside_the_window(kind):
    guid, _ = image_guidance()
    den = Recorder(TinyDenoiser(kind))
    settings = Settings(forward_strength=500.0, start_percent=0.5, jacobian=True)
    with torch.no_grad():  # even when the caller disabled grad, the guided steps must enable it
        out = run(kind, settings, guidance=guid, denoise=den)
    sig = sigmas_for(kind)
    expected = [i / N_STEPS >= 0.5 for i in range(N_STEPS)]
    assert den.grad_enabled == expected
    assert den.in_requires_grad == expected  # the gradient is taken w.r.t. x, through the denoiser
    assert den.out_requires_grad == expected
    assert den.sigmas == [float(s) for s in sig[:-1]]
    assert not out.requires_grad


# --------------------------------------------------------------------------------------------------------------
# 7. non-finite gradients
# --------------------------------------------------------------------------------------------------------------

class _BadGradRow(torch.autograd.Function):
    """Identity forward; the backward poisons the gradient of one sample of the batch."""

    @staticmethod
    def forward(ctx, image, row, value):
        ctx.row, ctx.value = row, value
        return image.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[ctx.row] = ctx.value
        return grad, None, None


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_nonfinite_gradient_skips_that_sample(caplog, value, mode):
    kind, bad = "ve", 1
    target = ImageLoss(target_image())
    guid = Guidance().add(GuidanceTerm("poisoned", lambda img: target(_BadGradRow.apply(img, bad, value))))
    if mode == "forward":
        settings = Settings(forward_strength=3000.0)
        expected_skips = N_STEPS
    else:
        settings = Settings(forward_strength=0.0, backward_steps=3)
        expected_skips = N_STEPS * 3
    den = TinyDenoiser(kind)
    unguided = run(kind, Settings(forward_strength=0.0), guidance=guid, denoise=den)
    stats = Stats()
    with caplog.at_level(logging.WARNING, logger="universal_guidance"):
        out = run(kind, settings, guidance=guid, denoise=den, stats=stats)
    assert torch.isfinite(out).all()
    # the poisoned sample got no update at all; the others were guided
    torch.testing.assert_close(out[bad], unguided[bad], rtol=0, atol=1e-6)
    for row in range(BATCH):
        if row != bad:
            assert (out[row] - unguided[row]).abs().max() > 1e-2
    # ... and the guided ones are closer to the target than unguided
    l_out, l_ref = final_loss(out, target), final_loss(unguided, target)
    assert all(l_out[r] < l_ref[r] for r in range(BATCH) if r != bad)
    assert stats.nonfinite_skips == expected_skips
    records = [r for r in caplog.records if r.name == "universal_guidance" and r.levelno == logging.WARNING]
    assert len(records) == 1
    assert "non-finite" in records[0].getMessage()


# --------------------------------------------------------------------------------------------------------------
# 8. windows, schedules, strength modes, no-Jacobian mode
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("term_window,settings_window,expected", [
    ((0.3, 0.7), (0.0, 1.0), [3, 4, 5, 6]),
    ((0.0, 1.0), (0.2, 0.5), [2, 3, 4]),
    ((0.0, 0.5), (0.3, 1.0), [3, 4]),
    ((0.9, 1.0), (0.0, 1.0), [9]),
])
def test_windows(term_window, settings_window, expected):
    n, k = 10, 2
    guid, _ = image_guidance(start=term_window[0], end=term_window[1])
    settings = Settings(forward_strength=100.0, recurrence=k, start_percent=settings_window[0],
                        end_percent=settings_window[1])
    sig = sigmas_for("ve", n)
    den = Recorder(TinyDenoiser("ve"))
    stats = Stats()
    run("ve", settings, guidance=guid, denoise=den, sigmas=sig, stats=stats)
    guided_sigmas = sorted({s for s, g in zip(den.sigmas, den.grad_enabled) if g}, reverse=True)
    assert guided_sigmas == [float(sig[i]) for i in expected]
    assert stats.denoiser_grad_calls == len(expected) * k
    assert den.calls == total_iterations(n, guid, settings) == len(expected) * k + n - len(expected)


def test_each_term_is_evaluated_only_in_its_window():
    n = 10
    target = ImageLoss(target_image())
    early, late = CallCounter(target), CallCounter(target)
    guid = (Guidance().add(GuidanceTerm("early", early, start_percent=0.0, end_percent=0.2))
            .add(GuidanceTerm("late", late, start_percent=0.8, end_percent=1.0)))
    den = Recorder(TinyDenoiser("ve"))
    run("ve", Settings(forward_strength=100.0), guidance=guid, denoise=den, sigmas=sigmas_for("ve", n))
    assert early.calls == 2 and late.calls == 2
    assert den.grad_enabled == [True, True] + [False] * 6 + [True, True]


def _shifts(kind: str, settings: Settings, n: int = N_STEPS):
    """Per step: (x_i, plain D(x_i), guided D'(x_i)) from a run with a *linear* model, decoder and loss, so that
    ∇ₓ loss at step i depends only on σ_i and the guidance shift is ``strength_i · unit(σ_i) · const``."""
    den = TinyDenoiser(kind, nl=0.0)
    dec = TinyDecoder(linear=True)
    w = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    guid = Guidance().add(GuidanceTerm("linear", lambda img: (img * w).flatten(1).mean(1)))
    sig = sigmas_for(kind, n)
    seen = []
    run(kind, settings, guidance=guid, denoise=den, decode=dec, sigmas=sig, callback=seen.append)
    out = []
    for i, d in enumerate(seen):
        with torch.no_grad():
            plain = den(d["x"], torch.full((d["x"].shape[0],), float(sig[i])))
        out.append((d["x"], plain, d["denoised"]))
    return sig, out


@pytest.mark.parametrize("window", [(0.0, 1.0), (0.25, 0.75)])
def test_strength_schedules(window):
    n = N_STEPS
    base = dict(forward_strength=100.0, start_percent=window[0], end_percent=window[1])
    _, const = _shifts("ve", Settings(schedule="constant", **base))
    _, lin = _shifts("ve", Settings(schedule="linear", **base))
    _, cos = _shifts("ve", Settings(schedule="cosine", **base))
    guided = [i for i in range(n) if window[0] <= i / n < window[1] or (window[1] >= 1 and i / n >= window[0])]

    def norm(step):  # ‖D - D'‖ over the batch
        return float((step[1] - step[2]).norm())

    for i in range(n):
        if i not in guided:
            assert norm(const[i]) == norm(lin[i]) == norm(cos[i]) == 0.0
            continue
        frac = (i / n - window[0]) / (window[1] - window[0])
        assert norm(const[i]) > 0
        assert norm(lin[i]) / norm(const[i]) == pytest.approx(1.0 - frac, rel=1e-4, abs=1e-6)
        assert norm(cos[i]) / norm(const[i]) == pytest.approx(0.5 * (1 + math.cos(math.pi * frac)), rel=1e-4,
                                                              abs=1e-6)
    last = guided[-1]
    assert norm(lin[last]) < 0.5 * norm(const[last])
    assert norm(lin[guided[0]]) == pytest.approx(norm(const[guided[0]]), rel=1e-5)


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_paper_strength_unit(kind):
    """Paper mode, linear everything: D - D' = s0 · b²/a · ∇ₓ loss, checked against an independent gradient."""
    s0 = 300.0
    sig, steps = _shifts(kind, Settings(forward_strength=s0, step_bound=0.0, x0_bound=0.0))  # the rule, unbounded
    den = TinyDenoiser(kind, nl=0.0)
    dec = TinyDecoder(linear=True)
    w = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    for i, (x, plain, guided) in enumerate(steps):
        s = float(sig[i])
        a = 1.0 if kind == "ve" else 1.0 - s
        leaf = x.clone().requires_grad_(True)
        loss = (dec(den(leaf, torch.full((x.shape[0],), s))) * w).flatten(1).mean(1).sum()
        (grad,) = torch.autograd.grad(loss, leaf)
        expected = s0 * s * s / max(a, A_MIN) * grad
        if a > 0:  # (at σ = 1 a flow model's exact denoiser is constant in x: zero Jacobian, zero shift)
            assert float(expected.abs().max()) > 1e-3  # a real shift, at every step
        # float32 rounding of D' = D - shift is relative to |D|, not to the shift
        torch.testing.assert_close(plain - guided, expected, rtol=1e-4, atol=1e-6 * float(plain.abs().max()))


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_normalized_strength(kind):
    """‖Δε‖ = s0·‖ε̂‖ per image at every guided step, so the shift scales with s0."""
    first_shift = {}
    # (flow at σ = 1: the exact linear denoiser has zero Jacobian, nothing to normalize; guide from step 1)
    first = 0 if kind == "ve" else 1
    for s0 in (0.05, 0.2):
        sig, steps = _shifts(kind, Settings(forward_strength=s0, strength_mode="normalized",
                                            start_percent=first / N_STEPS, step_bound=0.0, x0_bound=0.0))
        checked = 0
        for i, (x, plain, guided) in enumerate(steps):
            s = float(sig[i])
            a = 1.0 if kind == "ve" else 1.0 - s
            if i < first:
                assert torch.equal(plain, guided)
                continue
            eps = (x - a * plain) / s
            d_eps = a * (plain - guided) / s
            r = d_eps.flatten(1).norm(dim=1) / eps.flatten(1).norm(dim=1)
            torch.testing.assert_close(r, torch.full_like(r, s0), rtol=1e-3, atol=0)
            checked += 1
        assert checked == N_STEPS - first
        x, plain, guided = steps[first]  # the first guided step starts from the same x in both runs
        first_shift[s0] = (plain - guided).flatten(1).norm(dim=1)
    torch.testing.assert_close(first_shift[0.2], 4.0 * first_shift[0.05], rtol=1e-4, atol=0)
    assert float(first_shift[0.05].min()) > 0


def test_normalized_strength_lowers_the_loss():
    guid, loss = image_guidance()
    unguided = final_loss(run("ve", Settings(forward_strength=0.0), guidance=guid), loss)
    weak = final_loss(run("ve", Settings(forward_strength=0.05, strength_mode="normalized"), guidance=guid), loss)
    strong = final_loss(run("ve", Settings(forward_strength=0.3, strength_mode="normalized"), guidance=guid), loss)
    assert torch.all(weak < unguided) and torch.all(strong < 0.75 * unguided) and torch.all(strong < weak)


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_no_jacobian_mode(kind):
    guid, loss = image_guidance()
    den = Recorder(TinyDenoiser(kind))
    stats = Stats()
    unguided = final_loss(run(kind, Settings(forward_strength=0.0), guidance=guid), loss)
    sig = sigmas_for(kind)
    if kind == "flow":  # a(1) = 0: the b²/a unit is capped at 1/A_MIN there; start guiding one step later
        settings = Settings(forward_strength=300.0, jacobian=False, start_percent=1 / N_STEPS)
    else:
        settings = Settings(forward_strength=300.0, jacobian=False)
    with torch.enable_grad():
        out = run(kind, settings, guidance=guid, denoise=den, sigmas=sig, stats=stats)
    guided = final_loss(out, loss)
    assert torch.all(guided < 0.85 * unguided), (guided, unguided)
    assert den.calls == N_STEPS and not any(den.grad_enabled) and not any(den.out_requires_grad)
    assert stats.denoiser_grad_calls == 0
    assert stats.decoder_calls == total_iterations(N_STEPS, guid, settings) - (1 if kind == "flow" else 0)


def test_backward_sgd_and_early_stop():
    guid, loss = image_guidance()
    x = start_latent("ve", sigmas_for("ve"))
    unguided = run("ve", Settings(forward_strength=0.0), guidance=guid, x=x)
    sgd = run("ve", Settings(forward_strength=0.0, backward_steps=5, backward_optimizer="sgd", backward_lr=200.0),
              guidance=guid, x=x)
    assert torch.all(final_loss(sgd, loss) < 0.8 * final_loss(unguided, loss))
    # every sample already below the early-stop threshold: the inner loop stops before its first update
    stats = Stats()
    stopped = run("ve", Settings(forward_strength=0.0, backward_steps=5, backward_early_stop=1e9), guidance=guid,
                  x=x, stats=stats)
    assert torch.equal(stopped, unguided)
    assert stats.decoder_calls == N_STEPS
    stats = Stats()
    run("ve", Settings(forward_strength=0.0, backward_steps=5, backward_early_stop=1e-9), guidance=guid, x=x,
        stats=stats)
    assert stats.decoder_calls == N_STEPS * 5


def test_backward_early_stop_is_per_sample():
    """One step σ = 1 → 0 with a zero denoiser: the output *is* Δ. Sample 0's target is 0.15 away: Adam's first
    step (≈ lr = 0.1 per element) brings its loss under the threshold, so it must stop right there and keep Δ = 0.1
    (no drift from Adam's momentum afterwards); sample 1's target is far, it keeps going for all m steps."""
    targets = torch.tensor([0.15, 5.0]).view(2, 1, 1, 1)

    def loss(img):
        return ((img - targets) ** 2).flatten(1).mean(1)

    guid = Guidance().add(GuidanceTerm("per_sample", loss))
    stats = Stats()
    out = sample_universal(lambda x, s: 0.0 * x, torch.zeros(2, 4, 4, 4), torch.tensor([1.0, 0.0]), guidance=guid,
                           decode=lambda z: z[:, :3], parameterization=VE, stats=stats,
                           settings=Settings(forward_strength=0.0, backward_steps=10, backward_lr=0.1,
                                             backward_early_stop=0.01))
    torch.testing.assert_close(out[0, :3], torch.full_like(out[0, :3], 0.1), rtol=0, atol=1e-6)
    assert float(out[1, :3].min()) > 0.9  # ten Adam steps of ≈ 0.1 towards 5
    assert torch.equal(out[:, 3], torch.zeros_like(out[:, 3]))  # channel 3 does not reach the loss
    assert stats.decoder_calls == 10


# --------------------------------------------------------------------------------------------------------------
# 9. validation
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(recurrence=0), r"recurrence \(k\) must be at least 1, got 0"),
    (dict(backward_steps=-1), r"backward_steps \(m\)"),
    (dict(strength_mode="polyak-ish"), r"strength_mode must be one of .*'polyak-ish'"),
    (dict(schedule="exp"), r"schedule must be one of .*'exp'"),
    (dict(backward_optimizer="lbfgs"), r"backward_optimizer must be one of .*'lbfgs'"),
    (dict(forward_strength=-1.0), r"forward_strength must be a finite number >= 0"),
    (dict(forward_strength=float("nan")), r"forward_strength must be a finite number"),
    (dict(forward_strength=float("inf")), r"forward_strength must be a finite number"),
    (dict(backward_steps=2, backward_lr=0.0), r"backward_lr must be > 0"),
    (dict(start_percent=0.6, end_percent=0.4), r"sampler window: start_percent \(0.6\) must be smaller"),
    (dict(start_percent=0.5, end_percent=0.5), r"start_percent \(0.5\) must be smaller than end_percent"),
    (dict(start_percent=-0.1), r"must lie in \[0, 1\]"),
    (dict(end_percent=1.5), r"must lie in \[0, 1\]"),
])
def test_settings_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Settings(**kwargs)


def test_other_validation():
    with pytest.raises(ValueError, match=r"guidance term 'face'.*must be smaller"):
        GuidanceTerm("face", lambda img: img.mean((1, 2, 3)), start_percent=0.8, end_percent=0.2)
    with pytest.raises(ValueError, match="unknown parameterization 'vp'"):
        Parameterization("vp")
    with pytest.raises(ValueError, match="unknown image loss 'l3'"):
        ImageLoss(target_image(), kind="l3")
    with pytest.raises(ValueError, match="mask is empty"):
        ImageLoss(target_image(), mask=torch.zeros(1, 1, 16, 16))
    Settings(backward_steps=0, backward_lr=0.0)  # lr is irrelevant without backward steps


@pytest.mark.parametrize("bad_loss,shape", [
    (lambda img: img.mean(), "()"),
    (lambda img: img.mean((2, 3)), r"\(4, 3\)"),
    (lambda img: img.mean((1, 2, 3))[:1], r"\(1,\)"),
])
def test_wrong_shaped_loss_names_the_term(bad_loss, shape):
    guid = image_guidance()[0].add(GuidanceTerm("my_broken_term", bad_loss))
    with pytest.raises(ValueError, match=rf"guidance term 'my_broken_term' returned a loss of shape {shape}"):
        run("ve", Settings(forward_strength=10.0), guidance=guid)


# --------------------------------------------------------------------------------------------------------------
# 10. interrupt
# --------------------------------------------------------------------------------------------------------------

class Interrupted(Exception):
    pass


class Interrupter:
    def __init__(self, after: int | None):
        self.after, self.calls = after, 0

    def __call__(self):
        self.calls += 1
        if self.after is not None and self.calls >= self.after:
            raise Interrupted(f"stop at call {self.calls}")


def test_interrupt_is_polled_in_outer_and_backward_loops():
    n, m = 2, 5
    sig = sigmas_for("ve", n)
    guid, _ = image_guidance()
    settings = Settings(forward_strength=10.0, backward_steps=m)
    never = Interrupter(None)
    run("ve", settings, guidance=guid, sigmas=sig, interrupt=never)
    assert never.calls == n * (1 + m)
    # only n = 2 outer iterations exist: the 4th poll can only come from inside step 0's backward loop
    stop, den, dec = Interrupter(4), Recorder(TinyDenoiser("ve")), CallCounter(TinyDecoder())
    with pytest.raises(Interrupted, match="stop at call 4"):
        run("ve", settings, guidance=guid, sigmas=sig, interrupt=stop, denoise=den, decode=dec)
    assert stop.calls == 4 and den.calls == 1
    assert dec.calls == 1 + 2  # forward-guidance pass + 2 completed backward steps
    # the first poll happens before any network evaluation
    stop, den = Interrupter(1), Recorder(TinyDenoiser("ve"))
    with pytest.raises(Interrupted):
        run("ve", settings, guidance=guid, sigmas=sig, interrupt=stop, denoise=den)
    assert den.calls == 0


def test_interrupt_is_polled_per_recurrence():
    n, k = 4, 3
    guid, _ = image_guidance()
    settings = Settings(forward_strength=10.0, recurrence=k)
    never = Interrupter(None)
    run("ve", settings, guidance=guid, sigmas=sigmas_for("ve", n), interrupt=never)
    assert never.calls == n * k
    stop, den = Interrupter(5), Recorder(TinyDenoiser("ve"))
    with pytest.raises(Interrupted):
        run("ve", settings, guidance=guid, sigmas=sigmas_for("ve", n), interrupt=stop, denoise=den)
    assert den.calls == 4
