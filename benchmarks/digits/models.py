"""The three networks of the digits benchmark and the VE denoiser wrapper.

* ``EpsUNet``: a small ε-prediction UNet (16/32 channels at 8×8/4×4, 130 k parameters) trained with the DDPM linear schedule (β 1e-4 → 0.02, T = 1000),
  conditioned on the (continuous) timestep ``t``.
* ``Denoiser``: exposes it like ComfyUI's EPS model in k-diffusion VE σ-form:
  ``x_VE = z_t / sqrt(ᾱ)``, ``σ = sqrt((1-ᾱ)/ᾱ)``, ``D(x, σ) = x - σ·ε(x / sqrt(1+σ²), t(σ))``, with ``t(σ)``
  interpolated in log σ between the discrete timesteps (as ComfyUI's ``ModelSamplingDiscrete.timestep``).
* ``GuidanceClassifier``: the "off-the-shelf" network, a plain ReLU/max-pool CNN trained on clean digits only.
* ``Evaluator``: a different architecture (strided SiLU CNN with a 32-d bottleneck), trained with a different
  seed and augmentation, never used for guidance; its 32-d penultimate activations feed the Fréchet distance.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import image_to_input

WEIGHTS = Path(__file__).resolve().parent / "weights"
T_STEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02
FEATURE_DIM = 32


# ---------------------------------------------------------------------------------------------- schedule
class Schedule:
    """DDPM linear schedule and its VE σ table."""

    def __init__(self, steps: int = T_STEPS, beta_start: float = BETA_START, beta_end: float = BETA_END):
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt().float()  # increasing in t
        self.log_sigmas = self.sigmas.log()
        self.steps = steps

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep of ``σ`` (linear interpolation in log σ, clamped to [0, T-1])."""
        log_sigma = sigma.float().clamp_min(1e-10).log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        high = torch.searchsorted(self.log_sigmas, log_sigma.contiguous()).clamp(1, self.steps - 1)
        low = high - 1
        lo, hi = self.log_sigmas[low], self.log_sigmas[high]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return low.float() + w

    def ddim_sigmas(self, n_steps: int) -> torch.Tensor:
        """``n_steps`` σ's at uniformly spaced timesteps from T-1 down to 0, then 0 (DDIM-like)."""
        ts = torch.linspace(self.steps - 1, 0, n_steps).round().long()
        return torch.cat([self.sigmas[ts], torch.zeros(1)])


# ---------------------------------------------------------------------------------------------- diffusion net
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class EpsUNet(nn.Module):
    """ε(z, t) for 1×8×8 inputs: two resolutions (8×8, 4×4), time-conditioned residual blocks."""

    def __init__(self, ch: int = 16, emb: int = 128):
        super().__init__()
        self.ch, self.emb_dim = ch, emb
        self.time = nn.Sequential(nn.Linear(64, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inc = nn.Conv2d(1, ch, 3, padding=1)
        self.d1 = ResBlock(ch, ch, emb)
        self.down = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.d2 = ResBlock(2 * ch, 2 * ch, emb)
        self.mid = ResBlock(2 * ch, 2 * ch, emb)
        self.u2 = ResBlock(4 * ch, 2 * ch, emb)
        self.up = nn.Conv2d(2 * ch, ch, 3, padding=1)
        self.u1 = ResBlock(2 * ch, ch, emb)
        self.out_norm = nn.GroupNorm(8, ch)
        self.out = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, 64))
        h1 = self.d1(self.inc(z), emb)
        h2 = self.d2(self.down(h1), emb)
        h = self.mid(h2, emb)
        h = self.u2(torch.cat([h, h2], 1), emb)
        h = self.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.u1(torch.cat([h, h1], 1), emb)
        return self.out(F.silu(self.out_norm(h)))


def build_eps(meta: dict) -> EpsUNet:
    """The ε network described by a training config / the weights' metadata."""
    return EpsUNet(ch=meta.get("ch", 16), emb=meta.get("emb", 128))


class Denoiser(nn.Module):
    """ComfyUI-EPS-style VE denoiser: ``D(x, σ) = x - σ·ε(x/sqrt(1+σ²), t(σ))``; ``sigma`` is ``[B]``."""

    def __init__(self, eps_net: EpsUNet, schedule: Schedule | None = None):
        super().__init__()
        self.eps_net = eps_net
        self.schedule = schedule or Schedule()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x.dtype).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        s = sigma.view(-1, 1, 1, 1)
        eps = self.eps_net(x / (1.0 + s * s).sqrt(), self.schedule.sigma_to_t(sigma))
        return x - s * eps


# ---------------------------------------------------------------------------------------------- classifiers
class GuidanceClassifier(nn.Module):
    """Plain CNN on clean 8×8 digits in [-1, 1]: conv-conv-pool-conv-pool-linear, ReLU."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 2 * 2, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Evaluator(nn.Module):
    """Strided SiLU CNN with a ``FEATURE_DIM``-d bottleneck; ``features`` are the penultimate activations."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 48, 5, padding=2), nn.SiLU(),
            nn.Conv2d(48, 96, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(96, 128, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(128 * 2 * 2, FEATURE_DIM), nn.SiLU())
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


class ClassifierLoss:
    """Guidance objective: cross-entropy of ``net`` for ``targets`` on the decoded image → ``loss[B]``.

    ``spatial`` tells the engine's random augmentation (``GuidanceTerm(augment=R)``) what it may change: True (the
    engine's default for a loss without the attribute) = colour only; False = a class label does not live on the
    image grid, so translation, resize and cutout apply too (as for CLIP). The engine batches augmented copies
    outermost (``[R·B]``), so the targets are tiled to the batch it receives."""

    floor = 0.0  # the smallest cross-entropy (f* of the classical Polyak step)

    def __init__(self, net: nn.Module, targets: torch.Tensor, spatial: bool = True, record: list | None = None):
        self.net, self.targets, self.spatial = net, targets.long(), bool(spatial)
        self.record = record  # when a list: each call appends its detached losses as [views, B]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.net(image_to_input(image))
        targets = self.targets
        if logits.shape[0] != targets.shape[0]:
            targets = targets.repeat(logits.shape[0] // targets.shape[0])
        loss = F.cross_entropy(logits, targets, reduction="none")
        if self.record is not None:
            self.record.append(loss.detach().float().reshape(-1, self.targets.shape[0]))
        return loss


# ---------------------------------------------------------------------------------------------- weights
FILES = {"diffusion": "diffusion.safetensors", "classifier": "classifier.safetensors",
         "evaluator": "evaluator.safetensors"}


def save(module: nn.Module, name: str, meta: dict, folder: Path = WEIGHTS) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILES[name]
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"meta": json.dumps(meta, sort_keys=True)})
    return path


def read_meta(name: str, folder: Path = WEIGHTS) -> dict:
    from safetensors import safe_open

    with safe_open(str(folder / FILES[name]), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}"))


def _load(module: nn.Module, name: str, folder: Path) -> nn.Module:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(folder / FILES[name])))
    module.eval().requires_grad_(False)
    return module


def load_denoiser(folder: Path = WEIGHTS) -> Denoiser:
    meta = read_meta("diffusion", folder)
    net = build_eps(meta)
    return Denoiser(_load(net, "diffusion", folder)).eval().requires_grad_(False)


def load_classifier(folder: Path = WEIGHTS) -> GuidanceClassifier:
    return _load(GuidanceClassifier(), "classifier", folder)


def load_evaluator(folder: Path = WEIGHTS) -> Evaluator:
    return _load(Evaluator(), "evaluator", folder)
