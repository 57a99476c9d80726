"""The schedule-safe bound of a forward-guidance update (``Settings.step_bound`` / ``x0_bound``), engine alone.

A strength sized against the current noise level moves the *next* sample by ``(σ_i/σ_{i+1} − 1)·s`` of its own
noise level: on a cosine schedule from σ 316 the first step's ratio is about 11, so ``normalized`` s = 0.1 moves
x_1 by about its whole noise level. The bound scales such an update down, in every strength mode; where it does
not act the run is bit-identical to the unbounded rule. Displacements are measured here from the outside: at each
step, the next sample from the guided x̂0 against the next sample from the plain denoiser at the same x."""
from __future__ import annotations

import math

import pytest
import torch

from guidance import VE, FLOW, Guidance, GuidanceTerm, Settings, Stats, sample_universal
from guidance.sampler import STRENGTH_MODES

SHAPE = (2, 4, 8, 8)


def cosine_sigmas(n: int, sigma_max: float = 316.0, sigma_min: float = 0.03) -> torch.Tensor:
    """A cosine schedule (ᾱ = cos²θ, σ = tan θ) with θ uniform in the steps, from σ_max to σ_min, then 0."""
    hi, lo = math.atan(sigma_max), math.atan(sigma_min)
    return torch.tensor([math.tan(hi + (lo - hi) * i / (n - 1)) for i in range(n)] + [0.0])


def sd_sigmas(n: int) -> torch.Tensor:
    """SD1.x's scaled-linear schedule at uniformly spaced timesteps (as ComfyUI's "normal" scheduler), then 0."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    sig = ((1 - ac) / ac).sqrt()
    t = torch.linspace(999, 0, n).round().long()
    return torch.cat([sig[t].float(), torch.zeros(1)])


def denoiser(kind: str):
    """Posterior mean of unit-variance Gaussian data plus a small nonlinearity (a Jacobian that is not a multiple
    of the identity); the latents are in the unit-variance space the engine samples in."""
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.2)
        conv.bias.zero_()

    def den(x, sigma):
        s = sigma.view(-1, 1, 1, 1).to(x.dtype)
        a = torch.ones_like(s) if kind == "ve" else 1.0 - s
        return a / (a * a + s * s) * x + 0.1 * torch.tanh(conv(x))

    return den


def guidance(weight: float = 1.0) -> Guidance:
    target = torch.linspace(-1, 1, 8).view(1, 1, 1, 8).expand(1, 3, 8, 8)
    return Guidance().add(GuidanceTerm("image", lambda img: (img - target).pow(2).flatten(1).mean(1), weight))


def measured(kind: str, sigmas: torch.Tensor, settings: Settings, weight: float = 1.0):
    """(output, stats, per step: (RMS Δx_{i+1} / b(σ_{i+1}) or None at the last step, RMS Δx̂0))."""
    param = VE if kind == "ve" else FLOW
    den = denoiser(kind)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * (float(sigmas[0]) if kind == "ve" else 1.0)
    seen, stats = [], Stats()
    out = sample_universal(den, x, sigmas, guidance=guidance(weight), decode=lambda z: z[:, :3], settings=settings,
                           parameterization=param, callback=seen.append, stats=stats,
                           generator=torch.Generator().manual_seed(2))
    rows = []
    for i, d in enumerate(seen):
        sig, nxt = float(sigmas[i]), float(sigmas[i + 1])
        with torch.no_grad():
            plain = den(d["x"], torch.full((SHAPE[0],), sig))
        dx = param.step(d["x"], d["denoised"], sig, nxt) - param.step(d["x"], plain, sig, nxt)
        rms = lambda t: float(t.flatten(1).pow(2).mean(1).sqrt().max())  # noqa: E731 (worst image)
        rows.append((rms(dx) / param.b(nxt) if nxt > 0 else None, rms(d["denoised"] - plain)))
    return out, stats, rows


KAPPA, DELTA = 0.2, 20.0  # the defaults of Settings.step_bound and x0_bound
STRENGTHS = {"paper": 1.0e5, "normalized": 0.1, "polyak": 0.1, "polyak_loss": 1.0}


@pytest.mark.parametrize("mode", STRENGTH_MODES)
@pytest.mark.parametrize("kind,sigmas", [("ve", cosine_sigmas(50)), ("ve", cosine_sigmas(10)),
                                         ("flow", torch.cat([torch.linspace(0.98, 0.02, 10), torch.zeros(1)]))],
                         ids=["cosine316-50", "cosine316-10", "flow-10"])
def test_the_next_sample_moves_at_most_kappa_of_its_noise_level(mode, kind, sigmas):
    settings = Settings(step_bound_image=True, forward_strength=STRENGTHS[mode], strength_mode=mode)
    _, stats, rows = measured(kind, sigmas, settings)
    worst = max(r for r, _ in rows if r is not None)
    assert worst <= KAPPA * (1 + 1e-4), (mode, [round(r or 0, 3) for r, _ in rows])
    assert max(d for _, d in rows) <= DELTA * (1 + 1e-4)
    assert (settings.step_bound, settings.x0_bound) == (KAPPA, DELTA)
    # the bound acted (the check is not vacuous) and the run's notes say so, with the factor
    assert stats.bound_acted > 0 and stats.bound_min_scale < 1
    line = next(n for n in stats.notes(settings) if n.startswith("step bound"))
    assert f"acted on {stats.bound_acted} of {stats.bound_checked} updates" in line and "max shrink ×" in line


def test_without_the_bound_the_first_cosine_step_is_destructive():
    """What the bound prevents: normalized s = 0.1 at the first step of the σ-316 cosine schedule moves x_1 by
    about its noise level, and x̂0 by tens of data units."""
    unbounded = Settings(step_bound_image=True, forward_strength=0.1, strength_mode="normalized", step_bound=0.0, x0_bound=0.0)
    _, stats, rows = measured("ve", cosine_sigmas(50), unbounded)
    assert rows[0][0] > 0.8 and rows[0][1] > 20.0, rows[0]
    assert stats.bound_checked == stats.bound_acted == 0
    _, _, bounded = measured("ve", cosine_sigmas(50), Settings(step_bound_image=True, forward_strength=0.1, strength_mode="normalized"))
    assert bounded[0][0] <= KAPPA * (1 + 1e-4) and bounded[0][1] <= DELTA * (1 + 1e-4)


def test_on_sds_schedule_a_bound_that_does_not_act_changes_nothing():
    """SD's 50-step schedule at normalized s = 0.1: the bound is checked on every update, acts on none, and the
    output equals the unbounded rule's bit for bit."""
    sig = sd_sigmas(50)
    base = dict(forward_strength=0.1, strength_mode="normalized", end_percent=0.6)
    out, stats, rows = measured("ve", sig, Settings(step_bound_image=True, **base))
    ref, ref_stats, _ = measured("ve", sig, Settings(step_bound_image=True, **base, step_bound=0.0, x0_bound=0.0))
    assert torch.equal(out, ref)
    assert stats.bound_checked == 30 * SHAPE[0] and stats.bound_acted == 0 and ref_stats.bound_checked == 0
    assert max(r for r, _ in rows if r is not None) < KAPPA
    assert stats.bound_line(Settings(step_bound_image=True, **base)) == ("step bound (RMS Δx_next ≤ 0.2·σ_next, RMS Δx̂0 ≤ 20): acted on 0 "
                                                 "of 60 updates")
    assert not any(n.startswith("step bound") for n in stats.notes(Settings(step_bound_image=True, **base)))


