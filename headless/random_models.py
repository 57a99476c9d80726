"""Randomly initialized models in the real file formats, written at test or benchmark time.

The SD1.5-architecture checkpoint keeps what ComfyUI's model detection needs (320 model channels, 768-wide
cross-attention, conv proj_in, the SD1 CLIP-L text encoder and the SD VAE) and shrinks the rest: two UNet
levels of one res block and one transformer block each. Weights are random with fan-in scaling, so the
networks are smooth, non-trivial functions of their inputs.
"""
from __future__ import annotations

import math

import torch
from safetensors.torch import save_file

UNET_CONFIG = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
    in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1], channel_mult=[1, 1],
    transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=768, num_heads=8, num_head_channels=-1,
    use_temporal_resblock=False, use_temporal_attention=False)

VAE_DDCONFIG = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
                'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}

CLIP_L = dict(vocab=49408, positions=77, width=768, layers=12, mlp=3072)


def _fill(shapes: dict, generator: torch.Generator, dtype=torch.float32, out_scale: dict | None = None) -> dict:
    sd = {}
    for name, shape in shapes.items():
        shape = tuple(shape)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias" or name.endswith("norm.bias"):
            t = torch.zeros(shape)
        elif len(shape) == 1:
            t = torch.ones(shape) if ("norm" in name or leaf == "weight") else torch.zeros(shape)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        for prefix, scale in (out_scale or {}).items():
            if name.startswith(prefix):
                t = t * scale
        sd[name] = t.to(dtype)
    return sd


def _meta_shapes(module: torch.nn.Module) -> dict:
    return {k: v.shape for k, v in module.state_dict().items()}


def unet_state_dict(generator, config: dict | None = None):
    # A smaller output layer keeps the random ε-prediction O(1).
    return _fill(_meta_shapes_of_unet(dict(config or UNET_CONFIG)), generator, out_scale={"out.2.": 0.2})


def vae_state_dict(generator):
    from comfy.ldm.models.autoencoder import AutoencoderKL
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4)
    return _fill(_meta_shapes(vae), generator)


def clip_l_state_dict(generator, prefix="cond_stage_model.transformer.text_model."):
    c = CLIP_L
    shapes = {"embeddings.token_embedding.weight": (c["vocab"], c["width"]),
              "embeddings.position_embedding.weight": (c["positions"], c["width"]),
              "final_layer_norm.weight": (c["width"],), "final_layer_norm.bias": (c["width"],)}
    for i in range(c["layers"]):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (c["width"], c["width"])
            shapes[p + f"self_attn.{proj}.bias"] = (c["width"],)
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[p + f"{ln}.weight"] = (c["width"],)
            shapes[p + f"{ln}.bias"] = (c["width"],)
        shapes[p + "mlp.fc1.weight"] = (c["mlp"], c["width"])
        shapes[p + "mlp.fc1.bias"] = (c["mlp"],)
        shapes[p + "mlp.fc2.weight"] = (c["width"], c["mlp"])
        shapes[p + "mlp.fc2.bias"] = (c["width"],)
    sd = _fill(shapes, generator, dtype=torch.float16)
    for k in ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight"):
        sd[k] = (sd[k].float() * 0.02 * math.sqrt(sd[k].shape[1])).half()
    return {prefix + k: v for k, v in sd.items()}


# The real SD1.5 UNet (860M parameters), for speed measurements. transformer_depth_output lists the output blocks
# from the shallowest to the deepest (UNetModel pops it from the end): the deepest level has no transformer.
FULL_SD15_UNET = dict(UNET_CONFIG, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                      transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                      transformer_depth_middle=1)


