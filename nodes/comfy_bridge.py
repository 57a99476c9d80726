"""The engine run inside ComfyUI's sampling: the SAMPLER function (``make_sampler_function``). What a guided call
does differently (CFG branch, checkpointing, precision) is in ``guided_calls``, the memory estimate in
``memory_plan``, the attention capture of self-guidance in ``attention_capture``.

A run, in order: ``run_setup._plan_run`` checks the inputs against the model, plans the memory and loads the model
and the decoder; ``_normal_inputs`` and ``autograd_session`` make inputs and models usable under autograd
(``autograd_weights``: weights aliased, not copied) and put the models back afterwards; ``_denoiser`` is the engine's
denoiser call; ``_user_errors`` turns what the user can act on into ``GuidanceInputError``; ``_summary_lines`` is the
run's report.

* Autograd inside the executor: the executor runs nodes under ``torch.inference_mode()``; guidance runs under
  ``inference_mode(False)`` with inputs cloned to normal tensors.
* Progress counts steps × k; previews are of the detached x̂0; the interrupt flag is checked in every iteration and
  every backward-guidance step.
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch

import comfy.model_management as mm
import comfy.samplers
import comfy.utils

from ..guidance import Settings, Stats, sample_universal, total_iterations
from . import autograd_weights, guided_calls, memory_plan
from .autograd_weights import TrainableWeights, _model_has_inplace_residual, _normal, saved_tensor_guard
from .errors import GuidanceInputError
from .run_setup import (RunOptions, _compute_dtype, _plan_run, _Run, _with_autocast, added_modules, make_decoder,
                        parameterization_of, undecodable_output)

log = logging.getLogger("universal_guidance")

__all__ = ["RunOptions", "ksampler", "make_sampler_function", "parameterization_of", "sigmas_for", "log"]


def _previewer(base_model, device):
    try:
        import latent_preview
        return latent_preview.get_previewer(device, base_model.latent_format)
    except Exception:  # previews are a nicety, never a failure
        return None


def _renoise_seed(seed) -> int:
    # Derived from, but not equal to, the seed of the initial noise (equal seeds would re-add the same noise).
    return (int(seed or 0) * 6364136223846793005 + 1442695040888963407) % (2 ** 63)


class _Progress:
    """ComfyUI's progress bar (with a preview of the latest x̂0) and the console bar, counting steps × k."""

    def __init__(self, base, device, total: int, disable, callback, n_steps: int):
        self.pbar = comfy.utils.ProgressBar(total)
        self.console = _console_bar(total, disable)
        self.previewer = _previewer(base, device)
        self.callback, self.n_steps = callback, n_steps
        self.latest = None

    def step(self, info: dict) -> None:
        self.latest = info["denoised"]
        if self.callback is not None and info["i"] == self.n_steps - 1:
            self.callback(info)  # lets SamplerCustom return its denoised output; progress is ours

    def iteration(self, done: int, total: int) -> None:
        preview = None
        if self.previewer is not None and self.latest is not None:
            try:
                preview = self.previewer.decode_latent_to_preview_image("JPEG", self.latest)
            except Exception:
                preview = None
        self.pbar.update_absolute(done, total, preview)
        if self.console is not None:
            self.console.update(1)

    def close(self) -> None:
        if self.console is not None:
            self.console.close()


def _normal_inputs(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict):
    """``(x, sigmas, extra_args)`` as normal tensors (the executor made them inference tensors, which autograd
    cannot save); the guider's ``latent_image`` / ``noise`` likewise. Call under ``inference_mode(False)``."""
    for attr in ("latent_image", "noise"):
        if isinstance(getattr(model, attr, None), torch.Tensor):
            setattr(model, attr, _normal(getattr(model, attr)))
    return x.clone(), sigmas.clone(), _normal(extra_args)


