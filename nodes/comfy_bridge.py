"""The engine run inside ComfyUI's sampling: the SAMPLER function (``make_sampler_function``) and the host traps it
handles. What a guided call does differently (CFG branch, checkpointing, precision) is in ``guided_calls``, the
memory estimate in ``memory_plan``, the attention capture of self-guidance in ``attention_capture``.

A run, in order: ``_plan_run`` checks the inputs against the model, plans the memory and loads the model and the
decoder; ``_normal_inputs`` and ``autograd_session`` make inputs and models usable under autograd (and put the models
back afterwards); ``_denoiser`` is the engine's denoiser call; ``_user_errors`` turns what the user can act on into
``GuidanceInputError``; ``_summary_lines`` is the run's report.

* Autograd inside the executor: the executor runs nodes under ``torch.inference_mode()``; guidance runs under
  ``inference_mode(False)`` with inputs cloned to normal tensors.
* Inference-tensor weights: the stock loaders create weights as inference tensors, which autograd cannot save
  (an inference tensor may be *used* outside inference mode, only not *saved* for backward). ``TrainableWeights``
  swaps each of them, for the duration of one run, for an *alias*: a normal, frozen tensor on the same storage
  (same device, dtype — fp8 / fp16 / bf16 stay as they are — offset, sizes and strides), so a guided run adds no
  copy of the model. The same holds for every network that runs inside the denoiser call: the conditioning's
  ControlNets / T2I adapters and modules held by other packs' model patches (``added_modules``). Why sharing the
  storage is safe:

  - nothing writes to the weights during a run: the sampler and the guidance only read them (they are frozen,
    ``requires_grad`` False, so no optimizer or gradient touches them); ComfyUI patches weights (LoRA, other
    packs' weight patches) and moves them between devices in ``load_models_gpu``, i.e. before sampling starts,
    between runs, never inside one. Where a model is loaded only partly (``comfy.ops`` casting weights layer by
    layer), the alias lives where the original lives and the cast reads it like the original;
  - the alias has its own version counter, so an in-place write to the original during a run would not be seen
    by autograd; per the point above there is none;
  - the alias is dropped at the end of the run: ``restore()`` (in a ``finally``) puts the original tensor objects
    back into the modules, so the cached, shared model is exactly as it was (same objects, still inference
    tensors) and nothing keeps an alias after the run (autograd graphs of the run are freed with it).

  Tensor subclasses other than ``Parameter`` (e.g. other packs' quantized weights) cannot be aliased by storage
  without losing their type: they are still copied, and their bytes are counted (``TrainableWeights.created_bytes``,
  logged after each run).
* In-place writes to activations saved for backward (``saved_tensor_guard``, around the denoiser call only): the
  UNet's ``x += n`` in its transformer block (hosts before 2025-06) and a ControlNet's or T2I adapter's ``control``
  added in place: every activation on the gradient path is copied; blocks that add their residual in place to
  their input (Flux-style blocks): only the tensors saved from those inputs.
* Differentiable decode: ``first_stage_model.decode`` on ``process_latent_out`` latents, mapped [-1,1]→[0,1]
  without the clamp of ``VAE.decode`` (and without its inference-mode tiled OOM fallback).
* The diffusion model and the VAE (only where an image term decodes) are loaded together with ``load_models_gpu``,
  with the memory of a guided iteration reserved; progress counts steps × k; previews are of the detached x̂0;
  the interrupt flag is checked in every iteration and every backward-guidance step.
"""
from __future__ import annotations

import contextlib
import dataclasses
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