def write_sd15_checkpoint(path: str, seed: int = 0, unet_config: dict | None = None,
                          dtype=torch.float32) -> str:
    """An SD1.5-architecture checkpoint (UNet + CLIP-L + VAE), random weights, safetensors.

    ``unet_config``: ``UNET_CONFIG`` (tiny, the default) or ``FULL_SD15_UNET``.
    """
    g = torch.Generator().manual_seed(seed)
    sd = {"model.diffusion_model." + k: v.to(dtype) for k, v in unet_state_dict(g, unet_config).items()}
    sd.update({"first_stage_model." + k: v for k, v in vae_state_dict(g).items()})
    sd.update(clip_l_state_dict(g))
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def write_vae(path: str, seed: int = 1) -> str:
    g = torch.Generator().manual_seed(seed)
    save_file({k: v.contiguous() for k, v in vae_state_dict(g).items()}, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Other model families: SD2.x v-prediction, SDXL, SD3 and Flux. Each writer keeps exactly what ComfyUI's model
# detection (comfy/model_detection.py, comfy/supported_models.py) matches on and shrinks everything else. The text
# encoders are fixed-size in ComfyUI (their configs are JSON files), so CLIP-H / CLIP-G are full size; they are
# stored in fp16. No writer here makes a T5-XXL (4.7B parameters).
# ---------------------------------------------------------------------------------------------------------------

# SD2.x (768-v): detected as SD20 by context_dim 1024, 320 channels, linear proj_in and no adm; ComfyUI calls it
# V_PREDICTION when output_blocks.11.1.transformer_blocks.0.norm1.bias has a standard deviation above 0.09, so the
# UNet keeps 12 output blocks (4 levels of 2 res blocks) with a transformer in the last one; channel_mult stays 1.
SD2_UNET_CONFIG = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
    in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 1, 1, 1],
    transformer_depth=[1, 0, 0, 0, 0, 0, 0, 0], transformer_depth_output=[1] + [0] * 11,
    transformer_depth_middle=-2, use_linear_in_transformer=True, context_dim=1024, num_heads=-1,
    num_head_channels=64, use_temporal_resblock=False, use_temporal_attention=False)
SD2_V_MARKER = "output_blocks.11.1.transformer_blocks.0.norm1.bias"

# SDXL: the SDXL-family class with the fewest transformer blocks is Segmind_Vega ([0, 0, 1, 1, 2, 2]; full
# SDXL is [0, 0, 2, 2, 10, 10]); it is a subclass of supported_models.SDXL (model_base.SDXL, CLIP-L + CLIP-G).
SDXL_UNET_CONFIG = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, num_classes="sequential",
    adm_in_channels=2816, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    channel_mult=[1, 1, 1], transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_output=[0] * 9,
    transformer_depth_middle=-2, use_linear_in_transformer=True, context_dim=2048, num_heads=-1,
    num_head_channels=64, use_temporal_resblock=False, use_temporal_attention=False)

# SD3 (MMDiT): ComfyUI reads depth from the patch embedding width (hidden = 64·depth, heads = depth); it matches
# on 16 input channels. Context 4096 (CLIP-L ‖ CLIP-G padded, or T5), pooled 2048 (CLIP-L ‖ CLIP-G).
SD3_DEPTH = 2
SD3_POS_EMBED_MAX = 16

# Flux: ComfyUI fixes hidden 3072, 24 heads and context 4096; it counts the double / single blocks and reads the
# pooled-vector width from vector_in. One double-stream and one single-stream block (Flux-dev: 19 and 38).
# vec_in_dim is 2048 (not Flux's 768) so that the stock SD3-type text encoder with CLIP-L only (CLIPLoader type
# 'sd3': context = CLIP-L padded to 4096, pooled = CLIP-L ‖ zeros = 2048) conditions it: the real second encoder,
# T5-XXL (4.7B parameters), does not fit a CPU test.
FLUX_CONFIG = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=2048, context_in_dim=4096,
                   hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1,
                   axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)

CLIP_H = dict(vocab=49408, positions=77, width=1024, layers=24, mlp=4096, projection=1024)
CLIP_G = dict(vocab=49408, positions=77, width=1280, layers=32, mlp=5120, projection=1280)
CLIP_L_PROJ = dict(CLIP_L, projection=768)


