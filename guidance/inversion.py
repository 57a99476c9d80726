"""Deterministic inversion of a clean latent: the sampler's own first-order ODE step run backwards.

The sampler's step from ``σ_i`` to ``σ_{i+1}`` is ``x_{i+1} = x_i + Δ(x_i)`` with ``Δ(x) = step(x, D(x, σ_i)) − x``
(``Parameterization.step``: the DDIM/Euler step of ε- and v-prediction models, the flow ODE's Euler step for flow
models — both are ``(σ_{i+1} − σ_i)·(x − x̂0)/σ_i``). Inverting it means solving ``x_i = x_{i+1} − Δ(x_i)`` from the
clean latent (``σ_N``) up to ``σ_0``. The first guess continues the ODE with the slope found at the less noisy
point (the classic DDIM inversion: ε, or the flow's velocity, taken as constant over the step); each fixed-point
iteration (one denoiser call; from the second on, Anderson-accelerated with up to ``ANDERSON_MEMORY`` previous
iterates) brings ``x_i`` nearer the point the sampler maps back exactly onto ``x_{i+1}``. Sampling the inverted start with the
same σ schedule, no added noise and a first-order step then reconstructs the latent up to the fixed-point residual.

The result is a ``Trajectory``: the latent at every σ of the schedule. Self-guidance terms can use it as their
reference (the real image's own trajectory instead of the unguided twin); the sampler then starts from its first
latent and requires the same schedule.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .parameterization import Parameterization

SIGMA_RTOL = 1e-4  # schedules that differ by less than this (relative) are the same schedule
ANDERSON_MEMORY = 4  # previous iterates the fixed-point iteration extrapolates from


def _anderson(history: list) -> torch.Tensor:
    """Anderson acceleration (type II) of a fixed-point iteration ``x ← g(x)``: from the last iterates' values
    ``g`` and residuals ``f = g(x) − x`` (each ``[B, D]``), the combination whose residual is least-squares smallest,
    per sample: ``g_k − ΔG·γ`` with ``γ = argmin ‖f_k − ΔF·γ‖``."""
    g_k, f_k = history[-1]
    d_f = torch.stack([history[j + 1][1] - history[j][1] for j in range(len(history) - 1)], dim=2)  # [B, D, m]
    d_g = torch.stack([history[j + 1][0] - history[j][0] for j in range(len(history) - 1)], dim=2)
    gram = d_f.transpose(1, 2) @ d_f                                                                 # [B, m, m]
    ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(1).clamp_min(1e-30)[:, None, None]
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    gamma = torch.linalg.solve(gram + ridge * eye, d_f.transpose(1, 2) @ f_k.unsqueeze(2))         # [B, m, 1]
    return g_k - (d_g @ gamma).squeeze(2)


class Trajectory:
    """``latents[i]`` (``[N+1, B, C, H, W]``, the sampler's latent space, on the CPU) is the inverted latent at
    ``sigmas[i]`` (``[N+1]``, descending as sampled); ``latents[N]`` is the latent that was inverted.
    ``residuals[i]``: the fixed-point residual of step i's last iterate, relative to the latent's norm."""

    def __init__(self, sigmas: torch.Tensor, latents: torch.Tensor, residuals=None):
        if latents.shape[0] != sigmas.shape[0]:
            raise ValueError(f"a trajectory needs one latent per σ: {latents.shape[0]} latents, "
                             f"{sigmas.shape[0]} σ values")
        self.sigmas = sigmas.detach().float().cpu()
        self.latents = latents.detach().float().cpu()
        self.residuals = list(residuals or [])

    @property
    def reference_key(self):
        return ("inversion", id(self))

    @property
    def steps(self) -> int:
        return self.sigmas.shape[0] - 1

    @property
    def start(self) -> torch.Tensor:
        return self.latents[0]

    def latent_at(self, step: int) -> torch.Tensor:
        return self.latents[step]

    def __deepcopy__(self, memo):  # immutable: ComfyUI may copy the LATENT dict that carries it
        return self

    def describe(self) -> str:
        return f"{self.steps} steps, σ {float(self.sigmas[0]):.4g} → {float(self.sigmas[-1]):.4g}"

    def schedule_problem(self, sigmas: torch.Tensor) -> Optional[str]:
        """Why ``sigmas`` is not this trajectory's schedule, or None."""
        s = sigmas.detach().float().cpu()
        if s.shape != self.sigmas.shape:
            return (f"the inversion was made with {self.steps} steps ({self.describe()}), the sampler runs "
                    f"{s.shape[0] - 1} (σ {float(s[0]):.4g} → {float(s[-1]):.4g})")
        tol = SIGMA_RTOL * self.sigmas.abs().clamp_min(1e-3)
        bad = ((s - self.sigmas).abs() > tol).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            return (f"the sampler's σ schedule differs from the inversion's at step {i} (σ {float(s[i]):.6g}, the "
                    f"inversion's {float(self.sigmas[i]):.6g}; {self.describe()})")
        return None


def invert(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], latent: torch.Tensor,
           sigmas: torch.Tensor, parameterization: Parameterization, *, iterations: int = 3,
           interrupt: Optional[Callable[[], None]] = None,
           on_iteration: Optional[Callable[[int, int], None]] = None) -> Trajectory:
    """The ``Trajectory`` of ``latent`` (the clean latent, taken as the sample at ``sigmas[-1]``) up the schedule
    ``sigmas`` (descending, as sampled). ``denoise(x, σ·ones[B]) → x̂0`` is called ``iterations`` times per step,
    without gradients. ``on_iteration(done, total)`` counts denoiser calls; ``interrupt()`` may raise."""
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if sigmas.dim() != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a schedule of at least one step, got shape {tuple(sigmas.shape)}")
    param = parameterization
    n = sigmas.shape[0] - 1
    x = latent.detach()
    ones = x.new_ones([x.shape[0]])
    latents = [None] * (n + 1)
    latents[n] = x.float().cpu()
    residuals = [0.0] * n
    total, done = n * iterations, 0
    slope = None  # the ODE's dx/dσ where the previous (less noisy) step was solved: the next step's first guess
    with torch.no_grad():
        for i in reversed(range(n)):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            target = x
            guess = target if slope is None else target + (s - s_next) * slope
            history = []  # (g, f) of the previous iterations, for Anderson acceleration
            for k in range(iterations):
                if interrupt is not None:
                    interrupt()
                x0 = denoise(guess, sigmas[i].to(guess.device) * ones)
                move = param.step(guess, x0, s, s_next) - guess
                slope = move / (s_next - s)
                g = target - move                      # the plain fixed-point map
                f = g - guess                          # its residual: 0 at the solution
                residuals[i] = float(f.flatten(1).norm(dim=1).max()
                                     / target.flatten(1).norm(dim=1).clamp_min(1e-12).max())
                history = (history + [(g.flatten(1).double(), f.flatten(1).double())])[-(ANDERSON_MEMORY + 1):]
                guess = _anderson(history).to(g.dtype).view_as(g) if len(history) > 1 else g
                done += 1
                if on_iteration is not None:
                    on_iteration(done, total)
            if not bool(torch.isfinite(guess).all()):
                raise ValueError(f"the inversion became non-finite at step {i + 1} of {n} (σ {s:.4g}); use more "
                                 f"steps or fewer fixed-point iterations, or a lower cfg")
            x = guess
            latents[i] = x.float().cpu()
    return Trajectory(sigmas, torch.stack(latents), residuals)