def _denoiser(model, run: _Run, extra_args: dict, cfg_branch: str):
    """``(denoise, branch)``: ``denoise(x, σ, capture=None)`` → x̂0 (CFG applied), or ``(x̂0, Internals)`` with a
    ``CaptureRequest``, as the engine calls it; a call that needs a gradient goes through ``cfg_branch`` (``branch``:
    the ``guided_calls.BranchRun``, None for ``combined``) with the activations it saves guarded
    (``saved_tensor_guard``); a call without one is ComfyUI's plain call."""
    guided_args = dict(extra_args)
    branch = guided_calls.BranchRun(cfg_branch) if cfg_branch != "combined" else None
    guided_args["model_options"] = guided_calls.with_branch(extra_args.get("model_options", {}), cfg_branch, branch)
    layers_of = _layer_lookup(run.unet, run.guidance)

    def denoise(x_in, sigma, capture=None):
        def call(args):
            with saved_tensor_guard(run.base, control=bool(run.controls)):
                if capture is None:
                    return model(x_in, sigma, **args)
                from .attention_capture import captured_call
                return captured_call(model, x_in, sigma, args, run.unet, layers_of(capture), run.context_length,
                                     capture.features, getattr(capture, "tokens", None))

        if not (torch.is_grad_enabled() and x_in.requires_grad):
            return call(extra_args)
        if branch is None:
            return call(guided_args)
        return branch.guided_call(call, guided_args, extra_args)

    return denoise, branch


@contextlib.contextmanager
def autograd_session(run: _Run, weights: TrainableWeights, device, stats: Stats):
    """The run's models made usable under autograd, and put back afterwards (call under ``inference_mode(False)``).

    On entry: the guidance terms' per-run state is cleared and their networks moved to ``device``; the image terms
    run under autocast on CUDA (``_with_autocast``); inference-tensor weights become aliases (``weights``). Yields
    the guidance to run. On exit, also after an error: the original weights are back in the modules, the guidance
    networks go back to ComfyUI's offload device (where that is not ``device``), and ``stats`` counts the bytes of
    weight copies made."""
    run.guidance.reset()
    run.guidance.prepare(device)
    guidance = _with_autocast(run.guidance, device)
    weights.refresh()
    try:
        yield guidance
    finally:
        weights.restore()
        if mm.unet_offload_device() != device:
            memory_plan.release_networks(run.guidance, mm.unet_offload_device())
        stats.weight_copy_bytes = weights.created_bytes


def _checkpointing(run: _Run):
    """Activation checkpointing of the denoiser's and the decoder's blocks where the memory plan chose low memory
    (``guided_calls.low_memory``), else nothing."""
    if not run.memory.low_memory:
        return contextlib.nullcontext()
    return guided_calls.low_memory(guided_calls.checkpoint_targets(
        getattr(run.base, "diffusion_model", None), run.decoder_vae.first_stage_model,
        autograd_weights._host_has_inplace_residual() or _model_has_inplace_residual(run.base)))


def _loss_scale(run: _Run, device) -> float:
    """The loss scale against fp16 gradient underflow, from the model's and the decoder's precision and the
    autocast of the image terms (``guided_calls.loss_scale_for``)."""
    autocast = guided_calls.autocast_dtype(device) if run.guidance.has("image") else None
    return guided_calls.loss_scale_for(_compute_dtype(run.base), getattr(run.decoder_vae, "vae_dtype", None),
                                       autocast)


@contextlib.contextmanager
def _user_errors(node: str):
    """Errors the user can act on as ``GuidanceInputError`` naming ``node``: settings that do not fit the terms and
    a non-finite output latent (ValueError), an operation without a backward pass."""
    try:
        yield
    except ValueError as e:
        raise GuidanceInputError(f"{node}: {e}") from None
    except (RuntimeError, NotImplementedError) as e:
        message = guided_calls.no_backward_message(e)
        if message is None:
            raise
        raise GuidanceInputError(f"{node}: {message}") from e


def _summary_lines(stats: Stats, seconds: float, weights: TrainableWeights, run: _Run, settings: Settings,
                   branch, device) -> list:
    """The run's summary: counts and time, weights, memory, the terms' reports, the sampler's notes, the bound."""
    lines = [stats.summary(seconds), weights.summary(), run.memory.line(device)]
    lines += run.guidance.reports()
    lines += stats.notes(settings)
    if not stats.bound_acted and stats.bound_checked:  # (a bound that acted is among the notes)
        lines.append(stats.bound_line(settings))
    lines += branch.notes() if branch is not None else []
    return lines