def clip_text_state_dict(generator, config: dict, prefix: str = "", *, open_clip: bool = False,
                         dtype=torch.float16) -> dict:
    """A random CLIP text tower, in Hugging Face naming (``text_model.…`` + ``text_projection.weight``) or in
    open_clip naming (``transformer.resblocks.…``, ``positional_embedding``, ``text_projection``), as the SD2
    and SDXL checkpoints store CLIP-H / CLIP-G. Embeddings have std 0.02 as in CLIP."""
    w, m, L = config["width"], config["mlp"], config["layers"]
    shapes = {}
    if open_clip:
        shapes["token_embedding.weight"] = (config["vocab"], w)
        shapes["positional_embedding"] = (config["positions"], w)
        for i in range(L):
            p = f"transformer.resblocks.{i}."
            shapes.update({p + "ln_1.weight": (w,), p + "ln_1.bias": (w,), p + "ln_2.weight": (w,),
                           p + "ln_2.bias": (w,), p + "attn.in_proj_weight": (3 * w, w),
                           p + "attn.in_proj_bias": (3 * w,), p + "attn.out_proj.weight": (w, w),
                           p + "attn.out_proj.bias": (w,), p + "mlp.c_fc.weight": (m, w), p + "mlp.c_fc.bias": (m,),
                           p + "mlp.c_proj.weight": (w, m), p + "mlp.c_proj.bias": (w,)})
        shapes["ln_final.weight"] = (w,)
        shapes["ln_final.bias"] = (w,)
        shapes["text_projection"] = (w, config["projection"])
        embeddings = ("token_embedding.weight", "positional_embedding")
    else:
        t = "text_model."
        shapes[t + "embeddings.token_embedding.weight"] = (config["vocab"], w)
        shapes[t + "embeddings.position_embedding.weight"] = (config["positions"], w)
        for i in range(L):
            p = f"{t}encoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[p + f"self_attn.{proj}.weight"] = (w, w)
                shapes[p + f"self_attn.{proj}.bias"] = (w,)
            for ln in ("layer_norm1", "layer_norm2"):
                shapes[p + f"{ln}.weight"] = (w,)
                shapes[p + f"{ln}.bias"] = (w,)
            shapes.update({p + "mlp.fc1.weight": (m, w), p + "mlp.fc1.bias": (m,), p + "mlp.fc2.weight": (w, m),
                           p + "mlp.fc2.bias": (w,)})
        shapes[t + "final_layer_norm.weight"] = (w,)
        shapes[t + "final_layer_norm.bias"] = (w,)
        shapes["text_projection.weight"] = (config["projection"], w)
        embeddings = (t + "embeddings.token_embedding.weight", t + "embeddings.position_embedding.weight")
    sd = _fill(shapes, generator, dtype=dtype)
    for k in embeddings:
        sd[k] = (sd[k].float() * 0.02 * math.sqrt(sd[k].shape[1])).to(dtype)
    return {prefix + k: v for k, v in sd.items()}


