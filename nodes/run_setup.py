"""Setting up one guided sampler run in ComfyUI: the run's inputs checked against the model (sampling type,
self-guidance layers and prompts, guidance VAE, a backward pass through the model's patches), the memory of a guided
iteration planned (``memory_plan``) and the model and the decoder loaded together (``_plan_run`` → ``_Run``).

* Differentiable decode: ``first_stage_model.decode`` on ``process_latent_out`` latents, mapped [-1,1]→[0,1]
  without the clamp of ``VAE.decode`` (and without its inference-mode tiled OOM fallback).
* The diffusion model and the VAE (only where an image term decodes) are loaded together with ``load_models_gpu``,
  with the memory of a guided iteration reserved.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

import comfy.model_management as mm
import comfy.model_sampling

from ..guidance import FLOW, VE, Settings
from . import guided_calls, memory_plan
from .errors import GuidanceInputError

log = logging.getLogger("universal_guidance")


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


def undecodable_output(vae, base_model, out: torch.Tensor, node: str):
    """A sentence when the output latent decodes to NaN or inf with the sampler's VAE, else None. Only fp16 VAEs are
    checked (bf16 and fp32 have fp32's range): one decode without grad at the end of the run."""
    if vae is None or getattr(vae, "vae_dtype", None) != torch.float16 or not hasattr(vae, "first_stage_model"):
        return None
    if getattr(vae, "patcher", None) is not None:
        mm.load_models_gpu([vae.patcher])
    try:
        with torch.no_grad():
            image = make_decoder(vae, base_model, node)(out)
    except GuidanceInputError:  # not an image VAE: nothing to judge here
        return None
    bad = ~torch.isfinite(image.flatten(1)).all(dim=1)
    if not bool(bad.any()):
        return None
    return (f"the sampled latent decodes to NaN or inf with this fp16 VAE for {int(bad.sum())} of {out.shape[0]} "
            f"image(s) (largest latent value {float(base_model.process_latent_out(out).abs().max()):.3g}; fp16 holds "
            f"at most 65504), so the image "
            f"would be black: guidance pushed the latent too far. Lower forward_strength or the terms' weights, keep "
            f"max_step above 0 (e.g. 10), or decode in fp32 or bf16 (ComfyUI's --fp32-vae / --bf16-vae)")


def _model_patcher_of(base_model):
    for loaded in mm.current_loaded_models:
        patcher = getattr(loaded, "model", None)
        if patcher is not None and getattr(patcher, "model", None) is base_model:
            return patcher
    return None


def load_together(base_model, vae, memory_required: float) -> None:
    """Load UNet and VAE on the device together (the VAE's decode under autograd needs both at once), leaving
    ``memory_required`` bytes free for the guided iteration (``memory_plan``): ComfyUI offloads other models or
    loads these partly instead of running out in the middle of a step. ``vae`` None: the UNet alone (only
    self-guidance terms: nothing is decoded)."""
    patchers = [p for p in (_model_patcher_of(base_model), getattr(vae, "patcher", None)) if p is not None]
    mm.load_models_gpu(patchers, memory_required=int(memory_required))


def free_memory(device) -> float:
    """Bytes free on ``device`` as ComfyUI counts them (for CUDA: the driver's free memory plus what PyTorch holds
    in its cache)."""
    return float(mm.get_free_memory(device))


def _cfg_scale(model, extra_args: dict):
    """The run's CFG scale (None when the host does not tell)."""
    scale = extra_args.get("cond_scale")
    if scale is None:
        scale = getattr(getattr(model, "inner_model", None), "cfg", None)
    try:
        return float(scale)
    except (TypeError, ValueError):
        return None


def _backward_batch(model, extra_args: dict, x: torch.Tensor, cfg_branch: str) -> int:
    """How many latents the denoiser's backward pass runs on: the CFG batch (cond + uncond) for the combined
    prediction, one branch otherwise or at cfg 1."""
    scale = _cfg_scale(model, extra_args)
    both = cfg_branch == "combined" and (scale is None or abs(scale - 1.0) > 1e-9)
    return x.shape[0] * (2 if both else 1)


def _modules_in(obj) -> list:
    """``obj`` if it is a module, else the modules among its attributes (one level: a patch object or a
    ControlNet holding its network)."""
    if isinstance(obj, torch.nn.Module):
        return [obj]
    attrs = getattr(obj, "__dict__", None) or {}
    return [v for v in attrs.values() if isinstance(v, torch.nn.Module)]


def _control_objects(model, extra_args: dict) -> list:
    """The ControlNets / T2I adapters of the run's conditioning, each chain followed through
    ``previous_controlnet``. The conds are in the sampler's ``extra_args`` (ComfyUI before the guider classes,
    2024-04) or on the guider (``model.inner_model.conds``, processed for this run)."""
    lists = [extra_args.get("cond"), extra_args.get("uncond")]
    conds = getattr(getattr(model, "inner_model", None), "conds", None)
    if isinstance(conds, dict):
        lists += list(conds.values())
    found = []
    for entries in lists:
        for entry in entries or []:
            control = entry.get("control") if isinstance(entry, dict) else None
            while control is not None and not any(control is f for f in found):
                found.append(control)
                control = getattr(control, "previous_controlnet", None)
    return found


def _patch_objects(model_options: dict) -> list:
    """The callables other packs installed in ``transformer_options`` (``patches`` lists, ``patches_replace``
    dicts), e.g. an attention replacement."""
    topts = (model_options or {}).get("transformer_options", {}) or {}
    found = []
    for patches in (topts.get("patches") or {}).values():
        found += list(patches) if isinstance(patches, (list, tuple)) else []
    for replaced in (topts.get("patches_replace") or {}).values():
        found += list(replaced.values()) if isinstance(replaced, dict) else []
    return found


def added_modules(controls: list, model_options: dict) -> list:
    """Networks that run inside the denoiser call besides the diffusion model: those of the ControlNets and T2I
    adapters ``controls`` (``_control_objects``), and modules held by other packs' model patches. Like the diffusion
    model's, their weights must be usable under autograd for the run (``TrainableWeights``)."""
    modules = []
    for obj in list(controls) + _patch_objects(model_options):
        for m in _modules_in(obj):
            if not any(m is k for k in modules):
                modules.append(m)
    return modules


def positive_conds(model, extra_args: dict):
    """ComfyUI's processed positive conditioning of this run (dicts with ``cross_attn``), or None where the host
    does not show it: ``extra_args["cond"]`` (2024-03), the guider's ``conds["positive"]`` (2024-04 on)."""
    conds = (extra_args or {}).get("cond")
    if conds is None:
        guider_conds = getattr(getattr(model, "inner_model", None), "conds", None)
        if isinstance(guider_conds, dict):
            conds = guider_conds.get("positive")
    return conds if isinstance(conds, (list, tuple)) else None


def check_prompts(guidance, positive, node: str) -> None:
    """Every self-guidance term's token positions must refer to the sampler's positive conditioning: a term whose
    prompt encodes to a context that no positive entry has is an error (it would guide other words)."""
    from .tokens import conditioning_mismatch
    checks = [(t.name, getattr(t.loss, "prompt_check", None)) for t in guidance.terms if t.kind == "internal"]
    checks = [(name, c) for name, c in checks if c is not None]
    if not checks:
        return
    if positive is None:
        log.warning("Universal Guidance: %s: this ComfyUI does not show the sampler's positive conditioning; the "
                    "self-guidance prompts were not compared with it", node)
        return
    for name, check in checks:
        problem = conditioning_mismatch(check, name, positive)
        if problem:
            raise GuidanceInputError(f"{node}: {problem}")


def prepare_internal_terms(guidance, base_model, x: torch.Tensor, node: str, positive=None):
    """The run's copy of ``guidance`` with self-guidance terms bound to this model: layer rules resolved to the
    UNet's attention layers, reference latents moved into the sampler's latent space, prompts checked against the
    positive conditioning (``positive``: ComfyUI's processed cond dicts; None: not checked). ``(guidance, unet,
    context length)``; ``(guidance, None, None)`` without self-guidance terms."""
    if not guidance.has("internal"):
        return guidance, None, None
    from . import attention_capture as ac
    unet = ac.capture_network(base_model)  # a UNet, or SD3's / Flux's joint-attention transformer
    if unet is None:
        raise GuidanceInputError(f"{node}: input 'guidance' has self-guidance terms: "
                                 f"{ac.unsupported_message(base_model)}. Remove the self-guidance nodes for this "
                                 f"model.")
    check_prompts(guidance, positive, node)
    lengths = {t.loss.context_length for t in guidance.terms if t.kind == "internal"}
    if len(lengths) > 1:
        raise GuidanceInputError(f"{node}: the self-guidance nodes were given prompts of different lengths "
                                 f"({sorted(lengths)} tokens): give each the positive prompt")
    layers = ac.attention_layers(unet)
    terms, moved = [], {}  # one moved copy per reference latent: terms that share a reference share its passes
    for term in guidance.terms:
        if term.kind == "internal":
            loss = term.loss
            try:
                names = loss.layers if loss.layers is not None else ac.resolve_layer_rule(loss.layer_rule, unet)
            except ValueError as e:
                raise GuidanceInputError(f"{node}: self-guidance term {term.name!r}: {e}") from None
            missing = [] if names == ac.AUTO else [n for n in names if n not in layers]
            if missing or not names:
                raise GuidanceInputError(f"{node}: self-guidance term {term.name!r}: this UNet has no attention "
                                         f"layers {missing or names}; it has {', '.join(layers)}")
            reference = None
            if isinstance(loss.reference, torch.Tensor):
                if id(loss.reference) not in moved:
                    moved[id(loss.reference)] = _reference_latent(loss.reference, base_model, x, node, term.name)
                reference = moved[id(loss.reference)]
            term = dataclasses.replace(term, loss=loss.bound(names, reference))
        terms.append(term)
    return type(guidance)(tuple(terms)), unet, lengths.pop()


def _reference_latent(latent: torch.Tensor, base_model, x: torch.Tensor, node: str, name: str) -> torch.Tensor:
    """A reference LATENT (VAE space) in the sampler's space, at the generated latent's size."""
    with torch.inference_mode(False):
        z = latent.detach().clone().to(device=x.device, dtype=torch.float32)
        if z.shape[1] != x.shape[1]:
            raise GuidanceInputError(f"{node}: self-guidance term {name!r}: the reference latent has {z.shape[1]} "
                                     f"channels, this model's latents {x.shape[1]}; encode the reference with "
                                     f"this model's VAE")
        z = base_model.process_latent_in(z)
        if z.shape[-2:] != x.shape[-2:]:
            log.info("Universal Guidance: %s: reference latent resized from %s to %s", name,
                     tuple(z.shape[-2:]), tuple(x.shape[-2:]))
            z = torch.nn.functional.interpolate(z, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return z


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How guided calls run in ComfyUI (the engine does not see these).

    guidance_vae: the VAE that decodes x̂0 for the image terms (e.g. TAESD); None: the sampler's ``vae``.
    cfg_branch: ``combined`` (the gradient through the CFG prediction, the paper), ``cond`` or ``uncond`` (the
        gradient through that branch only; the other runs without autograd, in its own call). Where ComfyUI
        computes no such branch (cfg 1 has no unconditional one) the gradient goes through the branch computed,
        and the run's summary says so (``guided_calls.BranchRun``).
    low_memory: ``on``: recompute the denoiser's blocks (UNet; SD3 joint, Flux double/single-stream transformer
        blocks) and the decoder's in the backward pass instead of keeping their activations (activation
        checkpointing), and with them the weights ComfyUI casts per layer: less memory, about one more forward per
        guided iteration. ``off``: keep them. ``auto``: on where the estimate of ``memory_plan`` does not fit in the
        device's free memory (a boolean of an earlier release: on / off).
    """

    guidance_vae: object = None
    cfg_branch: str = "combined"
    low_memory: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "low_memory", memory_plan.normalize_mode(self.low_memory))
        if self.cfg_branch not in guided_calls.CFG_BRANCHES:
            raise ValueError(f"cfg_branch must be one of {guided_calls.CFG_BRANCHES}, got {self.cfg_branch!r}")


def check_guidance_vae(vae, base_model, node: str) -> None:
    """The guidance VAE must decode this model's latents: same channel count and, for TAESD-type VAEs (which carry
    their family's scale), the same latent scale."""
    channels = getattr(base_model.latent_format, "latent_channels", 4)
    vae_channels = getattr(vae, "latent_channels", None)
    model_name = type(base_model.latent_format).__name__
    vae_scale = getattr(vae.first_stage_model, "vae_scale", None)
    problem = None
    if vae_channels is not None and vae_channels != channels:
        problem = f"it decodes {vae_channels}-channel latents, this model ({model_name}) makes {channels}-channel ones"
    elif vae_scale is not None:
        scale = float(vae_scale)
        if abs(scale - float(base_model.latent_format.scale_factor)) > 1e-4:
            problem = (f"it is a TAESD for latents scaled by {scale:g}, this model ({model_name}) scales them by "
                       f"{float(base_model.latent_format.scale_factor):g}")
    if problem:
        raise GuidanceInputError(f"{node}: input 'guidance_vae': this VAE does not fit the model: {problem}. Load "
                                 f"the VAE of the model's family (taesd for SD1.x/SD2.x, taesdxl for SDXL, taesd3 "
                                 f"for SD3, taef1 for Flux)")