def make_sampler_function(guidance, settings: Settings, vae, node: str, report=None,
                          options: RunOptions = RunOptions()):
    """A k-diffusion-style sampler function for ``comfy.samplers.KSAMPLER``.

    ``report(stats, lines)`` is called after each run with the run's ``Stats`` and its summary lines."""

    @torch.no_grad()
    def sample_universal_guidance(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
        extra_args = dict(extra_args or {})
        run = _plan_run(model, x, extra_args, guidance, settings, vae, node, options)
        n_steps = len(sigmas) - 1
        progress = _Progress(run.base, x.device, total_iterations(n_steps, run.guidance, settings), disable,
                             callback, n_steps)
        stats = Stats()
        weights = TrainableWeights(getattr(run.base, "diffusion_model", run.base), run.decoder_vae.first_stage_model,
                                   *added_modules(run.controls, extra_args.get("model_options")))
        generator = torch.Generator().manual_seed(_renoise_seed(extra_args.get("seed")))

        def on_step(info):
            progress.step(info)
            weights.refresh()  # ComfyUI may have reloaded a model with inference weights in between

        started = time.perf_counter()
        with torch.inference_mode(False):
            x, sigmas, extra_args = _normal_inputs(model, x, sigmas, extra_args)
            denoise, branch = _denoiser(model, run, extra_args, options.cfg_branch)
            try:
                with autograd_session(run, weights, x.device, stats) as run_guidance, _user_errors(node):
                    with _checkpointing(run):
                        out = sample_universal(
                            denoise, x, sigmas, guidance=run_guidance,
                            decode=make_decoder(run.decoder_vae, run.base, node), settings=settings,
                            parameterization=run.parameterization, callback=on_step,
                            on_iteration=progress.iteration, interrupt=mm.throw_exception_if_processing_interrupted,
                            generator=generator, stats=stats, loss_scale=_loss_scale(run, x.device))
                    undecodable = undecodable_output(vae, run.base, out, node)
            finally:
                progress.close()
            if undecodable:
                raise GuidanceInputError(f"{node}: {undecodable}")
            lines = _summary_lines(stats, time.perf_counter() - started, weights, run, settings, branch, x.device)
            for line in lines:
                log.info("Universal Guidance: %s", line)
            if report is not None:
                report(stats, lines)
            return out.detach()

    return sample_universal_guidance


def _layer_lookup(unet, guidance):
    """``layers_of(CaptureRequest) -> {name: key}`` for the run's UNet (None without self-guidance terms)."""
    if unet is None:
        return None
    from .attention_capture import attention_layers
    all_layers = attention_layers(unet)

    def layers_of(request):
        if request.layers is None:
            return all_layers
        return {n: k for n, k in all_layers.items() if n in request.layers}

    return layers_of


def _console_bar(total: int, disable):
    """A console progress bar like the stock samplers' (tqdm; ComfyUI passes ``disable`` when it wants none)."""
    if disable:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="Universal Guidance", unit="it", leave=False)


class _WithSampling:
    """A stand-in model for the older ComfyUI's ``calculate_sigmas_scheduler``: the patched ``model_sampling``."""

    def __init__(self, model_sampling):
        self.model_sampling = model_sampling


def sigmas_for(model_patcher, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """The scheduler's sigmas for ``steps`` steps at ``denoise`` strength, as the stock KSampler computes them."""
    total_steps = steps if denoise >= 0.9999 else int(steps / denoise)
    if hasattr(model_patcher, "get_model_object"):
        model_sampling = model_patcher.get_model_object("model_sampling")
    else:  # older ComfyUI: a ModelSampling* node's patch (zsnr, v-prediction, …) is applied only at load time
        model_sampling = getattr(model_patcher, "object_patches", {}).get("model_sampling",
                                                                          model_patcher.model.model_sampling)
    if hasattr(comfy.samplers, "calculate_sigmas"):
        sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, total_steps)
    else:  # its schedulers read ``model.model_sampling`` only
        model = model_patcher.model
        if model_sampling is not model.model_sampling:
            model = _WithSampling(model_sampling)
        sigmas = comfy.samplers.calculate_sigmas_scheduler(model, scheduler, total_steps)
    return sigmas[-(steps + 1):].cpu()


def ksampler(guidance, settings: Settings, vae, node: str, report=None, options: RunOptions = RunOptions()):
    """The ComfyUI ``SAMPLER`` object."""
    return comfy.samplers.KSAMPLER(make_sampler_function(guidance, settings, vae, node, report, options))