def trajectories(guidance) -> list:
    """The distinct inversion trajectories the terms of ``guidance`` use as references, the one to start from
    first: that of the first term that is not an appearance term (layout, move, resize), else the first."""
    found = []
    for prefer_layout in (True, False):
        for term in getattr(guidance, "terms", ()):
            ref = getattr(term.loss, "reference", None)
            if isinstance(ref, Trajectory) and all(ref is not t for t in found):
                if prefer_layout and getattr(term.loss, "needs_features", False):
                    continue
                found.append(ref)
    return found


def inversion_start(guidance, x: torch.Tensor, sigmas: torch.Tensor) -> Optional[torch.Tensor]:
    """The latent a sampler with inverted references starts from (``x``'s shape, device, dtype), or None when no
    term uses an inversion. Raises ValueError when a trajectory was made with another σ schedule or batch."""
    found = trajectories(guidance)
    for traj in found:
        problem = traj.schedule_problem(sigmas)
        if problem:
            names = [t.name for t in guidance.terms if getattr(t.loss, "reference", None) is traj]
            raise ValueError(f"self-guidance term(s) {', '.join(repr(n) for n in names)} compare against an "
                             f"inverted image, but {problem}; run the sampler with the inversion's steps, scheduler "
                             f"and denoise (e.g. connect UG Invert's sigmas output to SamplerCustom), or invert "
                             f"again with the sampler's settings")
        b = traj.start.shape[0]
        if b not in (1, x.shape[0]) or traj.start.shape[1:] != x.shape[1:]:
            raise ValueError(f"the inverted latent has shape {tuple(traj.start.shape)}, the sampler's latent "
                             f"{tuple(x.shape)}; sample at the inverted image's size and batch")
    if not found:
        return None
    start = found[0].start.to(device=x.device, dtype=x.dtype)
    return start.expand(x.shape[0], *start.shape[1:]).clone() if start.shape[0] != x.shape[0] else start
