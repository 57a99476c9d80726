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
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops
    cfg = dict(config or UNET_CONFIG)
    with torch.device("meta"):
        unet = UNetModel(**cfg, operations=comfy.ops.disable_weight_init)
    # A smaller output layer keeps the random ε-prediction O(1).
    return _fill(_meta_shapes(unet), generator, out_scale={"out.2.": 0.2})


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
