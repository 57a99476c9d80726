"""The Universal Guidance sampler loop (Bansal et al. 2023, Algorithm 1) in ComfyUI's σ-form.

Per step ``σ_i → σ_{i+1}``, repeated ``k`` times (self-recurrence) while guidance is active:

1. Forward guidance: ``D = denoise(x, σ)``, ``∇ = ∇ₓ loss(decode(D))`` through decoder *and* denoiser, then
   ``D' = D - s·unit(σ)·∇`` (``unit = b²/a``: the paper's ``s(t) = s0·sqrt(1-ᾱ_t)`` rule, see ``Settings``).
2. Backward guidance: ``Δ = argmin loss(decode(D' + Δ))`` by ``m`` steps of Adam/SGD; ``D'' = D' + Δ``.
3. First-order step (Euler/DDIM) from ``σ_i`` to ``σ_{i+1}`` with ``D''``.
4. Unless this was the last repeat: re-noise back up to ``σ_i`` and go to 1.

Outside guidance (no active term, or outside the window) the step is a plain Euler/DDIM step under
``torch.no_grad()``: no autograd graph, the same cost as an unguided sampler (but for the twin below).

Internal terms (self-guidance, see ``selfguidance``) are evaluated on what the denoiser captured in the forward
pass of step 1, so a guided iteration still costs one denoiser forward+backward; the decoder runs only when an image
term is active. Internal terms need the Jacobian (they have no meaning w.r.t. x̂0 alone) and take no part in
backward guidance, which optimizes x̂0 through the decoder. Their references cost extra no-grad denoiser forwards
(``_References``): a reference latent noised to each σ, or an inverted image's trajectory, one per guided step at
which a term needs it; the unguided twin trajectory from the same noise (``"original"``) one per step from the
first step to the last step that needs it, guided or not — it is stepped alongside from the start, so every
unguided step before the window costs a second call — with a guided step's capture serving to step it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .augment import Smoothing, noise_fraction
from .inversion import inversion_start
from .objective import check_window, window_contains
from .parameterization import A_MIN, Parameterization

log = logging.getLogger("universal_guidance")

STRENGTH_MODES = ("paper", "normalized", "polyak", "polyak_loss")
SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adam", "sgd", "polyak")


@dataclass(frozen=True)
class Settings:
    """Every knob of the sampler, with its unit.

    forward_strength (s0): ``"paper"`` mode: ``D' = D - s0·(b²/a)·∇ₓ loss`` — for SD1.x/XL (VE) this is
        ``s0·σ²·∇``, the same number as the official code's ``s(t) = s0·sqrt(1-ᾱ_t)`` on ``ε``.
        ``"normalized"`` mode: the shift of the predicted noise has norm ``s0·‖ε̂‖`` per image (so s0 = 0.1
        means "move ε by 10 % of its norm"), whatever the loss scale.
        ``"polyak"`` (Shen et al. 2024, Alg. 2, as their code): the noise moves by ``ρ·∇`` with
        ``ρ = s0·‖ε̂‖/‖∇‖²`` (ρ = 0 where ‖∇‖ < 1e-6): a step of length ``s0·‖ε̂‖/‖∇‖``, longer where the gradient
        is flat. ``"polyak_loss"`` (the classical Polyak step, f* = the terms' floor): ``x̂0`` moves by
        ``s0·(L − f*)/‖∇‖²·∇`` — with s0 = 1 it lands on the minimizer of a loss linear in x̂0.
    schedule: multiplies s0 over the guidance window: ``constant``, ``linear`` (1 → 0), ``cosine`` (1 → 0).
    recurrence (k): each guided step is run k times, re-noising in between (k = 1: no recurrence).
    backward_steps (m): inner optimization steps on ``Δx̂0`` (0 disables backward guidance).
    backward_lr: learning rate of those steps, in latent units per step.
    backward_optimizer: ``adam``, ``sgd``, or ``polyak`` (``Δ ← Δ − lr·(L − f*)/‖∇‖²·∇``).
    backward_early_stop: a sample stops its inner loop once its loss is below this value (0: never).
    start_percent / end_percent: guide the steps whose index / total lies in [start, end).
    jacobian: True back-propagates through the denoiser (paper). False takes the gradient w.r.t. ``x̂0`` only
        (MPGD-style; about half the cost), using the same strength unit.
    smoothing (σ̄), smoothing_samples (K), smoothing_reduction: TFG's implicit dynamics — every image term is
        evaluated on K copies of the decoded image plus Gaussian noise of std σ̄·sqrt(1 − ᾱ(σ)) (image units,
        [0, 1]) and the K losses are averaged (``mean``) or log-mean-exp'ed (``logmeanexp``, TFG). One decode.
    max_step: bound of a forward-guidance update: the predicted noise moves by at most ``max_step·‖ε̂‖`` per
        image (capped updates are counted in the run's summary), so no strength pushes the latent to magnitudes
        a half-precision decoder cannot hold. 0: no bound on an update at all (this one and the two below: the
        paper's rule as written).
    step_bound (κ): the schedule-safe bound of a forward-guidance update, in every strength mode. The update of
        x̂0 moves the next sample by ``Δx_{i+1} = (a(σ_{i+1}) − b(σ_{i+1})·a(σ_i)/b(σ_i))·Δx̂0`` (``(1 −
        σ_{i+1}/σ_i)·Δx̂0`` for both families); it is scaled down (never skipped) so that ``RMS(Δx_{i+1}) ≤
        κ·b(σ_{i+1})``: a fraction of the next sample's own noise level, whatever the schedule and step count.
        Without it a strength sized against ``σ_i`` moves the next sample by ``(σ_i/σ_{i+1} − 1)·s`` of its noise
        level: 0.13·s on SD's 50-step schedule, 8.9·s on a cosine schedule from σ 316, hundreds·s at the first
        step of a zero-terminal-SNR schedule. κ = 0.2 lies above what the shapes benchmark's headline rows reach
        (Move at s = 0.1: ≤ 0.013; appearance at s = 1: ≤ 0.13) and, were the displacement unstructured, would
        raise the next sample's effective noise level by at most √(1 + κ²) − 1 = 2 %; it acts on few-step
        schedules' last steps, where σ_i/σ_{i+1} is large. Not applied at the last step (σ_{i+1} = 0). 0: off.
        It applies to the steps where a self-guidance (internal) term is active: those edit the layout the next
        sample carries, which a move of a noise level or more destroys. Image terms alone are bounded by
        ``max_step`` only — moving the sample far towards a target image is what they are for, and κ = 0.2 would
        take most of their effect at few steps (a 3-step image-guided tiny SD1.5 test: loss ratio 0.73 → 0.99);
        ``step_bound_image`` True applies κ to them as well.
    x0_bound (δ): ``RMS(Δx̂0) ≤ δ`` in data units (the latents every supported family samples in are scaled to
        about unit variance): a sanity cap that holds whatever σ is, also at the last step, which κ does not
        bound. δ = 20 — far outside any image — acts only on absurd updates (e.g. x̂0 moved by 30 data units at
        a cosine schedule's σ 316, where κ acts first anyway). A tighter δ is not a safe default: at the
        shapes model's first steps (σ ≈ 15) appearance transfer at ``normalized`` s = 1 moves x̂0 by up to ~15
        RMS, and δ = 2 halved the objects it recoloured (0.58 → 0.29) and kept (0.54 → 0.25; 24 scenes). 0: off.
        Updates shrunk by either bound are counted in the run's summary with the smallest factor applied.
        Backward guidance (which optimises x̂0 itself in latent units) is not bounded.
    """

    forward_strength: float = 1.0
    strength_mode: str = "paper"
    schedule: str = "constant"
    recurrence: int = 1
    backward_steps: int = 0
    backward_lr: float = 0.1
    backward_optimizer: str = "adam"
    backward_early_stop: float = 0.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    jacobian: bool = True
    smoothing: float = 0.0
    smoothing_samples: int = 0
    smoothing_reduction: str = "mean"
    max_step: float = 10.0
    step_bound: float = 0.2
    step_bound_image: bool = False
    x0_bound: float = 20.0

    def __post_init__(self):
        if self.strength_mode not in STRENGTH_MODES:
            raise ValueError(f"strength_mode must be one of {STRENGTH_MODES}, got {self.strength_mode!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.backward_optimizer not in OPTIMIZERS:
            raise ValueError(f"backward_optimizer must be one of {OPTIMIZERS}, got {self.backward_optimizer!r}")
        if self.recurrence < 1:
            raise ValueError(f"recurrence (k) must be at least 1, got {self.recurrence}")
        if self.backward_steps < 0:
            raise ValueError(f"backward_steps (m) must be 0 or more, got {self.backward_steps}")
        if not math.isfinite(self.forward_strength) or self.forward_strength < 0:
            raise ValueError(f"forward_strength must be a finite number >= 0, got {self.forward_strength}")
        if self.backward_steps and not self.backward_lr > 0:
            raise ValueError(f"backward_lr must be > 0 when backward_steps > 0, got {self.backward_lr}")
        check_window(self.start_percent, self.end_percent, "sampler window")
        Smoothing(self.smoothing, self.smoothing_samples, self.smoothing_reduction)  # validates
        if not math.isfinite(self.max_step) or self.max_step < 0:
            raise ValueError(f"max_step must be a finite number >= 0, got {self.max_step}")
        for name in ("step_bound", "x0_bound"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (0 = off), got {value}")

    @property
    def bounds_update(self) -> bool:
        """Whether the schedule-safe bound applies (``max_step = 0`` switches every bound on an update off)."""
        return self.max_step > 0 and (self.step_bound > 0 or self.x0_bound > 0)

    def bound_text(self) -> str:
        parts = ([f"RMS Δx_next ≤ {self.step_bound:g}·σ_next"] if self.step_bound > 0 else []) + \
                ([f"RMS Δx̂0 ≤ {self.x0_bound:g}"] if self.x0_bound > 0 else [])
        return ", ".join(parts)

    @property
    def smoothing_spec(self) -> Smoothing:
        return Smoothing(self.smoothing, self.smoothing_samples, self.smoothing_reduction)

    @property
    def guides(self) -> bool:
        return self.forward_strength > 0 or self.backward_steps > 0

    def schedule_factor(self, progress: float) -> float:
        if self.schedule == "constant":
            return 1.0
        span = max(self.end_percent - self.start_percent, 1e-8)
        frac = min(max((progress - self.start_percent) / span, 0.0), 1.0)
        if self.schedule == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass
class Stats:
    """What a run did: counts of network evaluations (forward+backward counted once) and skipped updates.

    ``trace``: one entry per loss evaluation — ``{"step", "repeat", "sigma", "phase" ("forward" / "backward"),
    "terms": {name: unweighted loss, mean over the batch}, "total": weighted loss}`` — for plots and reports.
    ``updates`` / ``skipped_updates``: guidance updates tried and skipped (non-finite), counted per image.
    ``loss_scale_start`` / ``loss_scale``: the loss scale the run started with and ended with (1: unscaled);
    ``loss_scale_backoffs``: extra backward passes taken at a lowered scale after an overflow.
    ``bound_checked`` / ``bound_acted``: forward-guidance updates (per image) the schedule-safe bound
    (``Settings.step_bound`` / ``x0_bound``) was checked on and shrank; ``bound_min_scale``: the smallest factor it
    applied (1: none); ``bound_x0_acted``: of those shrunk, how many by the data-unit bound ``x0_bound``.
    ``idle_terms``: lines naming the terms whose window held no step of the run.
    ``weight_copy_bytes``: bytes of model weights the host adapter copied to make them usable under autograd
    (0 where it used them in place)."""

    steps: int = 0
    iterations: int = 0
    denoiser_calls: int = 0
    denoiser_grad_calls: int = 0
    reference_calls: int = 0
    decoder_calls: int = 0
    objective_calls: int = 0
    nonfinite_skips: int = 0
    capped_updates: int = 0
    bound_checked: int = 0
    bound_acted: int = 0
    bound_x0_acted: int = 0
    bound_min_scale: float = 1.0
    updates: int = 0
    skipped_updates: int = 0
    loss_scale_start: float = 1.0
    loss_scale: float = 1.0
    loss_scale_backoffs: int = 0
    weight_copy_bytes: int = 0
    started_from_inversion: bool = False
    idle_terms: list = field(default_factory=list)
    trace: list = field(default_factory=list)

    def warn_nonfinite(self, what: str, count: int) -> None:
        if count <= 0:
            return
        if self.nonfinite_skips == 0:
            log.warning("Universal Guidance: non-finite %s for %d image(s); that update was skipped "
                        "(further occurrences in this run are counted, not logged)", what, count)
        self.nonfinite_skips += count

    def skip_updates(self, what: str, count: int) -> None:
        """``count`` images' guidance updates were skipped (non-finite): logged once, counted always."""
        if count > 0:
            self.warn_nonfinite(what, count)
            self.skipped_updates += count

    @property
    def every_update_skipped(self) -> bool:
        return self.updates > 0 and self.skipped_updates >= self.updates

    def summary(self, seconds: Optional[float] = None) -> str:
        text = (f"{self.steps} steps, {self.iterations} iterations, {self.denoiser_grad_calls} denoiser backward "
                f"passes, {self.decoder_calls} guided decodes")
        if self.reference_calls:
            text += f", {self.reference_calls} reference passes"
        return text + (f" in {seconds:.1f} s" if seconds is not None else "")

    def bound_line(self, settings: "Settings") -> Optional[str]:
        """How often the schedule-safe bound acted (None where it checked no update)."""
        if not self.bound_checked:
            return None
        text = f"step bound ({settings.bound_text()}): acted on {self.bound_acted} of {self.bound_checked} updates"
        if self.bound_acted:
            text += f" (max shrink ×{self.bound_min_scale:.2g}"
            text += f"; {self.bound_x0_acted} by the x̂0 bound)" if self.bound_x0_acted else ")"
        return text

    def notes(self, settings: "Settings") -> list:
        """Lines about what the run did differently from what was asked: terms that guided no step, updates
        skipped (non-finite) or capped, a lowered loss scale."""
        lines = list(self.idle_terms)
        if self.started_from_inversion:
            lines.append("started from the inverted image's latent (UG Invert): the noise given to the sampler was "
                         "not used")
        if self.every_update_skipped:
            lines.append(f"every guidance update was skipped ({self.skipped_updates} of {self.updates}: non-finite "
                         f"gradients), so the output is unguided: lower the terms' weights or forward_strength, or "
                         f"run the model and VAE in bf16 or fp32 instead of fp16")
        elif self.nonfinite_skips:
            lines.append(f"{self.nonfinite_skips} guidance update(s) skipped for non-finite gradients")
        if self.capped_updates:
            lines.append(f"{self.capped_updates} guidance update(s) capped at max_step = {settings.max_step:g} × "
                         f"‖ε‖ (lower the strength, or raise max_step)")
        if self.bound_acted:
            lines.append(self.bound_line(settings))
        if self.loss_scale_backoffs:
            lines.append(f"fp16 loss scale lowered from {self.loss_scale_start:g} to {self.loss_scale:g} after "
                         f"gradient overflows ({self.loss_scale_backoffs} extra backward pass(es))")
        return lines


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample ``values [B]`` as ``[B, 1, …, 1]``: broadcast over each sample of ``like`` ``[B, …]``."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return _rows(t.flatten(1).float().norm(dim=1), t)


def _finite_rows(t: torch.Tensor) -> torch.Tensor:
    """Bool ``[B]``: whether every entry of each sample is finite."""
    return torch.isfinite(t.flatten(1)).all(dim=1)


def _zero_nonfinite(t: torch.Tensor, stats: Stats, what: str) -> torch.Tensor:
    """``t`` with its non-finite samples zeroed; each such sample is a skipped guidance update."""
    ok = _finite_rows(t)
    if bool(ok.all()):
        return t
    stats.skip_updates(what, int((~ok).sum()))
    return torch.where(_rows(ok, t), t, torch.zeros_like(t))


def _input_grad(loss: torch.Tensor, leaf: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
    """``∇_leaf Σ loss``; zeros where the loss does not depend on ``leaf`` (e.g. a term that skipped a step)."""
    if not loss.requires_grad:
        return torch.zeros_like(leaf)
    (grad,) = torch.autograd.grad(loss.sum(), leaf, allow_unused=True, retain_graph=retain_graph)
    return torch.zeros_like(leaf) if grad is None else grad.detach()


# Dynamic loss scaling (half-precision models): the loss is multiplied by a power of two before the backward pass so
# that small gradients do not underflow, and the gradient is divided back in fp32. A scaled gradient that overflows
# is recomputed from the same graph at half the scale, at most LOSS_SCALE_BACKOFFS times, then unscaled; only an
# unscaled gradient that is itself non-finite skips the update. The lowered scale holds for the rest of the run.
LOSS_SCALE_BACKOFFS = 4


def initial_loss_scale(loss_scale: float, guidance) -> float:
    """The scale a run starts with: ``loss_scale`` divided by the largest term weight (the weights already scale the
    loss: a face term of weight 20000 needs no further factor), rounded down to a power of two, at least 1."""
    if not loss_scale > 1.0 or not math.isfinite(loss_scale):
        return 1.0
    weights = [abs(float(t.weight)) for t in getattr(guidance, "terms", ()) if t.weight]
    scale = loss_scale / max(max(weights, default=1.0), 1.0)
    return float(2.0 ** math.floor(math.log2(scale))) if scale >= 1.0 else 1.0


def check_compatible(guidance, settings: Settings) -> None:
    """Internal (self-guidance) terms are read from the denoiser's own forward pass: they need ``jacobian``."""
    if guidance is not None and guidance.has("internal") and not settings.jacobian:
        names = ", ".join(t.name for t in guidance.terms if t.kind == "internal")
        raise ValueError(f"self-guidance terms ({names}) read the diffusion model's own attention, so their gradient "
                         f"must pass through the model: turn 'jacobian' on")


class _References:
    """The internals of the references internal terms compare against, computed once per step (no grad).

    ``"original"``: a twin trajectory — the unguided sampler from the same starting noise — stepped alongside
    the guided one; ``("latent", id)``: a reference latent noised to each step's σ with one fixed noise;
    ``("inversion", id)``: an inverted image's own latent at each step's σ (``inversion.Trajectory``). A reference
    latent or trajectory is one no-grad denoiser pass per step at which a term needs it, however many terms share
    it; the twin is one pass per step up to the last step that needs it, unguided steps included (on a step where
    a term captured it, that capture steps it)."""

    def __init__(self, denoise, guidance, param: Parameterization, x: torch.Tensor, generator, stats: Stats):
        self.denoise, self.param, self.stats = denoise, param, stats
        self.wanted = guidance.references() if guidance is not None else {}
        self.twin = x.detach().clone() if "original" in self.wanted else None
        self.noise = None
        if any(isinstance(r, torch.Tensor) for r in self.wanted.values()):
            self.noise = torch.randn(x.shape[1:], generator=generator, dtype=torch.float32, device="cpu")
        self.cache = {}

    def at(self, step: int, sigma: torch.Tensor, request, keys=None) -> dict:
        """``{key: Internals}`` for this step (computed on first use within the step) of the references ``keys``
        (the active terms' references; every reference when None). A reference no active term needs is not
        computed: the twin, once no later step needs it, no longer exists."""
        if self.cache.get("step") != step:
            self.cache = {"step": step}
        out = {}
        for key, ref in self.wanted.items():
            if keys is not None and key not in keys:
                continue
            if key not in self.cache:
                self.cache[key] = self._capture(key, ref, sigma, request, step)
            out[key] = self.cache[key][1]
        return out

    def _capture(self, key, ref, sigma, request, step: int):
        sig = float(sigma[0])
        if key == "original":
            x = self.twin
        elif hasattr(ref, "latent_at"):  # an inversion: the image's own latent at this step
            x = ref.latent_at(step).to(device=sigma.device, dtype=torch.float32)
            if x.shape[0] != sigma.shape[0]:
                x = x.expand(sigma.shape[0], *x.shape[1:]) if x.shape[0] == 1 else x
        else:
            z = ref.to(device=sigma.device, dtype=torch.float32)
            n = self.noise.to(z.device)
            x = self.param.a(sig) * z + self.param.b(sig) * n
            if x.shape[0] != sigma.shape[0]:
                x = x.expand(sigma.shape[0], *x.shape[1:]) if x.shape[0] == 1 else x
        self.stats.denoiser_calls += 1
        self.stats.reference_calls += 1
        with torch.no_grad():
            x0, internals = self.denoise(x.to(sigma.device), sigma[: x.shape[0]], capture=request)
        return x0.detach(), internals.detach()

    def advance(self, step: int, sigma: float, sigma_next: float, sigma_in: torch.Tensor, needed: bool) -> None:
        """Step the twin from σ to σ_next (reusing this step's capture); stops once no later step needs it."""
        if self.twin is None:
            return
        if not needed:
            self.twin = None
            return
        cached = self.cache.get("original") if self.cache.get("step") == step else None
        if cached is None:
            self.stats.denoiser_calls += 1
            self.stats.reference_calls += 1
            with torch.no_grad():
                x0 = self.denoise(self.twin, sigma_in)
        else:
            x0 = cached[0]
        self.twin = self.param.step(self.twin, x0, sigma, sigma_next).detach()


@dataclass(frozen=True)
class _At:
    """Where an iteration of the loop is: step ``i``, its ``repeat`` (self-recurrence), its noise level ``sigma``
    (``sigma_in``: σ·ones[B], as the denoiser takes it), the level it steps to (``sigma_next``: the schedule-safe
    bound's noise level; None: the bound is not applied) and ``progress = i / n_steps``."""

    step: int
    repeat: int
    sigma: float
    sigma_in: torch.Tensor
    sigma_next: Optional[float]
    progress: float

    def trace(self, **more) -> dict:
        """The entry of ``Stats.trace`` that says where a loss evaluation was."""
        return {"step": self.step, "repeat": self.repeat, "sigma": self.sigma, **more}


class _Step:
    """The guided x̂0 for one iteration: forward guidance, then backward guidance. Where the iteration is comes in
    as an argument (``_At``); what the object keeps between iterations is the run's: its settings and counters,
    the loss scale reached (``_grad``) and the generator of the smoothing noise."""

    def __init__(self, denoise, decode, objective, settings: Settings, param: Parameterization,
                 stats: Stats, interrupt: Callable[[], None], references: Optional[_References] = None,
                 generator: Optional[torch.Generator] = None, loss_scale: float = 1.0):
        self.denoise, self.decode, self.objective = denoise, decode, objective
        self.s, self.param, self.stats, self.interrupt = settings, param, stats, interrupt
        self.references = references
        self.loss_scale = float(loss_scale)
        seed = (generator.initial_seed() if generator is not None else 0) + 1
        self.smoothing_generator = torch.Generator().manual_seed(seed % (2 ** 63))

    def loss(self, x0: torch.Tensor, at: _At, *, internals=None, phase: str = "forward",
             kinds=("image", "internal"), inner: Optional[int] = None) -> torch.Tensor:
        """The objective at ``x0``: decodes only when an image term is active; records the terms' losses (``inner``:
        the backward-guidance step, recorded with them)."""
        progress = at.progress
        image = None
        if self.objective.active(progress, tuple(k for k in kinds if k == "image")):
            self.stats.decoder_calls += 1
            image = self.decode(x0)
        self.stats.objective_calls += 1
        refs = None
        if internals is not None and self.references is not None:
            refs = self.references.at(at.step, at.sigma_in, self.objective.capture_request(progress),
                                      keys=set(self.objective.references(progress)))
        record = {}
        std = noise_fraction(self.param.a(at.sigma), self.param.b(at.sigma))
        value = self.objective(image, progress, internals=internals, references=refs, kinds=kinds, record=record,
                               smoothing=self.s.smoothing_spec, noise_std=std,
                               generator=self.smoothing_generator)
        where = at.trace() if inner is None else at.trace(inner=inner)
        self.stats.trace.append({**where, "phase": phase, "terms": record,
                                 "total": float(value.detach().float().mean())})
        return value

    def plain(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.stats.denoiser_calls += 1
        with torch.no_grad():
            return self.denoise(x, sigma)

    def guided(self, x: torch.Tensor, at: _At) -> torch.Tensor:
        s, sig, progress = self.s, float(at.sigma_in[0]), at.progress
        strength = s.forward_strength * s.schedule_factor(progress)
        # Where a(σ) ≈ 0 (flow at σ = 1, pure noise) x̂0 carries no information about x and the strength unit
        # b²/a is unbounded: forward guidance starts at the next step (backward guidance still runs).
        if strength > 0 and self.param.a(sig) >= A_MIN:
            x0, grad, loss = self._gradient(x, at)
            self.stats.updates += x0.shape[0]
            grad = _zero_nonfinite(grad, self.stats, "forward-guidance gradient")
            guided = x0 - self._shift(x, x0, grad, loss, sig, strength, at).to(x0.dtype)
            ok = _finite_rows(guided)
            # a finite gradient whose update is not finite (e.g. past the fp16 range): also a skipped update
            self.stats.skip_updates("forward-guidance update", int((~ok & _finite_rows(x0)).sum()))
            x0 = torch.where(_rows(ok, x0), guided, x0)
        else:
            x0 = self.plain(x, at.sigma_in)
        if s.backward_steps > 0 and self.objective.active(progress, ("image",)):
            x0 = x0 + self._backward(x0, at)
        return x0

    def _grad(self, loss: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        """∇ of the loss, scaled by the loss scale for the backward pass (fp16 models) and back, in fp32. A sample
        whose scaled gradient overflows is recomputed from the same graph at half the scale (``LOSS_SCALE_BACKOFFS``
        times at most, then unscaled); samples that were finite keep their first, most precise gradient."""
        scale = self.loss_scale
        if scale == 1.0:
            return _input_grad(loss, leaf)
        grad = done = None
        backoffs = 0
        while True:
            last = scale <= 1.0
            g = _input_grad(loss * scale, leaf, retain_graph=not last).float() / scale
            ok = _finite_rows(g)
            grad, done = (g, ok) if grad is None else (torch.where(_rows(done, g), grad, g), done | ok)
            if last or bool(done.all()):
                break
            backoffs += 1
            scale = 1.0 if backoffs > LOSS_SCALE_BACKOFFS else max(scale / 2.0, 1.0)
        # The scale reached holds for the rest of the run, also when a sample was non-finite even unscaled (the
        # caller skips it): the halvings are not repeated at every step.
        self.stats.loss_scale_backoffs += backoffs
        self.loss_scale = self.stats.loss_scale = scale
        return grad.to(leaf.dtype)

    def _shift(self, x, x0, grad, loss, sig: float, strength: float, at: _At) -> torch.Tensor:
        """The change of x̂0 for this strength mode, capped at ``max_step·‖ε̂‖`` of noise per image."""
        s = self.s
        eps = self.param.noise_of(x, x0, sig) if sig > 0 else torch.zeros_like(x0)
        eps_norm = _per_sample_norm(eps)
        g_norm = _per_sample_norm(grad)
        to_x0 = self.param.eps_to_x0_scale(sig)
        if s.strength_mode == "paper":
            shift = strength * self.param.strength_unit(sig) * grad
        elif s.strength_mode == "normalized":
            shift = to_x0 * (strength * eps_norm / g_norm.clamp_min(1e-12)).to(grad.dtype) * grad
        elif s.strength_mode == "polyak":
            rho = torch.where(g_norm < 1e-6, torch.zeros_like(g_norm), strength * eps_norm / g_norm.clamp_min(1e-6) ** 2)
            shift = to_x0 * rho.to(grad.dtype) * grad
        else:  # polyak_loss: the classical step with the terms' floor as f*
            gap = _rows((loss.detach().float() - self.objective.floor(at.progress)).clamp_min(0.0), grad)
            shift = (strength * gap / g_norm.clamp_min(1e-6) ** 2).to(grad.dtype) * grad
            shift = torch.where(g_norm < 1e-6, torch.zeros_like(shift), shift)
        if s.max_step > 0 and sig > 0:
            limit = s.max_step * eps_norm * to_x0                      # ‖x̂0 change‖ of an ε-shift of max_step·‖ε‖
            size = _per_sample_norm(shift)
            over = size > limit
            if bool(over.any()):
                self.stats.capped_updates += int(over.sum())
                shift = torch.where(over, shift * (limit / size.clamp_min(1e-30)).to(shift.dtype), shift)
        return self._bound(shift, sig, at)

    def _edits_internals(self, progress: float) -> bool:
        return any(t.kind == "internal" for t in self.objective.active_terms(progress))

    def _bound(self, shift: torch.Tensor, sig: float, at: _At) -> torch.Tensor:
        """``shift`` scaled down per image so that the next sample moves by at most ``step_bound·b(σ_next)`` RMS
        and x̂0 by at most ``x0_bound`` RMS (``Settings.step_bound``); counted in ``Stats``."""
        s, p, sig_next = self.s, self.param, at.sigma_next
        if not s.bounds_update or sig_next is None or not sig > 0:
            return shift
        rms = shift.detach().flatten(1).float().pow(2).mean(dim=1).sqrt()
        limit = torch.full_like(rms, math.inf)
        by_x0 = torch.zeros_like(rms, dtype=torch.bool)
        if s.step_bound > 0 and sig_next > 0 and (s.step_bound_image or self._edits_internals(at.progress)):
            carry = abs(p.a(sig_next) - p.b(sig_next) * p.a(sig) / p.b(sig))   # Δx_{i+1} = carry·Δx̂0
            if carry > 0:
                limit = limit.clamp_max(s.step_bound * p.b(sig_next) / carry)
        if s.x0_bound > 0:
            by_x0 = limit > s.x0_bound
            limit = limit.clamp_max(s.x0_bound)
        finite = torch.isfinite(rms)
        over = finite & (rms > limit)
        self.stats.bound_checked += int(finite.sum())
        if not bool(over.any()):
            return shift
        scale = torch.where(over, limit / rms.clamp_min(1e-30), torch.ones_like(rms))
        self.stats.bound_acted += int(over.sum())
        self.stats.bound_x0_acted += int((over & by_x0).sum())
        self.stats.bound_min_scale = min(self.stats.bound_min_scale, float(scale.min()))
        return shift * _rows(scale, shift).to(shift.dtype)

    def _gradient(self, x: torch.Tensor, at: _At):
        """``(x̂0, ∇ loss, loss)`` with one denoiser and at most one decoder forward+backward (∇ w.r.t. x or
        x̂0)."""
        sigma = at.sigma_in
        request = self.objective.capture_request(at.progress)
        with torch.enable_grad():
            if self.s.jacobian:
                leaf = x.detach().requires_grad_(True)
                self.stats.denoiser_calls += 1
                self.stats.denoiser_grad_calls += 1
                internals = None
                if request is not None:
                    x0, internals = self.denoise(leaf, sigma, capture=request)
                else:
                    x0 = self.denoise(leaf, sigma)
                loss = self.loss(x0, at, internals=internals)
            else:
                x0 = self.plain(x, sigma).detach()
                leaf = x0.requires_grad_(True)
                loss = self.loss(leaf, at, kinds=("image",))
            grad = self._grad(loss, leaf)
        return x0.detach(), grad, loss.detach()

    def _backward(self, x0: torch.Tensor, at: _At) -> torch.Tensor:
        s, progress = self.s, at.progress
        delta = torch.zeros_like(x0, requires_grad=True)
        if s.backward_optimizer == "adam":
            opt = torch.optim.Adam([delta], lr=s.backward_lr)
        else:  # sgd, and polyak: SGD with lr 1 on the rescaled gradient lr·(L − f*)/‖∇‖²·∇
            opt = torch.optim.SGD([delta], lr=s.backward_lr if s.backward_optimizer == "sgd" else 1.0)
        running = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
        for j in range(s.backward_steps):
            self.interrupt()
            with torch.enable_grad():
                loss = self.loss(x0 + delta, at, phase="backward", kinds=("image",), inner=j)
                if s.backward_early_stop > 0:
                    running = running & (loss.detach() >= s.backward_early_stop)
                    if not bool(running.any()):
                        break
                grad = self._grad(loss * running, delta)
            before = delta.detach().clone()
            self.stats.updates += int(running.sum())
            grad = _zero_nonfinite(grad, self.stats, "backward-guidance gradient")
            if s.backward_optimizer == "polyak":
                gap = _rows((loss.detach().float() - self.objective.floor(progress)).clamp_min(0.0), grad)
                g_norm = _per_sample_norm(grad)
                grad = torch.where(g_norm < 1e-6, torch.zeros_like(grad),
                                   (s.backward_lr * gap / g_norm.clamp_min(1e-6) ** 2).to(grad.dtype) * grad)
            delta.grad = grad
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                finite = _finite_rows(delta)
                self.stats.skip_updates("backward-guidance update", int((running & ~finite).sum()))
                keep = _rows(running & finite, delta)
                delta.copy_(torch.where(keep, delta, before))
        return delta.detach()


def total_iterations(n_steps: int, guidance, settings: Settings) -> int:
    """Denoiser evaluations of the outer loop: ``k`` for every guided step, 1 for the others."""
    return sum(settings.recurrence if _is_guided(i, n_steps, guidance, settings) else 1 for i in range(n_steps))


def _is_guided(i: int, n_steps: int, guidance, settings: Settings) -> bool:
    progress = i / n_steps
    return (settings.guides and window_contains(settings.start_percent, settings.end_percent, progress)
            and guidance is not None and guidance.active(progress))


def idle_terms(n_steps: int, guidance, settings: Settings) -> list:
    """One line per guidance term (of non-zero weight) that guides none of the run's steps: its window holds no
    step position ``i / n_steps``, or none that the sampler's own window holds. Empty when guidance is off."""
    if guidance is None or not settings.guides or n_steps <= 0:
        return []
    positions = [i / n_steps for i in range(n_steps)]
    shown = ", ".join(f"{p:g}" for p in positions[:6]) + (", …" if n_steps > 6 else "")
    sampler = [window_contains(settings.start_percent, settings.end_percent, p) for p in positions]
    lines = []
    for term in getattr(guidance, "terms", ()):
        if not term.weight:
            continue
        own = [window_contains(term.start_percent, term.end_percent, p) for p in positions]
        window = f"{term.start_percent:g}–{term.end_percent:g}"
        if not any(own):
            lines.append(f"guidance term {term.name!r} guided no step: its window {window} holds none of this run's "
                         f"{n_steps} step(s), which start at {shown} of the run; widen its window (start_percent "
                         f"≤ {positions[-1]:g}) or use more steps")
        elif not any(a and b for a, b in zip(own, sampler)):
            lines.append(f"guidance term {term.name!r} guided no step: its window {window} and the sampler's window "
                         f"{settings.start_percent:g}–{settings.end_percent:g} share none of this run's {n_steps} "
                         f"step(s), which start at {shown} of the run; widen one of the windows or use more steps")
    return lines


class NonFiniteOutputError(ValueError):
    """The sampled latent became NaN or inf: there is no image to return."""


def _check_finite(x: torch.Tensor, step: int, n_steps: int, guided: bool) -> None:
    """Raise once the latent is non-finite (``guided``: some step so far was guided)."""
    bad = ~_finite_rows(x)
    if not bool(bad.any()):
        return
    cause = ("after guidance: a guidance update pushed the latent past what the model's precision holds (fp16 "
             "overflows above 65504)" if guided else "without guidance: the model itself returned NaN or inf")
    raise NonFiniteOutputError(
        f"the sampled latent became non-finite (NaN or inf) at step {step + 1} of {n_steps} for {int(bad.sum())} of "
        f"{x.shape[0]} image(s), {cause}; the output would be a black image. Lower forward_strength or the terms' "
        f"weights, keep max_step above 0 (e.g. 10), or run the model and VAE in bf16 or fp32 instead of fp16 "
        f"(e.g. ComfyUI's --bf16-unet / --fp32-vae)")


def sample_universal(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     x: torch.Tensor,
                     sigmas: torch.Tensor,
                     *,
                     guidance,
                     decode: Callable[[torch.Tensor], torch.Tensor],
                     settings: Settings = Settings(),
                     parameterization: Parameterization,
                     callback: Optional[Callable[[dict], None]] = None,
                     on_iteration: Optional[Callable[[int, int], None]] = None,
                     interrupt: Optional[Callable[[], None]] = None,
                     generator: Optional[torch.Generator] = None,
                     stats: Optional[Stats] = None,
                     loss_scale: float = 1.0) -> torch.Tensor:
    """Sample with Universal Guidance. k-diffusion conventions: ``x`` is already scaled to ``sigmas[0]``.

    denoise(x, σ·ones[B]) → x̂0 (CFG applied); with ``capture=CaptureRequest`` (internal terms only) it returns
    ``(x̂0, Internals)`` from the same forward pass; decode(latent) → RGB ``[B,3,H,W]`` in [0,1] (differentiable);
    guidance(image, progress) → loss ``[B]`` with ``guidance.active(progress)``; generator: the source of the
    re-noise of self-recurrence (CPU generator; noise is moved to ``x``'s device).
    on_iteration(done, total) counts outer iterations (steps × k where guided); interrupt() is called inside
    every inner loop and may raise to stop the run. loss_scale: the loss is multiplied by a scale before each
    backward pass and the gradient divided by it (against fp16 gradient underflow): ``loss_scale`` divided by the
    largest term weight to start with, halved on overflow (see ``LOSS_SCALE_BACKOFFS``); a gradient that is
    non-finite unscaled skips that image's update. Raises ``NonFiniteOutputError`` (a ValueError) as soon as the
    latent becomes non-finite. ``stats.notes(settings)`` names terms that guided no step and a run whose every update
    was skipped.
    """
    stats = stats if stats is not None else Stats()
    interrupt = interrupt or (lambda: None)
    check_compatible(guidance, settings)
    n_steps = len(sigmas) - 1
    stats.idle_terms = idle_terms(n_steps, guidance, settings)
    for line in stats.idle_terms:
        log.warning("Universal Guidance: %s", line)
    stats.loss_scale_start = stats.loss_scale = initial_loss_scale(loss_scale, guidance)
    start = inversion_start(guidance, x, sigmas) if guidance is not None else None
    if start is not None:  # edits of an inverted image start from its inverted latent, whatever noise was given
        stats.started_from_inversion = True
        x = start
    total = total_iterations(n_steps, guidance, settings)
    references = None
    if guidance is not None and guidance.references():
        references = _References(denoise, guidance, parameterization, x, generator, stats)
        last_needed = max((i for i in range(n_steps) if _is_guided(i, n_steps, guidance, settings)
                           and guidance.references(i / n_steps)), default=-1)
    step = _Step(denoise, decode, guidance, settings, parameterization, stats, interrupt, references, generator,
                 stats.loss_scale)
    ones = x.new_ones([x.shape[0]])
    done = 0
    any_guided = False
    for i in range(n_steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        progress = i / n_steps
        guided = _is_guided(i, n_steps, guidance, settings)
        any_guided = any_guided or guided
        repeats = settings.recurrence if guided else 1
        s_in = sigmas[i] * ones
        for r in range(repeats):
            interrupt()
            at = _At(i, r, sigma, s_in, sigma_next, progress)
            x0 = step.guided(x, at) if guided else step.plain(x, s_in)
            x_next = parameterization.step(x, x0, sigma, sigma_next)
            if r < repeats - 1:
                noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device="cpu")
                x_before = x
                x = parameterization.renoise(x_next, sigma_next, sigma, noise.to(x.device, x.dtype))
                if not bool(_finite_rows(x).all()):
                    stats.warn_nonfinite("re-noised latent", int((~_finite_rows(x)).sum()))
                    x = torch.where(_rows(_finite_rows(x), x), x, x_before)
            done += 1
            stats.iterations += 1
            if on_iteration is not None:
                on_iteration(done, total)
        if references is not None:
            references.advance(i, sigma, sigma_next, s_in, needed=i < last_needed)
        if callback is not None:
            callback({"i": i, "denoised": x0.detach(), "x": x.detach(), "sigma": sigmas[i], "sigma_hat": sigmas[i]})
        x = x_next.detach()
        _check_finite(x, i, n_steps, any_guided)
        stats.steps += 1
    return x
