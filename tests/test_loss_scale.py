"""The engine's half-precision safety, on tiny functions with known gradients: dynamic loss scaling (a scaled gradient
that overflows fp16 is recomputed at a lower scale, only an unscaled overflow skips the update), the starting scale
divided by the term weights, the notes of a run whose every update was skipped or whose term windows hold no step,
and a latent that becomes non-finite being an error."""
from __future__ import annotations

import math

import pytest
import torch

from guidance import VE, Guidance, GuidanceTerm, Settings, Stats, sample_universal
from guidance.sampler import LOSS_SCALE_BACKOFFS, NonFiniteOutputError, idle_terms, initial_loss_scale

SIGMAS = torch.tensor([4.0, 2.0, 1.0, 0.0])


def denoise(x, sigma):
    """The posterior mean of x0 ~ N(0, 1): D(x, σ) = x / (1 + σ²)."""
    return x / (1.0 + sigma.view(-1, 1, 1, 1) ** 2)


def half_decode(z):
    """An "fp16 decoder": the backward pass through the cast carries the gradient in fp16, as a half VAE's does."""
    return z.to(torch.float16).to(torch.float32)[:, :3]


def linear_guidance(row_weights, weight=1.0):
    """loss_b = c_b · Σ image_b: the gradient w.r.t. the decoded image is c_b everywhere (scaled: c_b · scale)."""
    c = torch.tensor(row_weights, dtype=torch.float32)
    return Guidance().add(GuidanceTerm("linear", lambda img: c * img.flatten(1).sum(1), weight=weight))


def run(guidance, *, loss_scale, settings=Settings(forward_strength=0.01, jacobian=False, max_step=0.0),
        stats=None, den=denoise, batch=2):
    x = torch.randn((batch, 4, 4, 4), generator=torch.Generator().manual_seed(0)) * float(SIGMAS[0])
    return sample_universal(den, x, SIGMAS, guidance=guidance, decode=half_decode, settings=settings,
                            parameterization=VE, generator=torch.Generator().manual_seed(1), stats=stats,
                            loss_scale=loss_scale)


def test_scaled_overflow_is_recomputed_at_half_the_scale_not_skipped():
    """Row 0's gradient (10 · 1024) fits fp16, row 1's (100 · 1024) overflows: row 1 is recomputed at 512 in the same
    step, row 0 keeps its first gradient; both equal the exact gradient, nothing is skipped, 512 holds afterwards."""
    guidance = linear_guidance([10.0, 100.0])
    exact = run(guidance, loss_scale=1.0)
    stats = Stats()
    out = run(guidance, loss_scale=1024.0, stats=stats)
    torch.testing.assert_close(out, exact, rtol=0, atol=0)
    assert stats.skipped_updates == 0 and stats.nonfinite_skips == 0 and stats.updates == 2 * 3
    assert stats.loss_scale_backoffs == 1 and stats.loss_scale_start == 1024.0 and stats.loss_scale == 512.0
    unguided = run(guidance, loss_scale=1.0, settings=Settings(forward_strength=0.0))
    assert (out - unguided).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # both rows were guided
    assert any("fp16 loss scale lowered from 1024 to 512" in line for line in stats.notes(Settings()))


def test_unscaled_overflow_skips_every_update_and_says_so():
    """A gradient of 1e5 per pixel does not fit fp16 even unscaled: after the halvings and one unscaled try the
    update is skipped and counted; the run's notes say every update was skipped and the output is unguided."""
    guidance = linear_guidance([1.0e5, 1.0e5])
    stats = Stats()
    out = run(guidance, loss_scale=1024.0, stats=stats)
    unguided = run(guidance, loss_scale=1.0, settings=Settings(forward_strength=0.0))
    torch.testing.assert_close(out, unguided, rtol=0, atol=0)
    assert stats.updates == stats.skipped_updates == 2 * 3 and stats.every_update_skipped
    assert stats.loss_scale_backoffs == LOSS_SCALE_BACKOFFS + 1 and stats.loss_scale == 1.0  # then unscaled
    notes = stats.notes(Settings())
    assert any(line.startswith("every guidance update was skipped (6 of 6: non-finite gradients), so the output "
                               "is unguided") for line in notes), notes


