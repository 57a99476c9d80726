"""What a guided denoiser or decoder call does differently from a plain one, in ComfyUI: which CFG branch carries
the gradient, activation checkpointing (``low_memory``), and precision (guidance networks under autocast on CUDA,
loss scaling for half-precision models). Each is installed for the run only and undone afterwards.
"""
from __future__ import annotations

import contextlib
import functools

import torch

COND, UNCOND = 0, 1
CFG_BRANCHES = ("combined", "cond", "uncond")


# ------------------------------------------------------------------------------------------------ CFG branch

def _slice_c(c: dict, rows: torch.Tensor, total: int, chunks: list) -> dict:
    """The model's extra inputs for the batch rows ``rows`` (tensors batched along dim 0 are indexed)."""
    out = {}
    for key, value in c.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total:
            out[key] = value[rows.to(value.device)]
        elif key == "transformer_options" and isinstance(value, dict):
            out[key] = {**value, "cond_or_uncond": chunks}
        else:
            out[key] = value
    return out


def branch_wrapper(branch: str, previous=None):
    """A ``model_function_wrapper`` that runs the rows of the CFG ``branch`` (``"cond"`` or ``"uncond"``) with
    autograd and the other rows under ``torch.no_grad`` (a separate, smaller call): the gradient then flows through
    that branch only, and the other costs no backward. Wraps a wrapper another pack installed (``previous``)."""
    keep = COND if branch == "cond" else UNCOND

    def call(apply_model, args):
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def wrapper(apply_model, args):
        x, chunks = args["input"], list(args.get("cond_or_uncond") or [COND])
        if "control" in args["c"] and args["c"]["control"] is not None:
            return call(apply_model, args)  # a ControlNet's batched hints: not split (the gradient is combined)
        size = x.shape[0] // len(chunks)
        mine = [i for i, ch in enumerate(chunks) if ch == keep]
        other = [i for i, ch in enumerate(chunks) if ch != keep]
        if not other:
            return call(apply_model, args)
        if not mine:
            with torch.no_grad():
                return call(apply_model, args)

        def part(idx, grad: bool):
            rows = torch.cat([torch.arange(i * size, (i + 1) * size) for i in idx])
            sub = {**args, "input": x[rows.to(x.device)], "timestep": args["timestep"][rows.to(x.device)],
                   "c": _slice_c(args["c"], rows, x.shape[0], [chunks[i] for i in idx]),
                   "cond_or_uncond": [chunks[i] for i in idx]}
            with contextlib.nullcontext() if grad else torch.no_grad():
                return rows, call(apply_model, sub)

        pieces = [part(mine, True), part(other, False)]
        out = None
        for rows, y in pieces:
            if out is None:
                out = y.new_empty((x.shape[0],) + tuple(y.shape[1:]))
            out = out.index_copy(0, rows.to(y.device), y)
        return out

    return wrapper


def with_branch(model_options: dict, branch: str) -> dict:
    """``model_options`` (copied) whose model function gives the gradient to one CFG ``branch`` only."""
    if branch == "combined":
        return model_options
    options = dict(model_options or {})
    options["model_function_wrapper"] = branch_wrapper(branch, options.get("model_function_wrapper"))
    return options


# --------------------------------------------------------------------------------------------------- memory

def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def checkpoint_targets(unet, vae_model, inplace_residual: bool) -> list:
    """Modules whose activations are recomputed in the backward pass instead of kept: the UNet's ResBlocks and
    its SpatialTransformers — where the transformer block adds its residual in place (hosts before 2025-06), its
    attention layers instead (``CrossAttention``: their inputs are never modified in place; at 512² they hold the
    attention probabilities, ~1 GB per self-attention layer at CFG batch 2); the VAE decoder's ResnetBlocks and
    attention, or TAESD's blocks."""
    targets = []
    if unet is not None:
        from comfy.ldm.modules.attention import CrossAttention, SpatialTransformer
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
        kinds = (ResBlock, CrossAttention) if inplace_residual else (ResBlock, SpatialTransformer)
        targets += [m for m in unet.modules() if isinstance(m, kinds)]
    if vae_model is not None:
        decoder = getattr(vae_model, "decoder", None) or getattr(vae_model, "taesd_decoder", None)
        if decoder is not None:
            names = ("ResnetBlock", "AttnBlock", "Block")
            targets += [m for m in decoder.modules() if type(m).__name__ in names]
    return targets


@contextlib.contextmanager
def low_memory(modules: list):
    """Activation checkpointing on ``modules`` for the duration of the block (their ``forward`` is wrapped on the
    instance and restored afterwards; the cached model is left as it was)."""
    wrapped = []
    try:
        for m in modules:
            if "forward" not in m.__dict__:
                m.forward = _checkpointed(m.forward)
                wrapped.append(m)
        yield len(wrapped)
    finally:
        for m in wrapped:
            del m.forward


# ------------------------------------------------------------------------------------------------ precision

class Autocast:
    """An image term's loss evaluated under ``torch.autocast`` (CUDA): the guidance network runs in half precision,
    the loss comes back in fp32. Everything else is the wrapped loss's."""

    def __init__(self, loss, device_type: str, dtype: torch.dtype):
        self.loss, self.device_type, self.dtype = loss, device_type, dtype

    def __call__(self, image):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.loss(image).float()

    def __getattr__(self, name):
        return getattr(self.loss, name)


def autocast_dtype(device: torch.device):
    """bf16 where the GPU supports it, else fp16; None off CUDA (CPU autocast would only slow things down)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def loss_scale_for(*dtypes) -> float:
    """Scale the loss by 2¹⁰ before the backward pass when a model runs in fp16 (its gradients underflow below
    6e-8); the gradient is divided back in fp32. 1 otherwise."""
    return 1024.0 if torch.float16 in dtypes else 1.0
