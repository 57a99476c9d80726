"""The run behind ``UG Attention Map``: one denoiser pass with attention capture, through ComfyUI's own sampling
(conditioning, model loading, noise) with a one-step SAMPLER whose function records the maps."""
from __future__ import annotations

import torch

import comfy.sample
import comfy.samplers

from ..guidance import selfguidance as sg
from . import attention_capture as ac
from .errors import GuidanceInputError
from .tokens import token_positions


def _encode(clip, prompt: str):
    tokens = clip.tokenize(prompt)
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def attention_heat(node: str, model, clip, prompt: str, words: str, layers: str, latent: dict,
                   noise_level: float, seed: int) -> torch.Tensor:
    """``[B, H, W]`` heat map in [0, 1] at 8× the latent's size: the words' maps, averaged over layers."""
    positions, length = token_positions(clip, prompt, words, node)
    base = model.model
    unet = ac.capture_network(base)  # a UNet, or SD3's / Flux's joint-attention transformer
    if unet is None:
        raise GuidanceInputError(f"{node}: input 'model': {ac.unsupported_message(base)}")
    try:
        names = ac.resolve_layer_rule(layers, unet)
    except ValueError as e:
        raise GuidanceInputError(f"{node}: inputs 'layers' / 'blocks': {e}") from None
    all_layers = ac.attention_layers(unet)
    chosen = all_layers if names == ac.AUTO else {n: all_layers[n] for n in names}
    sampling = model.get_model_object("model_sampling") if hasattr(model, "get_model_object") \
        else base.model_sampling
    sigma = float(sampling.percent_to_sigma(min(max(noise_level, 0.0), 0.999)))
    captured = {}

    def one_pass(model_wrap, x, sigmas, extra_args=None, callback=None, disable=None, **_):
        s_in = sigmas[0] * x.new_ones([x.shape[0]])
        x0, internals = ac.captured_call(model_wrap, x, s_in, dict(extra_args or {}), unet, chosen, length, False,
                                         positions)
        captured["internals"] = internals
        return x0

    samples = latent["samples"]
    if hasattr(comfy.sample, "fix_empty_latent_channels"):
        samples = comfy.sample.fix_empty_latent_channels(model, samples)
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    cond = _encode(clip, prompt)
    comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.KSAMPLER(one_pass),
                               torch.tensor([sigma, 0.0]), cond, cond, samples, disable_pbar=True, seed=seed)
    size = (samples.shape[-2] * 8, samples.shape[-1] * 8)
    return sg.heat_map(captured["internals"], positions, names, size).cpu().float()