def test_some_skipped_updates_are_counted_not_called_all():
    stats = Stats()
    run(linear_guidance([1.0, 1.0e5]), loss_scale=1.0, stats=stats)
    assert stats.updates == 6 and stats.skipped_updates == 3 and not stats.every_update_skipped
    assert stats.notes(Settings()) == ["3 guidance update(s) skipped for non-finite gradients"]


@pytest.mark.parametrize("weights,expected", [([1.0], 1024.0), ([0.5], 1024.0), ([100.0], 8.0), ([1000.0], 1.0),
                                              ([20000.0], 1.0), ([1.0, -3.0e4], 1.0), ([0.0, 3.0], 256.0)])
def test_initial_scale_is_divided_by_the_largest_weight(weights, expected):
    guidance = Guidance()
    for i, w in enumerate(weights):
        guidance = guidance.add(GuidanceTerm(f"t{i}", lambda img: img.flatten(1).sum(1), weight=w))
    assert initial_loss_scale(1024.0, guidance) == expected
    assert initial_loss_scale(1.0, guidance) == 1.0
    assert math.log2(expected).is_integer()


def test_run_starts_from_the_weighted_scale():
    """A face-like weight (20000) already scales the loss: the run starts unscaled and nothing overflows."""
    stats = Stats()
    run(linear_guidance([1.0, 1.0], weight=20000.0), loss_scale=1024.0, stats=stats)
    assert stats.loss_scale_start == 1.0 and stats.loss_scale_backoffs == 0 and stats.skipped_updates == 0


@pytest.mark.parametrize("guided", [True, False])
def test_nonfinite_latent_is_an_error(guided):
    """A denoiser that returns NaN from the second step on: the run stops there with an error naming the step and
    what to do, instead of returning a NaN latent (a black image)."""
    def nan_after_first(x, sigma):
        out = denoise(x, sigma)
        return out * float("nan") if float(sigma[0]) < 4.0 else out

    settings = Settings(forward_strength=0.01 if guided else 0.0, jacobian=False)
    with pytest.raises(NonFiniteOutputError) as err:
        run(linear_guidance([1.0, 1.0]), loss_scale=1.0, settings=settings, den=nan_after_first)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "non-finite (NaN or inf) at step 2 of 3 for 2 of 2 image(s)" in msg, msg
    assert ("after guidance" if guided else "without guidance") in msg
    assert "max_step" in msg and "forward_strength" in msg and "bf16 or fp32" in msg


def _term(name, start, end, weight=1.0):
    return GuidanceTerm(name, lambda img: img.flatten(1).sum(1), weight=weight, start_percent=start,
                        end_percent=end)


def test_terms_whose_window_holds_no_step_are_named():
    guidance = (Guidance().add(_term("late", 0.9, 1.0)).add(_term("early", 0.0, 0.4))
                .add(_term("off", 0.9, 1.0, weight=0.0)))
    lines = idle_terms(2, guidance, Settings())
    assert lines == ["guidance term 'late' guided no step: its window 0.9–1 holds none of this run's 2 step(s), "
                     "which start at 0, 0.5 of the run; widen its window (start_percent ≤ 0.5) or use more steps"]
    assert idle_terms(10, guidance, Settings()) == []  # 0.9 is a step position of a 10-step run
    assert idle_terms(2, guidance, Settings(forward_strength=0.0)) == []  # guidance off: nothing was asked for
    # the term's own window holds step 0, the sampler's window only step 1
    lines = idle_terms(2, Guidance().add(_term("early", 0.0, 0.4)), Settings(start_percent=0.5))
    assert lines == ["guidance term 'early' guided no step: its window 0–0.4 and the sampler's window 0.5–1 share "
                     "none of this run's 2 step(s), which start at 0, 0.5 of the run; widen one of the windows or "
                     "use more steps"]


def test_idle_term_is_in_the_run_notes():
    stats = Stats()
    guidance = Guidance().add(_term("late", 0.9, 1.0)).add(_term("all", 0.0, 1.0))
    run(guidance, loss_scale=1.0, stats=stats)
    notes = stats.notes(Settings())
    assert len(notes) == 1 and notes[0].startswith("guidance term 'late' guided no step"), notes
