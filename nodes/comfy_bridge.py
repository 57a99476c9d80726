"""Everything the engine needs from ComfyUI, and every ComfyUI trap handled in one place.

* Autograd inside the executor: the executor runs nodes under ``torch.inference_mode()``; guidance runs under
  ``inference_mode(False)`` with inputs cloned to normal tensors.
* Inference-tensor weights: the stock loaders create weights as inference tensors, which autograd cannot save.
  ``TrainableWeights`` swaps them for normal, frozen copies for the duration of one run and puts the originals
  back afterwards (the cached, shared model is left as it was).
* The 2024-03 UNet's in-place ``x += n`` in its transformer block: on such hosts the activations the denoiser
  saves for backward are copied (``saved_tensor_guard``, around the denoiser call only).
* Differentiable decode: ``first_stage_model.decode`` on ``process_latent_out`` latents, mapped [-1,1]→[0,1]
  without the clamp of ``VAE.decode`` (and without its inference-mode tiled OOM fallback).
* UNet and VAE are loaded together with ``load_models_gpu``; progress counts steps × k; previews are detached;
  the interrupt flag is checked in every inner loop.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time

import torch

import comfy.model_management as mm
import comfy.model_sampling
import comfy.samplers
import comfy.utils

from ..guidance import FLOW, VE, Settings, Stats, sample_universal, total_iterations

log = logging.getLogger("universal_guidance")


class GuidanceInputError(ValueError):
    """A user-facing error; the message names the node and the input and says what to do."""


def parameterization_of(base_model, node: str):
    """VE for EPS / V-prediction / EDM / X0 models, flow for CONST (SD3, Flux); anything else is refused."""
    ms = base_model.model_sampling
    const = getattr(comfy.model_sampling, "CONST", None)
    if const is not None and isinstance(ms, const):
        return FLOW
    if isinstance(ms, comfy.model_sampling.EPS):
        return VE
    raise GuidanceInputError(
        f"{node}: input 'model': this model's sampling type ({type(ms).__name__}) is not supported. Universal "
        f"Guidance supports EPS / V-prediction / EDM models (SD1.x, SD2.x, SDXL) and flow models (SD3, Flux).")


def _needs_copy(t: torch.Tensor) -> bool:
    if t.is_inference():
        return True
    try:
        t._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return True
    return False


class TrainableWeights:
    """Make modules usable under autograd for one run, and put them back exactly as they were.

    Inference-tensor parameters and buffers are replaced by normal copies (frozen); parameters that require
    grad are frozen. ``refresh()`` may be called again (e.g. after ComfyUI reloaded a model); ``restore()``
    reinstates the original tensor objects and flags.
    """

    def __init__(self, *modules):
        self.modules = [m for m in modules if m is not None]
        self._swapped = []
        self._unfrozen = []

    def refresh(self) -> int:
        count = 0
        with torch.inference_mode(False):
            for root in self.modules:
                for mod in root.modules():
                    for store in (mod._parameters, mod._buffers):
                        for name, t in list(store.items()):
                            if t is None:
                                continue
                            if _needs_copy(t):
                                copy = t.detach().clone()
                                if isinstance(t, torch.nn.Parameter):
                                    copy = torch.nn.Parameter(copy, requires_grad=False)
                                self._swapped.append((store, name, t))
                                store[name] = copy
                                count += 1
                            elif t.requires_grad and store is mod._parameters:
                                t.requires_grad_(False)
                                self._unfrozen.append(t)
        return count

    def restore(self) -> None:
        for store, name, t in reversed(self._swapped):
            store[name] = t
        for t in self._unfrozen:
            t.requires_grad_(True)
        self._swapped.clear()
        self._unfrozen.clear()


@functools.lru_cache(maxsize=None)
def _host_has_inplace_residual() -> bool:
    """True where the UNet transformer block adds its residual in place (ComfyUI before 2025-06)."""
    try:
        from comfy.ldm.modules.attention import BasicTransformerBlock
        return "x += n" in inspect.getsource(BasicTransformerBlock)
    except Exception:  # no source available: be safe
        return True


class _Kept:
    """A saved tensor kept as it is, with its version: an in-place change before backward is still an error."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor, version: int):
        self.tensor, self.version = tensor, version


def _pack_saved(t: torch.Tensor):
    # Only activations on the gradient path can be the residual that is modified in place: copy those. Frozen
    # weights (and their transposed views, which the Linear layers save), the conditioning and other tensors off
    # that path are kept without a copy (at small sizes the weight views are most of the bytes saved).
    if t.requires_grad and not isinstance(t, torch.nn.Parameter):
        return t.clone()
    try:
        return _Kept(t, t._version)
    except RuntimeError:  # no version counter (an inference tensor): copy it
        return t.clone()


def _unpack_saved(packed):
    if isinstance(packed, _Kept):
        # saved_tensors_hooks bypass autograd's own version check: repeat it for the tensors we did not copy.
        if packed.tensor._version != packed.version:
            raise RuntimeError("Universal Guidance: a tensor saved for backward was modified in place "
                               "(an unsupported in-place operation in the model)")
        return packed.tensor
    return packed


def saved_tensor_guard():
    """Copy the activations saved for backward on hosts whose UNet modifies them in place afterwards.

    Wrap the denoiser call only: the decoder and the guidance networks need no copies.
    """
    if _host_has_inplace_residual():
        return torch.autograd.graph.saved_tensors_hooks(_pack_saved, _unpack_saved)
    return contextlib.nullcontext()


