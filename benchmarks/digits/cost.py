"""What a digits recipe would cost on Stable Diffusion 1.5 at 512², in TFLOP per image.

The digits benchmark runs a tiny model, so its seconds say little about SD. Its *evaluation counts* transfer: every
denoiser call, every denoiser call with a backward pass and every guidance evaluation of a recipe is priced at what
the same call costs on SD1.5 at 512² (64×64 latent), from FLOPs counted with ``torch.utils.flop_counter`` on
ComfyUI's own UNet, SD VAE decoder and TAESD decoder by ``benchmarks/flops.py`` (``python -m benchmarks.flops
--latent 64`` writes ``out/bench/flops_sd15_64.json``, shared with the 512² speed benchmark; without that file the
same counts, copied below, are used).

Per image (``price``)::

    sd_tflop = P·unet_fwd_b2 + G·unet_fwd_bwd_b2 + E·(decoder_fwd_bwd + C·network) + vae_decoder_fwd

* P: denoiser calls without a backward pass (plain steps, and the forward of a no-Jacobian iteration), CFG batch 2;
* G: denoiser calls with a backward pass to the input (guided iterations with the Jacobian), CFG batch 2;
* E: guidance evaluations — forward-guidance evaluations plus backward-guidance steps, one decoder forward+backward
  each (the SD VAE decoder for ``sd_tflop``, TAESD for ``sd_tflop_taesd``);
* C·network: the guidance network's forward+backward on C = augmentations × smoothing copies of the decoded image
  (the decoder still runs once per evaluation); network = CLIP ViT-B/32 at 224², 0.018 TFLOP (REFERENCE_FACTS B §5);
* the final decode is always one SD VAE decoder forward.

The weights are frozen, so "backward" means the gradient w.r.t. the input only.
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FLOPS_JSON = ROOT / "out" / "bench" / "flops_sd15_64.json"

# benchmarks/flops.py --latent 64 (SD1.5 at 512²; ComfyUI modules, torch.utils.flop_counter), TFLOP, batch 1
# unless named: the fallback when out/bench/flops_sd15_64.json has not been written on this machine.
COUNTED_SD15_512 = {
    "latent": 64, "pixels": 512,
    "unet_fwd_b1": 0.80327344128, "unet_fwd_bwd_b1": 1.72603375616,
    "unet_fwd_b2": 1.60654688256, "unet_fwd_bwd_b2": 3.45206751232,
    "vae_decoder_fwd": 2.514518933504, "vae_decoder_fwd_bwd": 5.063397605376,
    "taesd_decoder_fwd": 0.141350141952, "taesd_decoder_fwd_bwd": 0.282700283904,
}
# The assumed guidance network: CLIP ViT-B/32 forward+backward at 224² (REFERENCE_FACTS.md, Part B §5).
NETWORK = "CLIP ViT-B/32 fwd+bwd at 224²"
NETWORK_TFLOP = 0.018
CFG = True  # the official SD scripts all use classifier-free guidance (scale 1.5–7.5): the UNet runs on batch 2
KEYS = ("unet_fwd_b2", "unet_fwd_bwd_b2", "vae_decoder_fwd", "vae_decoder_fwd_bwd", "taesd_decoder_fwd_bwd")


def parts(path: Path = FLOPS_JSON) -> tuple[dict, str]:
    """``({part: TFLOP}, source)``: the speed benchmark's counts when written, else the copy above."""
    try:
        data = json.loads(Path(path).read_text())
        if data.get("latent") == 64 and all(isinstance(data.get(k), (int, float)) for k in KEYS):
            return data, str(Path(path).relative_to(ROOT)) if Path(path).is_relative_to(ROOT) else str(path)
    except (OSError, ValueError):
        pass
    return dict(COUNTED_SD15_512), "benchmarks/digits/cost.py (copy of benchmarks/flops.py --latent 64)"


def price(counts: dict, *, copies: int = 1, decoder: str = "vae", p: dict | None = None,
          network: float = NETWORK_TFLOP) -> float:
    """TFLOP per image at SD1.5 512² of a run with these per-image ``counts`` (keys ``denoiser``,
    ``denoiser_with_grad``, ``decoder``, ``guidance_network``; fractions allowed: means over images)."""
    p = p or parts()[0]
    b = "b2" if CFG else "b1"
    plain = counts["denoiser"] - counts["denoiser_with_grad"]
    dec = p["taesd_decoder_fwd_bwd"] if decoder == "taesd" else p["vae_decoder_fwd_bwd"]
    return (plain * p[f"unet_fwd_{b}"] + counts["denoiser_with_grad"] * p[f"unet_fwd_bwd_{b}"]
            + counts["decoder"] * dec + counts["guidance_network"] * copies * network + p["vae_decoder_fwd"])


def official_tflop(steps: int, recurrence: int, *, decoder: str = "vae", p: dict | None = None) -> float:
    """The official SD scripts' recipe at their own step count: forward guidance on every step, k repeats, no
    backward guidance — through ``benchmarks.flops.recipe_tflop`` (the speed benchmark's pricing)."""
    from benchmarks.flops import recipe_tflop

    return recipe_tflop(p or parts()[0], steps=steps, guided_steps=steps, recurrence=recurrence, cfg=CFG,
                        decoder=decoder, network=NETWORK_TFLOP)


# The official Universal Guidance SD scripts (REFERENCE_FACTS A1): (task, DDIM steps, k)
OFFICIAL = [("face", 500, 2), ("segmentation", 500, 10), ("object detection", 250, 5), ("style", 500, 6)]
