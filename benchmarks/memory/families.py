"""The model families of the memory benchmark, built from ComfyUI's own classes on the ``meta`` device: the
denoisers (``unet_config`` of the released checkpoints: SD1.5, SDXL, SD3.5-medium/large, Flux-dev, Flux-dev fp8)
and the decoders (the full VAE, TAESD / TAESD3 / TAEF1), in the dtypes ComfyUI picks on a current NVIDIA GPU; one
guided iteration on them (``iteration_fn``), its inputs, the blocks ``low_memory`` recomputes, and the row of the
table (``count_row``: counted peak, and what the pack's ``memory_plan`` reserves for it).
"""
from __future__ import annotations

import os
import sys
import time

import torch

from benchmarks.memory.counter import GB, count

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CARDS_GB = (8, 12, 16, 24)


# unet_config of the released checkpoints, as ComfyUI's model_detection finds them (SD1.5/SDXL: its own lists in
# unet_config_from_diffusers_unet; SD3.5/Flux: detect_unet_config on the files' keys and shapes).
SD15_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320,
             'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0],
             'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1, 'use_linear_in_transformer': False,
             'context_dim': 768, 'num_heads': 8, 'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             'use_temporal_attention': False, 'use_temporal_resblock': False}
SDXL_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4,
             'model_channels': 320, 'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10],
             'channel_mult': [1, 2, 4], 'transformer_depth_middle': 10, 'use_linear_in_transformer': True,
             'context_dim': 2048, 'num_head_channels': 64,
             'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
             'use_temporal_attention': False, 'use_temporal_resblock': False}


def _mmdit(depth: int, pos_embed_max_size: int, x_block_self_attn_layers: list) -> dict:
    return {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": depth, "input_size": None,
            "adm_in_channels": 2048,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": 64 * depth}},
            "num_patches": pos_embed_max_size ** 2, "pos_embed_max_size": pos_embed_max_size, "qk_norm": "rms",
            "pos_embed_scaling_factor": None, "x_block_self_attn_layers": x_block_self_attn_layers}


FLUX_DEV = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
            "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
            "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
            "guidance_embed": True}

VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

# family: unet_config, weight dtype, compute dtype (manual cast), pixels, CFG batch, text tokens × width,
# pooled width (y), latent channels
FAMILIES = {
    "SD1.5": dict(unet=SD15_UNET, dtype=torch.float16, pixels=512, batch=2, ctx=(77, 768), y=None, ch=4),
    "SDXL": dict(unet=SDXL_UNET, dtype=torch.float16, pixels=1024, batch=2, ctx=(77, 2048), y=2816, ch=4),
    "SD3.5-medium": dict(unet=_mmdit(24, 384, list(range(13))), dtype=torch.bfloat16, pixels=1024, batch=2,
                         ctx=(154, 4096), y=2048, ch=16),
    "SD3.5-large": dict(unet=_mmdit(38, 192, []), dtype=torch.bfloat16, pixels=1024, batch=2, ctx=(154, 4096),
                        y=2048, ch=16),
    "Flux-dev": dict(unet=FLUX_DEV, dtype=torch.bfloat16, pixels=1024, batch=1, ctx=(256, 4096), y=768, ch=16),
    "Flux-dev fp8": dict(unet=FLUX_DEV, dtype=torch.float8_e4m3fn, compute=torch.bfloat16, pixels=1024, batch=1,
                         ctx=(256, 4096), y=768, ch=16),
}
VAE_DTYPE = torch.bfloat16  # ComfyUI's VAE dtype on GPUs with bf16 (model_management.vae_dtype)


def build_denoiser(family: dict, device="meta"):
    """(model_config, diffusion_model) through ComfyUI's own classes: the supported model that matches the config,
    its inference dtype set as a loader does, and ``get_model`` (model_base → the UNet / MMDiT / Flux)."""
    import comfy.model_detection as detection
    unet_config = dict(family["unet"])
    model_config = detection.model_config_from_unet_config(unet_config)
    if model_config is None:
        raise RuntimeError(f"ComfyUI knows no model with unet_config {unet_config}")
    model_config.set_inference_dtype(family["dtype"], family.get("compute"))
    model = model_config.get_model({}, device=device)
    model.diffusion_model.requires_grad_(False)
    return model_config, model