def _normal(obj):
    """Clone inference tensors (also inside dicts/lists) so autograd may save them."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if _needs_copy(obj) else obj
    if isinstance(obj, dict):
        return {k: _normal(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_normal(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_normal(v) for v in obj)
    return obj


def make_decoder(vae, base_model, node: str):
    """``decode(x0) -> RGB [B,3,H,W]`` in [0,1], differentiable, from the sampler's latent space."""
    first_stage = vae.first_stage_model

    def decode(x0: torch.Tensor) -> torch.Tensor:
        latent = base_model.process_latent_out(x0)
        image = first_stage.decode(latent.to(device=vae.device, dtype=vae.vae_dtype))
        if image.dim() != 4 or image.shape[1] != 3:
            raise GuidanceInputError(
                f"{node}: input 'vae': this VAE decodes to shape {tuple(image.shape)}, not an RGB image batch; "
                f"use the image VAE that matches the model")
        return ((image.float() + 1.0) * 0.5).to(x0.device)

    return decode


def _model_patcher_of(base_model):
    for loaded in mm.current_loaded_models:
        patcher = getattr(loaded, "model", None)
        if patcher is not None and getattr(patcher, "model", None) is base_model:
            return patcher
    return None


def load_together(base_model, vae, latent: torch.Tensor) -> None:
    """Load UNet and VAE on the device together (the VAE's decode under autograd needs both at once)."""
    patchers = [p for p in (_model_patcher_of(base_model), vae.patcher) if p is not None]
    try:
        out_shape = (latent.shape[0], latent.shape[1], latent.shape[2], latent.shape[3])
        memory = vae.memory_used_decode(out_shape, vae.vae_dtype) * 3  # activations kept for backward
    except Exception:
        memory = 0
    mm.load_models_gpu(patchers, memory_required=memory)


def _previewer(base_model, device):
    try:
        import latent_preview
        return latent_preview.get_previewer(device, base_model.latent_format)
    except Exception:  # previews are a nicety, never a failure
        return None


def _renoise_seed(seed) -> int:
    # Derived from, but not equal to, the seed of the initial noise (equal seeds would re-add the same noise).
    return (int(seed or 0) * 6364136223846793005 + 1442695040888963407) % (2 ** 63)


def make_sampler_function(guidance, settings: Settings, vae, node: str, report=None):
    """A k-diffusion-style sampler function for ``comfy.samplers.KSAMPLER``."""

    @torch.no_grad()
    def sample_universal_guidance(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
        extra_args = dict(extra_args or {})
        base = model.inner_model.inner_model
        parameterization = parameterization_of(base, node)
        load_together(base, vae, x)
        n_steps = len(sigmas) - 1
        total = total_iterations(n_steps, guidance, settings)
        pbar = comfy.utils.ProgressBar(total)
        previewer = _previewer(base, x.device)
        stats = Stats()
        weights = TrainableWeights(getattr(base, "diffusion_model", base), vae.first_stage_model)
        generator = torch.Generator().manual_seed(_renoise_seed(extra_args.get("seed")))
        latest = {}

        def on_step(info):
            latest["denoised"] = info["denoised"]
            if callback is not None and info["i"] == n_steps - 1:
                callback(info)  # lets SamplerCustom return its denoised output; progress is ours
            weights.refresh()  # ComfyUI may have reloaded a model with inference weights in between

        def on_iteration(done, total_):
            preview = None
            if previewer is not None and "denoised" in latest:
                try:
                    preview = previewer.decode_latent_to_preview_image("JPEG", latest["denoised"])
                except Exception:
                    preview = None
            pbar.update_absolute(done, total_, preview)

        started = time.perf_counter()
        with torch.inference_mode(False):
            x = x.clone()
            sigmas = sigmas.clone()
            extra_args = _normal(extra_args)
            for attr in ("latent_image", "noise"):
                if isinstance(getattr(model, attr, None), torch.Tensor):
                    setattr(model, attr, _normal(getattr(model, attr)))

            def denoise(x_in, sigma):
                with saved_tensor_guard():
                    return model(x_in, sigma, **extra_args)

            guidance.reset()
            guidance.prepare(x.device)
            weights.refresh()
            try:
                out = sample_universal(
                    denoise, x, sigmas, guidance=guidance, decode=make_decoder(vae, base, node),
                    settings=settings, parameterization=parameterization, callback=on_step,
                    on_iteration=on_iteration, interrupt=mm.throw_exception_if_processing_interrupted,
                    generator=generator, stats=stats)
            finally:
                weights.restore()
            lines = [f"{stats.steps} steps, {stats.iterations} iterations, {stats.denoiser_grad_calls} denoiser "
                     f"backward passes, {stats.decoder_calls} guided decodes in {time.perf_counter() - started:.1f} s"]
            lines += guidance.reports()
            if stats.nonfinite_skips:
                lines.append(f"{stats.nonfinite_skips} guidance update(s) skipped for non-finite gradients")
            for line in lines:
                log.info("Universal Guidance: %s", line)
            if report is not None:
                report(stats, lines)
            return out.detach()

    return sample_universal_guidance


def sigmas_for(model_patcher, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """The scheduler's sigmas for ``steps`` steps at ``denoise`` strength, as the stock KSampler computes them."""
    total_steps = steps if denoise >= 0.9999 else int(steps / denoise)
    model_sampling = model_patcher.get_model_object("model_sampling") \
        if hasattr(model_patcher, "get_model_object") else model_patcher.model.model_sampling
    if hasattr(comfy.samplers, "calculate_sigmas"):
        sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, total_steps)
    else:
        sigmas = comfy.samplers.calculate_sigmas_scheduler(model_patcher.model, scheduler, total_steps)
    return sigmas[-(steps + 1):].cpu()


def ksampler(guidance, settings: Settings, vae, node: str, report=None):
    """The ComfyUI ``SAMPLER`` object."""
    return comfy.samplers.KSAMPLER(make_sampler_function(guidance, settings, vae, node, report))
