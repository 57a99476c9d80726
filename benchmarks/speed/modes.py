"""The guided modes of the per-mode benchmark, by name (``jacobian/vae/combined``, ``no_jacobian/taesd/low_memory``),
and the parts whose sum each one's iteration is.

The modes are the sampler's cost knobs: ``jacobian`` on/off × guidance decoder (the SD VAE, or TAESD through the
``guidance_vae`` input) × ``cfg_branch`` (combined / cond / uncond; without the Jacobian no gradient passes through
the denoiser, so the branch does not matter), and ``low_memory``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    jacobian: bool = True
    decoder: str = "vae"          # "vae" (the checkpoint's SD VAE) or "taesd" (guidance_vae)
    branch: str = "combined"      # cfg_branch; irrelevant (and "combined") without the Jacobian
    low_memory: bool = False

    def __post_init__(self):
        if self.decoder not in ("vae", "taesd") or self.branch not in ("combined", "cond", "uncond"):
            raise ValueError(f"bad mode {self}")
        if not self.jacobian and self.branch != "combined":
            raise ValueError("without the Jacobian the CFG branch does not matter: use 'combined'")

    @property
    def name(self) -> str:
        parts = ["jacobian" if self.jacobian else "no_jacobian", self.decoder]
        if self.jacobian:
            parts.append(self.branch)
        if self.low_memory:
            parts.append("low_memory")
        return "/".join(parts)

    @classmethod
    def parse(cls, name: str) -> "Mode":
        bits = name.split("/")
        low = bits[-1] == "low_memory"
        if low:
            bits = bits[:-1]
        jac = bits[0] == "jacobian"
        if bits[0] not in ("jacobian", "no_jacobian") or len(bits) != (3 if jac else 2):
            raise ValueError(f"bad mode name {name!r} (e.g. jacobian/vae/combined, no_jacobian/taesd)")
        return cls(jac, bits[1], bits[2] if jac else "combined", low)

    def with_low_memory(self, on: bool = True) -> "Mode":
        return dataclasses.replace(self, low_memory=on)

    def parts(self) -> list:
        """The part keys whose sum is this mode's guided iteration."""
        unet = ("unet_fwd_bwd" if self.branch == "combined" else f"unet_fwd_bwd_{self.branch}") if self.jacobian \
            else "unet_fwd"
        keys = [unet, f"{self.decoder}_decoder_fwd_bwd", "guidance_fwd_bwd"]
        return [_lm(k, self.low_memory) for k in keys]


def _lm(key: str, low_memory: bool) -> str:
    """The part key measured with activation checkpointing (only backward passes change)."""
    return key + "+low_memory" if low_memory and "bwd" in key and not key.startswith("guidance") else key


def default_modes() -> list:
    modes = [Mode(True, d, b) for d in ("vae", "taesd") for b in ("combined", "cond", "uncond")]
    return modes + [Mode(False, d) for d in ("vae", "taesd")]


def backward_step_parts(decoder: str, low_memory: bool = False) -> list:
    return [_lm(f"{decoder}_decoder_fwd_bwd", low_memory), "guidance_fwd_bwd"]