def vae16_state_dict(generator):
    """The 16-channel KL autoencoder of SD3 and Flux (no quant convs, as in their VAE files)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=dict(VAE_DDCONFIG, z_channels=16), embed_dim=16)
    shapes = {k: v for k, v in _meta_shapes(vae).items() if not k.startswith(("quant_conv.", "post_quant_conv."))}
    return _fill(shapes, generator)


def mmdit_state_dict(generator, depth: int = SD3_DEPTH, pos_embed_max_size: int = SD3_POS_EMBED_MAX):
    """An SD3-architecture MMDiT (needs a ComfyUI with comfy.ldm.modules.diffusionmodules.mmdit: 2024-06 on)."""
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
    import comfy.ops
    hidden = 64 * depth
    with torch.device("meta"):
        net = OpenAISignatureMMDITWrapper(
            in_channels=16, out_channels=16, patch_size=2, depth=depth, input_size=None, adm_in_channels=2048,
            context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096,
                                                                              "out_features": hidden}},
            num_patches=pos_embed_max_size ** 2, pos_embed_max_size=pos_embed_max_size,
            pos_embed_scaling_factor=None, operations=comfy.ops.disable_weight_init)
    return _fill(_meta_shapes(net), generator, out_scale={"final_layer.linear.": 0.2})


def flux_state_dict(generator, config: dict | None = None):
    """A Flux-architecture transformer (needs a ComfyUI with comfy.ldm.flux: 2024-08 on)."""
    from comfy.ldm.flux.model import Flux
    import comfy.ops
    with torch.device("meta"):
        net = Flux(**dict(config or FLUX_CONFIG), operations=comfy.ops.disable_weight_init)
    return _fill(_meta_shapes(net), generator, out_scale={"final_layer.linear.": 0.2})


def _save(sd: dict, path: str) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def write_sd2_v_checkpoint(path: str, seed: int = 0, dtype=torch.float16) -> str:
    """An SD2.x 768-v-architecture checkpoint (UNet + open_clip CLIP-H + VAE), detected as v-prediction.

    ``dtype`` (here and below): the storage type of the UNet / transformer and the VAE; text encoders are fp16.
    ComfyUI casts on load (fp32 on a CPU)."""
    g = torch.Generator().manual_seed(seed)
    unet = unet_state_dict(g, SD2_UNET_CONFIG)
    unet[SD2_V_MARKER] = 0.2 * torch.randn(unet[SD2_V_MARKER].shape, generator=g)  # what makes it "v"
    sd = {"model.diffusion_model." + k: v.to(dtype) for k, v in unet.items()}
    sd.update({"first_stage_model." + k: v.to(dtype) for k, v in vae_state_dict(g).items()})
    sd.update(clip_text_state_dict(g, CLIP_H, "cond_stage_model.model.", open_clip=True))
    return _save(sd, path)


def write_sdxl_checkpoint(path: str, seed: int = 0, dtype=torch.float16) -> str:
    """An SDXL-family checkpoint (Segmind-Vega depth; CLIP-L + open_clip CLIP-G + VAE), as sgm saves it."""
    g = torch.Generator().manual_seed(seed)
    sd = {"model.diffusion_model." + k: v.to(dtype) for k, v in unet_state_dict(g, SDXL_UNET_CONFIG).items()}
    sd.update({"first_stage_model." + k: v.to(dtype) for k, v in vae_state_dict(g).items()})
    sd.update(clip_text_state_dict(g, CLIP_L_PROJ, "conditioner.embedders.0.transformer."))
    sd.update(clip_text_state_dict(g, CLIP_G, "conditioner.embedders.1.model.", open_clip=True))
    return _save(sd, path)


def write_sd3_checkpoint(path: str, seed: int = 0, dtype=torch.float16) -> str:
    """An SD3-architecture checkpoint with CLIP-L and CLIP-G and no T5 (like sd3_medium_incl_clips)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"model.diffusion_model." + k: v.to(dtype) for k, v in mmdit_state_dict(g).items()}
    sd.update({"first_stage_model." + k: v.to(dtype) for k, v in vae16_state_dict(g).items()})
    sd.update(clip_text_state_dict(g, CLIP_L_PROJ, "text_encoders.clip_l.transformer."))
    sd.update(clip_text_state_dict(g, CLIP_G, "text_encoders.clip_g.transformer."))
    return _save(sd, path)


def write_flux_diffusion_model(path: str, seed: int = 0, dtype=torch.float16) -> str:
    """A Flux-dev-architecture diffusion model file (guidance-distilled: guidance_in), for UNETLoader."""
    g = torch.Generator().manual_seed(seed)
    return _save({k: v.to(dtype) for k, v in flux_state_dict(g).items()}, path)


def write_vae16(path: str, seed: int = 1, dtype=torch.float16) -> str:
    """A 16-channel VAE file (the format of Flux's ae.safetensors), for VAELoader."""
    return _save({k: v.to(dtype) for k, v in vae16_state_dict(torch.Generator().manual_seed(seed)).items()}, path)


def write_clip_l(path: str, seed: int = 2) -> str:
    """A CLIP-L text encoder file (Hugging Face naming, as clip_l.safetensors), for CLIPLoader."""
    return _save(clip_text_state_dict(torch.Generator().manual_seed(seed), CLIP_L_PROJ), path)


# ---------------------------------------------------------------------------------------------------------------
# Add-ons of the tiny SD1.5 checkpoint: a ControlNet and a LoRA, in the formats the stock ControlNetLoader and
# LoraLoader read.
# ---------------------------------------------------------------------------------------------------------------