def _compute_dtype(base_model):
    dtype = getattr(base_model, "manual_cast_dtype", None)
    if dtype is None and hasattr(base_model, "get_dtype"):
        dtype = base_model.get_dtype()
    return dtype


def _with_autocast(guidance, device):
    """The image terms' losses under autocast on CUDA (guidance networks in half precision, losses in fp32)."""
    dtype = guided_calls.autocast_dtype(device)
    if dtype is None:
        return guidance
    terms = tuple(dataclasses.replace(t, loss=guided_calls.Autocast(t.loss, device.type, dtype))
                  if t.kind == "image" else t for t in guidance.terms)
    return type(guidance)(terms)


@dataclasses.dataclass
class _Run:
    """One sampler call's inputs, checked against the model, with the memory planned and the models loaded."""

    base: object              # the diffusion model (ComfyUI's BaseModel)
    parameterization: object  # VE or FLOW
    guidance: object          # the run's guidance: self-guidance terms bound to this model (prepare_internal_terms)
    unet: object              # the UNet whose attention self-guidance reads (None without such terms)
    context_length: object    # the context length the terms' token positions refer to (None without such terms)
    decoder_vae: object       # the VAE that decodes x̂0 for the image terms (the guidance VAE, else the sampler's)
    controls: list            # the conditioning's ControlNets / T2I adapters (_control_objects)
    memory: object            # memory_plan's decision (low_memory, the line for the summary)


