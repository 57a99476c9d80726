"""What a guided step costs, in FLOPs counted with ``torch.utils.flop_counter`` on ComfyUI's own modules.

The modules are built on the ``meta`` device (shapes only, no weights, no compute), so counting the full SD1.5 UNet,
the SD VAE decoder and TAESD at 512² takes seconds on any machine. A "fwd+bwd" count is one forward and the backward
to the *input* only (guidance needs no weight gradients; the weights are frozen).

    python -m benchmarks.flops --latent 64          # SD1.5 at 512²: prints and writes out/bench/flops_sd15_64.json

``parts(latent)`` returns ``{part: TFLOP}``; ``recipe_tflop(...)`` prices a sampling recipe per image from them.
Needs a ComfyUI on ``sys.path`` (``headless.host.Host`` puts it there; this module boots none itself).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@contextlib.contextmanager
def _sdpa_attention():
    """ComfyUI's attention as PyTorch SDPA while counting (its CPU default, sub-quadratic attention, asks the
    memory manager for sizes, which meta tensors do not have); SDPA has a FLOP formula."""
    import comfy.ldm.modules.attention as attention
    old = attention.optimized_attention
    attention.optimized_attention = attention.attention_pytorch
    try:
        yield
    finally:
        attention.optimized_attention = old


def _count(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def _fwd_bwd(module, *inputs, **kwargs):
    def run():
        leaf = inputs[0].detach().requires_grad_(True)
        # copies of saved tensors (free on meta, no FLOPs): hosts whose UNet adds its residual in place need them
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            out = module(leaf, *inputs[1:], **kwargs)
        out.sum().backward(inputs=[leaf])
    return run


def unet_parts(latent: int, config: dict | None = None) -> dict:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops

    from headless.random_models import FULL_SD15_UNET
    cfg = dict(config or FULL_SD15_UNET)
    with torch.device("meta"):
        unet = UNetModel(**cfg, operations=comfy.ops.disable_weight_init).requires_grad_(False)
    out = {}
    with _sdpa_attention():
        for batch in (1, 2):
            with torch.device("meta"):
                x = torch.empty(batch, 4, latent, latent)
                t = torch.empty(batch)
                ctx = torch.empty(batch, 77, cfg["context_dim"])
            out[f"unet_fwd_b{batch}"] = _count(lambda: unet(x, timesteps=t, context=ctx))
            out[f"unet_fwd_bwd_b{batch}"] = _count(_fwd_bwd(unet, x, timesteps=t, context=ctx))
    return out


def vae_decoder_parts(latent: int) -> dict:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    from headless.random_models import VAE_DDCONFIG
    import comfy.ldm.modules.diffusionmodules.model as vae_modules
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4).requires_grad_(False)
        z = torch.empty(1, 4, latent, latent)
    for m in vae.modules():  # SDPA, as ComfyUI uses on GPUs (its CPU default slices by free memory)
        if hasattr(m, "optimized_attention"):
            m.optimized_attention = vae_modules.pytorch_attention
    with _sdpa_attention():
        return {"vae_decoder_fwd": _count(lambda: vae.decode(z)),
                "vae_decoder_fwd_bwd": _count(_fwd_bwd(vae.decode, z))}


def taesd_decoder_parts(latent: int) -> dict:
    from comfy.taesd import taesd
    with torch.device("meta"):
        dec = taesd.Decoder().requires_grad_(False)
        z = torch.empty(1, 4, latent, latent)
    return {"taesd_decoder_fwd": _count(lambda: dec(z)), "taesd_decoder_fwd_bwd": _count(_fwd_bwd(dec, z))}


def parts(latent: int = 64) -> dict:
    """TFLOP of each part at a ``latent``×``latent`` SD1.5 latent (pixels = 8 × latent), batch 1 unless named."""
    return {"latent": latent, "pixels": 8 * latent, **unet_parts(latent), **vae_decoder_parts(latent),
            **taesd_decoder_parts(latent)}


def iteration_tflop(p: dict, *, cfg: bool = True, jacobian: bool = True, decoder: str = "vae",
                    cfg_branch: str = "combined", network: float = 0.0) -> float:
    """One guided iteration: denoiser fwd+bwd (or fwd only without the Jacobian), one decoder fwd+bwd, the guidance
    network's fwd+bwd (``network`` TFLOP)."""
    dec = p[f"{'taesd' if decoder == 'taesd' else 'vae'}_decoder_fwd_bwd"]
    b = "b2" if cfg else "b1"
    if not jacobian:
        unet = p[f"unet_fwd_{b}"]
    elif cfg and cfg_branch != "combined":
        unet = p["unet_fwd_bwd_b1"] + p["unet_fwd_b1"]
    else:
        unet = p[f"unet_fwd_bwd_{b}"]
    return unet + dec + network


def recipe_tflop(p: dict, *, steps: int, guided_steps: int, recurrence: int = 1, backward_steps: int = 0,
                 cfg: bool = True, jacobian: bool = True, decoder: str = "vae", network: float = 0.0,
                 guidance_calls_per_eval: int = 1) -> float:
    """TFLOP per image of a recipe: plain steps + guided iterations + backward steps + the final decode.

    ``guidance_calls_per_eval``: network calls per evaluation (augmentation / smoothing copies); the decoder still
    runs once per evaluation."""
    b = "b2" if cfg else "b1"
    plain = (steps - guided_steps) * p[f"unet_fwd_{b}"]
    guided = guided_steps * recurrence * iteration_tflop(p, cfg=cfg, jacobian=jacobian, decoder=decoder,
                                                         network=network * guidance_calls_per_eval)
    dec = p[f"{'taesd' if decoder == 'taesd' else 'vae'}_decoder_fwd_bwd"]
    backward = guided_steps * recurrence * backward_steps * (dec + network * guidance_calls_per_eval)
    return plain + guided + backward + p["vae_decoder_fwd"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    args = parser.parse_args(argv)
    import tempfile

    from headless.host import Host, default_comfyui_path
    Host(default_comfyui_path(), tempfile.mkdtemp(prefix="ug-flops-"))
    result = parts(args.latent)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"flops_sd15_{args.latent}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    for k, v in result.items():
        print(f"{k:24s} {v:.4g}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