def controlnet_state_dict(generator, config: dict | None = None, hint_channels: int = 3,
                          zero_conv_scale: float = 0.5) -> dict:
    """A ControlNet for the UNet of ``config`` (lllyasviel's ``cldm`` layout: the UNet's input and middle blocks,
    the hint encoder, one zero convolution per input block and the middle-block output), keys prefixed
    ``control_model.`` as in the original ``.pth``/``.safetensors`` releases. The zero convolutions are random
    (``zero_conv_scale`` of fan-in scaling) instead of zero, so the control has an effect."""
    from comfy.cldm.cldm import ControlNet
    import comfy.ops
    cfg = {k: v for k, v in dict(config or UNET_CONFIG).items() if k != "out_channels"}
    with torch.device("meta"):
        net = ControlNet(**cfg, hint_channels=hint_channels, operations=comfy.ops.disable_weight_init)
    sd = _fill(_meta_shapes(net), generator, out_scale={"zero_convs.": zero_conv_scale,
                                                        "middle_block_out.": zero_conv_scale})
    return {"control_model." + k: v for k, v in sd.items()}


def write_controlnet(path: str, seed: int = 3, dtype=torch.float16) -> str:
    """A ControlNet file for the tiny SD1.5 checkpoint (``models/controlnet``), random weights."""
    g = torch.Generator().manual_seed(seed)
    return _save({k: v.to(dtype) for k, v in controlnet_state_dict(g).items()}, path)


LORA_UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
LORA_CLIP_LAYERS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1",
                    "mlp_fc2")


def lora_state_dict(generator, config: dict | None = None, rank: int = 4, scale: float = 0.2,
                    clip_layers: int = CLIP_L["layers"]) -> dict:
    """A LoRA for the tiny SD1.5 checkpoint in kohya's naming (``lora_unet_<diffusers name>`` and
    ``lora_te_text_model_encoder_layers_<i>_<name>``, each with ``lora_down.weight``, ``lora_up.weight`` and
    ``alpha``) on the attention, projection and feed-forward layers. Each update up·down·alpha/rank is about
    ``scale`` times the size of the weight it changes."""
    import comfy.utils
    cfg = dict(config or UNET_CONFIG)
    unet_shapes = _meta_shapes_of_unet(cfg)
    diffusers = comfy.utils.unet_to_diffusers(cfg)  # diffusers name -> ComfyUI (ldm) name
    targets = {}
    for name, ldm in diffusers.items():
        stem = name[:-len(".weight")] if name.endswith(".weight") else None
        if stem and stem.endswith(LORA_UNET_LAYERS) and ldm in unet_shapes:
            targets["lora_unet_" + stem.replace(".", "_")] = tuple(unet_shapes[ldm])
    w, m = CLIP_L["width"], CLIP_L["mlp"]
    for i in range(clip_layers):
        for layer in LORA_CLIP_LAYERS:
            shape = (m, w) if layer == "mlp_fc1" else (w, m) if layer == "mlp_fc2" else (w, w)
            targets[f"lora_te_text_model_encoder_layers_{i}_{layer}"] = shape
    sd = {}
    for key, shape in targets.items():
        out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
        down = torch.randn((rank, in_dim) + kernel, generator=generator) / math.sqrt(in_dim * math.prod(kernel))
        up = torch.randn((out_dim, rank) + (1,) * len(kernel), generator=generator) * scale / math.sqrt(rank)
        sd[key + ".lora_down.weight"] = down
        sd[key + ".lora_up.weight"] = up
        sd[key + ".alpha"] = torch.tensor(float(rank))
    return sd


def _meta_shapes_of_unet(config: dict) -> dict:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops
    with torch.device("meta"):
        unet = UNetModel(**config, operations=comfy.ops.disable_weight_init)
    return _meta_shapes(unet)


def write_lora(path: str, seed: int = 4, dtype=torch.float16) -> str:
    """A LoRA file for the tiny SD1.5 checkpoint (``models/loras``), random weights."""
    g = torch.Generator().manual_seed(seed)
    return _save({k: v.to(dtype) for k, v in lora_state_dict(g).items()}, path)