def _plan_run(model, x, extra_args: dict, guidance, settings: Settings, vae, node: str, options: RunOptions) -> _Run:
    """Check the inputs against the model (sampling type, self-guidance layers and prompts, guidance VAE, a backward
    pass through the model's patches), plan the memory of a guided iteration and load the model and the decoder
    together for it."""
    base = model.inner_model.inner_model
    parameterization = parameterization_of(base, node)
    run_guidance, unet, context_length = prepare_internal_terms(guidance, base, x, node,
                                                                positive_conds(model, extra_args))
    decoder_vae = options.guidance_vae or vae
    if options.guidance_vae is not None:
        check_guidance_vae(options.guidance_vae, base, node)
    through_model = settings.jacobian and settings.forward_strength > 0  # a gradient through the model
    problem = guided_calls.backward_problem(getattr(base, "diffusion_model", base),
                                            extra_args.get("model_options")) if through_model else None
    if problem:
        raise GuidanceInputError(f"{node}: input 'model': {problem}")
    image_decoder = decoder_vae if guidance.has("image") else None
    memory_need = memory_plan.plan(options.low_memory, base, image_decoder, x.shape,
                                   _backward_batch(model, extra_args, x, options.cfg_branch), run_guidance,
                                   x.device)
    load_together(base, image_decoder, memory_need.reserve if options.low_memory != "auto"
                  else memory_need.need_on + memory_need.networks)
    memory_need = memory_plan.decide(memory_need, free_memory(x.device))
    return _Run(base, parameterization, run_guidance, unet, context_length, decoder_vae,
                _control_objects(model, extra_args), memory_need)