def test_the_x0_bound_caps_the_clean_prediction_in_data_units_also_at_the_last_step():
    """x0_bound = 0.5: every update moves x̂0 by at most 0.5 RMS, the last one (σ_next = 0, where the σ-relative
    bound has no noise level to compare with) included; the notes count the updates it shrank."""
    settings = Settings(step_bound_image=True, forward_strength=0.3, strength_mode="normalized", x0_bound=0.5)
    _, stats, rows = measured("ve", cosine_sigmas(10), settings)
    assert max(d for _, d in rows) <= 0.5 * (1 + 1e-4) and rows[-1][1] > 0
    assert stats.bound_x0_acted > 0 and f"{stats.bound_x0_acted} by the x̂0 bound" in stats.bound_line(settings)
    _, _, free = measured("ve", cosine_sigmas(10), Settings(step_bound_image=True, forward_strength=0.3, strength_mode="normalized",
                                                            x0_bound=0.0))
    assert max(d for _, d in free) > 1.0  # without it the same run moves x̂0 further


def test_max_step_zero_switches_every_bound_off():
    """``max_step = 0`` is the paper's rule as written (the official-code reproductions use it)."""
    sig = cosine_sigmas(10)
    off = Settings(step_bound_image=True, forward_strength=0.1, strength_mode="normalized", max_step=0.0)
    ref = Settings(step_bound_image=True, forward_strength=0.1, strength_mode="normalized", max_step=0.0, step_bound=0.0, x0_bound=0.0)
    out, stats, _ = measured("ve", sig, off)
    assert torch.equal(out, measured("ve", sig, ref)[0]) and stats.bound_checked == 0


@pytest.mark.parametrize("name", ["step_bound", "x0_bound"])
@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_bound_settings_are_validated(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0 \(0 = off\)"):
        Settings(**{name: value})


def test_image_terms_alone_are_bounded_by_max_step_only_by_default():
    """κ applies where a self-guidance term is active; an image term alone moves the sample as far as max_step
    lets it (its purpose), unless ``step_bound_image`` is set."""
    sig = cosine_sigmas(10)
    _, default_stats, rows = measured("ve", sig, Settings(forward_strength=0.1, strength_mode="normalized"))
    assert max(r for r, _ in rows if r is not None) > KAPPA
    assert default_stats.bound_acted == default_stats.bound_x0_acted  # only the x̂0 sanity cap, never κ
    _, image_stats, _ = measured("ve", sig, Settings(forward_strength=0.1, strength_mode="normalized",
                                                     step_bound_image=True))
    assert image_stats.bound_acted > image_stats.bound_x0_acted
