"""``UG Invert``: a real image's latent inverted along the sampler's schedule (``guidance/inversion.py``), so that
self-guidance edits run against the image's own trajectory and the sampler starts from its inverted noise.

The inversion runs through ComfyUI's own sampling (conditioning, CFG, model loading) with a SAMPLER whose function
calls the engine's ``invert`` instead of sampling. Its LATENT output holds the inverted start (``samples``, in the
VAE's latent space, what SamplerCustom with add_noise off would start from) and the trajectory (key
``ug_inversion``); its SIGMAS output is the schedule it used, to connect to SamplerCustom's sigmas.
"""
from __future__ import annotations

import torch

import comfy.sample
import comfy.samplers
import comfy.utils
import comfy.model_management as mm

from ..guidance.inversion import Trajectory, invert
from .autograd_weights import _normal
from .comfy_bridge import sigmas_for
from .run_setup import parameterization_of
from .errors import GuidanceInputError
from .validation import CheckedNode

INVERSION_KEY = "ug_inversion"
CATEGORY = "sampling/universal guidance/self-guidance"


def trajectory_of(latent) -> Trajectory | None:
    """The inversion a LATENT from UG Invert carries, or None."""
    traj = latent.get(INVERSION_KEY) if isinstance(latent, dict) else None
    return traj if isinstance(traj, Trajectory) else None


def schedulers() -> list:
    return list(comfy.samplers.KSampler.SCHEDULERS)


def run_inversion(node: str, model, positive, negative, latent: dict, sigmas: torch.Tensor, cfg: float,
                  iterations: int) -> tuple:
    """``(LATENT with the inverted start and the trajectory, sigmas)``."""
    samples = latent["samples"]
    if hasattr(comfy.sample, "fix_empty_latent_channels"):
        samples = comfy.sample.fix_empty_latent_channels(model, samples)
    if not bool(torch.count_nonzero(samples)):
        raise GuidanceInputError(f"{node}: input 'latent' is empty (all zeros); connect the encoded image to edit "
                                 f"(VAE Encode of a photo)")
    found = {}
    pbar = comfy.utils.ProgressBar(iterations * (len(sigmas) - 1))

    def invert_fn(model_k, x, sigmas_in, extra_args=None, callback=None, disable=None, **_):
        base = model_k.inner_model.inner_model
        param = parameterization_of(base, node)
        start = getattr(model_k, "latent_image", None)
        start = start if isinstance(start, torch.Tensor) else x
        args = dict(extra_args or {})

        def denoise(x_in, sigma):
            return model_k(x_in, sigma, **args)

        with torch.inference_mode(False):
            traj = invert(denoise, _normal(start).float(), _normal(sigmas_in).float(), param,
                          iterations=iterations, interrupt=mm.throw_exception_if_processing_interrupted,
                          on_iteration=lambda done, total: pbar.update_absolute(done, total))
        found["trajectory"] = traj
        return traj.start.to(device=x.device, dtype=x.dtype)

    noise = torch.zeros_like(samples)
    try:
        out = comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.KSAMPLER(invert_fn), sigmas, positive,
                                         negative, samples, disable_pbar=True, seed=0)
    except ValueError as e:
        raise GuidanceInputError(f"{node}: {e}") from None
    result = {k: v for k, v in latent.items() if k not in ("samples", "noise_mask", INVERSION_KEY)}
    result["samples"] = out
    result[INVERSION_KEY] = found["trajectory"]
    return result, sigmas


class UniversalGuidanceInvert(CheckedNode):
    NAME = "UG Invert"
    DESCRIPTION = ("Inverts an encoded image along the sampler's noise schedule (deterministic DDIM/Euler "
                   "inversion for ε and v models, the flow ODE backwards for flow models, refined by fixed-point "
                   "iterations). Connect its latent to the 'reference' input of self-guidance nodes: they then edit "
                   "against the real image's own trajectory and the sampler starts from its inverted noise. Sample "
                   "with the same model, prompts, cfg and schedule (its sigmas output into SamplerCustom, or the "
                   "same steps/scheduler in the UG KSampler); without edits that returns the image.")
    RETURN_TYPES = ("LATENT", "SIGMAS")
    RETURN_NAMES = ("inverted", "sigmas")
    FUNCTION = "invert"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model that will edit the image (the same as the "
                                           "sampler's)."}),
            "positive": ("CONDITIONING", {"tooltip": "The positive conditioning of the edit (the sampler's): "
                                                     "describe the image, naming the objects to edit."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative conditioning of the edit (the sampler's)."}),
            "latent": ("LATENT", {"tooltip": "The image to edit, encoded (VAE Encode)."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                              "tooltip": "Steps of the schedule (the sampler must use the same). More steps invert "
                                         "more exactly."}),
            "scheduler": (schedulers(), {"default": "normal",
                                         "tooltip": "Noise schedule (the sampler must use the same)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                  "tooltip": "How far up the schedule to invert, as the KSampler's denoise: 1 = to "
                                             "pure noise; lower values invert only the last part of the schedule "
                                             "(edits then change less, and the inversion is more exact)."}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1,
                              "tooltip": "Classifier-free guidance scale of the inversion and of the sampler that "
                                         "reconstructs (they must be equal to return the image). Low values (1-3) "
                                         "invert most reliably."}),
            "iterations": ("INT", {"default": 3, "min": 1, "max": 50,
                                   "tooltip": "Model passes per step: 1 = plain DDIM inversion (approximate); each "
                                              "further fixed-point iteration brings the reconstruction nearer the "
                                              "image. Cost: steps × iterations model passes."}),
        }}

    def invert(self, model, positive, negative, latent, steps, scheduler, denoise, cfg, iterations):
        sigmas = sigmas_for(model, scheduler, steps, denoise)
        return run_inversion(self.NAME, model, positive, negative, latent, sigmas, cfg, iterations)


INVERSION_NODES = (UniversalGuidanceInvert,)