def build_decoder(kind: str, latent_channels: int, device="meta", dtype=None):
    """(resident module, decode function): the full VAE (encoder + decoder resident, decoder run) or TAESD."""
    dtype = dtype or VAE_DTYPE
    if kind == "vae":
        from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder
        import comfy.ops
        cfg = dict(VAE_DDCONFIG, z_channels=latent_channels)
        with torch.device(device):
            vae = torch.nn.Module()
            vae.encoder = Encoder(**cfg)
            vae.decoder = Decoder(**cfg)
            if latent_channels == 4:  # SD VAE: quant convs; SD3/Flux VAE: none
                vae.quant_conv = comfy.ops.disable_weight_init.Conv2d(8, 8, 1)
                vae.post_quant_conv = comfy.ops.disable_weight_init.Conv2d(4, 4, 1)
        vae = vae.to(dtype).requires_grad_(False)
        for m in vae.modules():  # SDPA, as ComfyUI's VAE uses on GPUs
            if hasattr(m, "optimized_attention"):
                from comfy.ldm.modules.diffusionmodules.model import pytorch_attention
                m.optimized_attention = pytorch_attention

        def decode(z):
            if hasattr(vae, "post_quant_conv"):
                z = vae.post_quant_conv(z)
            return vae.decoder(z)
        return vae, decode
    from comfy.taesd.taesd import TAESD
    with torch.device(device):
        tae = TAESD(latent_channels=latent_channels)
    tae = tae.to(dtype).requires_grad_(False)
    return tae, tae.decode


def low_memory_targets(unet, decoder) -> list:
    """The blocks recomputed in the backward pass: the UNet's ResBlocks and SpatialTransformers (as
    ``nodes.guided_calls.checkpoint_targets`` on hosts without in-place residuals), SD3's JointBlocks, Flux's
    DoubleStreamBlocks and SingleStreamBlocks, the decoder's ResnetBlocks / AttnBlocks / TAESD Blocks."""
    names = ("JointBlock", "DoubleStreamBlock", "SingleStreamBlock")
    targets = [m for m in unet.modules() if type(m).__name__ in names]
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    targets += [m for m in unet.modules() if isinstance(m, (ResBlock, SpatialTransformer))]
    dec = getattr(decoder, "decoder", None) or getattr(decoder, "taesd_decoder", None)
    if dec is not None:
        targets += [m for m in dec.modules() if type(m).__name__ in ("ResnetBlock", "AttnBlock", "Block")]
    return targets


def iteration_fn(model_config, unet, family: dict, decode, *, cfg_scale: float = 5.0):
    """One guided iteration (forward + backward to the latent), on the denoiser's own call signature."""
    dtype = family.get("compute") or family["dtype"]
    image_model = family["unet"].get("image_model")
    latent_format = model_config.latent_format
    vae_dtype = family.get("vae_dtype", VAE_DTYPE)

    def run(counter, x, t, ctx, y, guidance, target):
        with counter.saving():
            xl = x.detach().requires_grad_(True)
            xin = torch.cat([xl] * family["batch"]).to(dtype)
            kw = {}
            if image_model == "flux":
                out = unet(xin, t, ctx, y=y, guidance=guidance, transformer_options={})
            elif "depth" in family["unet"]:  # MMDiT
                out = unet(xin, t, context=ctx, y=y, transformer_options={})
            else:
                if y is not None:
                    kw["y"] = y
                out = unet(xin, timesteps=t, context=ctx, transformer_options={}, **kw)
            out = out.float()  # ComfyUI's apply_model returns fp32
            if family["batch"] == 2:
                cond, uncond = out.chunk(2)
                out = uncond + cfg_scale * (cond - uncond)
            x0 = xl - 0.5 * out  # calculate_denoised (σ = 0.5), EPS or flow alike
            z = latent_format.process_out(x0).to(vae_dtype)
            img = decode(z).float()
            loss = ((img.clamp(-1, 1) - target) ** 2).mean()
        grad, = torch.autograd.grad(loss, xl)
        return grad
    return run