def _needs_copy(t: torch.Tensor) -> bool:
    """An inference tensor, or a tensor without a version counter (a view of one): autograd cannot save it."""
    if t.is_inference():
        return True
    try:
        t._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return True
    return False


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _alias(t: torch.Tensor):
    """A normal (non-inference) tensor on ``t``'s storage: same data, no new memory; None where ``t`` is a tensor
    subclass (other than ``Parameter``) that a plain alias would not stand for. Call outside inference mode."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.is_quantized or t.layout != torch.strided:
        return None
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return alias


class TrainableWeights:
    """Make modules usable under autograd for one run, and put them back exactly as they were.

    Inference-tensor parameters and buffers are replaced by frozen aliases (normal tensors sharing their storage,
    see the module docstring; ``copy=True``, or a tensor subclass: a frozen copy instead); parameters that require
    grad are frozen. ``refresh()`` may be called again (e.g. after ComfyUI reloaded a model); ``restore()``
    reinstates the original tensor objects and flags. ``created_bytes``: bytes of new weight storage this object
    allocated (copies; 0 where every weight was aliased); ``aliased`` / ``aliased_bytes``: the tensors (and
    their bytes) used in place.
    """

    copy_weights = False  # the default of ``copy``: copies instead of aliases (a reference for comparisons)

    def __init__(self, *modules, copy: bool | None = None):
        self.modules = [m for m in modules if m is not None]
        self.copy = self.copy_weights if copy is None else copy
        self._swapped = []
        self._unfrozen = []
        self.created_bytes = 0
        self.aliased = 0
        self.aliased_bytes = 0

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
                                normal = None if self.copy else _alias(t)
                                if normal is None:
                                    normal = t.detach().clone()
                                    self.created_bytes += _nbytes(normal)
                                else:
                                    self.aliased += 1
                                    self.aliased_bytes += _nbytes(normal)
                                if isinstance(t, torch.nn.Parameter):
                                    normal = torch.nn.Parameter(normal, requires_grad=False)
                                self._swapped.append((store, name, t))
                                store[name] = normal
                                count += 1
                            elif t.requires_grad and store is mod._parameters:
                                t.requires_grad_(False)
                                self._unfrozen.append(t)
        return count

    def summary(self) -> str:
        return (f"weights: {self.aliased} inference tensor(s) used in place ({self.aliased_bytes / 2**20:.1f} MiB, "
                f"not copied), {self.created_bytes} bytes of weight copies made")

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
    return _pack_saved_kept(t)


def _unpack_saved(packed):
    if isinstance(packed, _Kept):
        # saved_tensors_hooks bypass autograd's own version check: repeat it for the tensors we did not copy.
        if packed.tensor._version != packed.version:
            raise RuntimeError("Universal Guidance: a tensor saved for backward was modified in place "
                               "(an unsupported in-place operation in the model)")
        return packed.tensor
    return packed


# Blocks that add a residual in place to a tensor saved for backward, in every ComfyUI version that has them, with
# the input that is modified (name, position): Flux's double-stream block (``txt += …``) and single-stream block
# (``x += …``), also used by models built on them, and the MMDiT context processor block (``x += …``).
_INPLACE_RESIDUAL_BLOCKS = {"DoubleStreamBlock": ("txt", 1), "SingleStreamBlock": ("x", 0),
                            "ContextProcessorBlock": ("x", 0)}
_inplace_by_type = {}


def _model_has_inplace_residual(base_model) -> bool:
    net = getattr(base_model, "diffusion_model", base_model)
    if not isinstance(net, torch.nn.Module):
        return False
    if type(net) not in _inplace_by_type:
        _inplace_by_type[type(net)] = any(type(m).__name__ in _INPLACE_RESIDUAL_BLOCKS for m in net.modules())
    return _inplace_by_type[type(net)]


def _storage_of(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return -1


class _InplaceTargets:
    """Copies of saved tensors only where a block will modify them in place: at each such block's entry the
    storage of the input it adds its residual to is recorded, and a tensor saved for backward is copied only when
    it lives in one of those storages (every other saved tensor is kept as it is, with its version checked when
    backward unpacks it, so an in-place change not foreseen here is an error, never a wrong gradient).

    ``copied_bytes``: bytes copied; ``grad_path_bytes``: bytes of the saved activations on the gradient path (what
    copying every activation would cost)."""

    def __init__(self, net: torch.nn.Module):
        self.storages, self.handles = set(), []
        self.copied_bytes = self.grad_path_bytes = 0
        for m in net.modules():
            where = _INPLACE_RESIDUAL_BLOCKS.get(type(m).__name__)
            if where is not None:
                self.handles.append(m.register_forward_pre_hook(functools.partial(self._enter, where),
                                                                with_kwargs=True))

    def _enter(self, where, module, args, kwargs):
        name, index = where
        t = kwargs.get(name, args[index] if len(args) > index else None)
        if isinstance(t, torch.Tensor):
            self.storages.add(_storage_of(t))

    def pack(self, t: torch.Tensor):
        if t.requires_grad and not isinstance(t, torch.nn.Parameter):
            nbytes = t.numel() * t.element_size()
            self.grad_path_bytes += nbytes
            if _storage_of(t) in self.storages:
                self.copied_bytes += nbytes
                return t.clone()
        return _pack_saved_kept(t)

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _pack_saved_kept(t: torch.Tensor):
    try:
        return _Kept(t, t._version)
    except RuntimeError:  # no version counter (an inference tensor): copy it
        return t.clone()


@contextlib.contextmanager
def _targeted_guard(net):
    targets = _InplaceTargets(net)
    try:
        with torch.autograd.graph.saved_tensors_hooks(targets.pack, _unpack_saved):
            yield targets
    finally:
        targets.close()


def saved_tensor_guard(base_model=None, control: bool = False):
    """Copy the activations saved for backward where the denoiser modifies them in place afterwards. The UNet of
    hosts before 2025-06 and any model given a ControlNet's or T2I adapter's ``control`` (every host's UNet adds it
    in place to block outputs the next block has saved): every activation on the gradient path is copied. Models
    whose blocks add a residual in place to their input (Flux-style blocks, ``base_model``) on current hosts: only
    the tensors saved from those inputs' storages (``_InplaceTargets``).

    Wrap the denoiser call only: the decoder and the guidance networks need no copies.
    """
    if control or _host_has_inplace_residual():
        return torch.autograd.graph.saved_tensors_hooks(_pack_saved, _unpack_saved)
    if base_model is not None and _model_has_inplace_residual(base_model):
        return _targeted_guard(getattr(base_model, "diffusion_model", base_model))
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


def _previewer(base_model, device):
    try:
        import latent_preview
        return latent_preview.get_previewer(device, base_model.latent_format)
    except Exception:  # previews are a nicety, never a failure
        return None


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


def _renoise_seed(seed) -> int:
    # Derived from, but not equal to, the seed of the initial noise (equal seeds would re-add the same noise).
    return (int(seed or 0) * 6364136223846793005 + 1442695040888963407) % (2 ** 63)


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
        _host_has_inplace_residual() or _model_has_inplace_residual(run.base)))


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