def inputs(family: dict, pixels: int, device="meta", dtype=None):
    lat = pixels // 8
    b = family["batch"]
    dt = dtype or family.get("compute") or family["dtype"]
    with torch.device(device):
        x = torch.zeros(1, family["ch"], lat, lat)
        t = torch.full((b,), 0.5)
        ctx = torch.zeros(b, *family["ctx"], dtype=dt)
        y = torch.zeros(b, family["y"], dtype=dt) if family["y"] else None
        guidance = torch.full((b,), 3.5) if family["unet"].get("image_model") == "flux" else None
        target = torch.zeros(1, 3, pixels, pixels)
    return [x, t, ctx, y, guidance, target]


def _memory_plan():
    """The pack's ``nodes/memory_plan.py`` (loaded by path: ``nodes`` is ComfyUI's own module here)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ug_memory_plan", os.path.join(ROOT, "nodes", "memory_plan.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class _DecodeEstimate:
    """ComfyUI v0.3.64's ``VAE.memory_used_decode`` for AutoencoderKL and TAESD files (both keep the default)."""

    vae_dtype = VAE_DTYPE

    def __init__(self, kind: str):
        if kind != "vae":
            self.first_stage_model = type("TAESD", (), {})()  # what memory_plan tells TAESD files by

    @staticmethod
    def memory_used_decode(shape, dtype):
        return 2178 * shape[2] * shape[3] * 64 * torch.empty((), dtype=dtype).element_size()


def plan_estimate(base_model, family: dict, pixels: int, lowmem: bool, decoder_kind: str = "vae") -> float:
    """What the pack reserves for this iteration before sampling (GB): ``memory_plan``'s estimate of the transient
    memory (denoiser and decoder activations; cast weights without low_memory), the networks aside."""
    plan = _memory_plan()
    shape = (1, family["ch"], pixels // 8, pixels // 8)
    d = plan.denoiser_bytes(base_model, shape, family["batch"])
    v = plan.decoder_bytes(_DecodeEstimate(decoder_kind), shape)
    return (d[1] + v[1] if lowmem else d[0] + v[0]) / GB


def count_row(name: str, decoder_kind: str, lowmem: bool, *, pixels=None, device="meta", family=None) -> dict:
    family = family or FAMILIES[name]
    pixels = pixels or family["pixels"]
    model_config, base = build_denoiser(family, device)
    unet = base.diffusion_model
    dec, decode = build_decoder(decoder_kind, family["ch"], device, family.get("vae_dtype"))
    fn = iteration_fn(model_config, unet, family, decode)
    ins = inputs(family, pixels, device)
    targets = low_memory_targets(unet, dec) if lowmem else ()
    t0 = time.time()
    res = count(fn, ins, [unet, dec], checkpoint_modules=targets)
    res["plan_estimate_gb"] = plan_estimate(base, family, pixels, lowmem, decoder_kind)
    res["plan_estimate_covers"] = res["plan_estimate_gb"] >= res["transient_peak_gb"]
    return {"family": name, "pixels": pixels, "decoder": decoder_kind, "low_memory": lowmem,
            "weight_dtype": str(family["dtype"]).replace("torch.", ""),
            "compute_dtype": str(family.get("compute") or family["dtype"]).replace("torch.", ""),
            "vae_dtype": str(family.get("vae_dtype", VAE_DTYPE)).replace("torch.", ""), "cfg_batch": family["batch"],
            "checkpointed_modules": len(targets), **res,
            "fits_gb": [c for c in CARDS_GB if res["peak_gb"] <= c], "count_seconds": round(time.time() - t0, 1)}
