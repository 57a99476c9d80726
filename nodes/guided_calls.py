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

def _slice_rows(value, rows: torch.Tensor, total: int):
    """``value`` (a tensor, or lists/dicts of them) for the batch rows ``rows``: tensors batched along dim 0 are
    indexed, others (e.g. a batch-1 hint broadcast by the model) kept; lists and dicts are new containers (the
    UNet pops a ControlNet's per-block lists)."""
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)] if value.dim() > 0 and value.shape[0] == total else value
    if isinstance(value, dict):
        return {k: _slice_rows(v, rows, total) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_slice_rows(v, rows, total) for v in value)
    return value


def _slice_c(c: dict, rows: torch.Tensor, total: int, chunks: list) -> dict:
    """The model's extra inputs for the batch rows ``rows`` (tensors batched along dim 0 are indexed; so are the
    per-block tensors of a ControlNet's or T2I adapter's ``control``, computed by ComfyUI for the whole batch)."""
    out = {}
    for key, value in c.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total:
            out[key] = value[rows.to(value.device)]
        elif key == "control" and isinstance(value, dict):
            out[key] = _slice_rows(value, rows, total)
        elif key == "transformer_options" and isinstance(value, dict):
            out[key] = {**value, "cond_or_uncond": chunks}
        else:
            out[key] = value
    return out


class _Call:
    """What happened in one guided denoiser call: calls of the wrapper, whether the kept branch ran with autograd,
    whether the other branch did (``gated``: its gradient is cut if the kept branch turns up later in the call)."""

    __slots__ = ("wrapped", "kept", "gated")

    def __init__(self):
        self.wrapped, self.kept, self.gated = 0, False, False


class _Gate(torch.autograd.Function):
    """Identity whose backward passes the gradient only if the call's kept branch never ran (then this output is
    all there is to differentiate); otherwise the kept branch alone carries it."""

    @staticmethod
    def forward(ctx, y, call):
        ctx.call = call
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return (None if ctx.call.kept else grad), None


BRANCH_NAMES = {COND: "conditional", UNCOND: "unconditional"}


class BranchRun:
    """The CFG-branch option for one run: which branch keeps the gradient, and what happened when it was absent.

    ComfyUI may leave a branch out of a denoiser call (at cfg 1 it computes no unconditional prediction; a guider
    with a positive prompt only has none; a prompt limited to a step range is absent outside it). When the kept
    branch is absent from a guided call, the gradient goes through the branch that is there (the call is
    'combined') and the run's summary says so. The kept branch may also come in a batch of its own (ComfyUI splits
    the batch when memory is short, or by hooks); then the other batch runs without autograd as usual."""

    def __init__(self, branch: str):
        self.branch = branch
        self.keep = COND if branch == "cond" else UNCOND
        self.current = None
        self.expect_absent = False  # the kept branch was absent from the previous guided call
        self.guided = self.absent = self.unwrapped = 0

    def guided_call(self, run, branch_args, combined_args):
        """One guided denoiser call: ``run(args)`` with the branch options; again with ``combined_args`` (the
        gradient through whatever was computed) if the kept branch was absent and nothing ran with autograd."""
        self.current = call = _Call()
        self.guided += 1
        try:
            out = run(branch_args)
        finally:
            self.current = None
        if call.wrapped == 0:  # the host never called the model function wrapper: nothing was split
            self.unwrapped += 1
            return out
        if call.kept:
            self.expect_absent = False
            return out
        self.absent += 1
        self.expect_absent = True
        return out if call.gated else run(combined_args)

    def notes(self) -> list:
        """Summary lines for the run."""
        lines = []
        if self.absent:
            other = BRANCH_NAMES[COND if self.keep == UNCOND else UNCOND]
            why = (" (ComfyUI computes none at cfg 1, nor for a guider without a negative prompt)"
                   if self.keep == UNCOND else "")
            lines.append(f"cfg_branch '{self.branch}': no {BRANCH_NAMES[self.keep]} batch in {self.absent} of "
                         f"{self.guided} guided calls{why}; the gradient went through the {other} prediction there")
        if self.unwrapped:
            lines.append(f"cfg_branch '{self.branch}': in {self.unwrapped} of {self.guided} guided calls the model "
                         f"was not called through ComfyUI's model function wrapper (another node replaces the "
                         f"batch computation); the gradient went through the combined prediction there")
        return lines


def branch_wrapper(branch: str, previous=None, run: BranchRun | None = None):
    """A ``model_function_wrapper`` that runs the rows of the CFG ``branch`` (``"cond"`` or ``"uncond"``) with
    autograd and the other rows under ``torch.no_grad`` (a separate, smaller call): the gradient then flows through
    that branch only, and the other costs no backward. Wraps a wrapper another pack installed (``previous``).
    ``run`` (a ``BranchRun``) records each guided call and handles a call without the kept branch."""
    run = run or BranchRun(branch)
    keep = run.keep

    def call(apply_model, args):
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def wrapper(apply_model, args):
        x, chunks = args["input"], list(args.get("cond_or_uncond") or [COND])
        state = run.current or _Call()
        state.wrapped += 1
        size = x.shape[0] // len(chunks)
        mine = [i for i, ch in enumerate(chunks) if ch == keep]
        other = [i for i, ch in enumerate(chunks) if ch != keep]
        if not other:
            state.kept = True
            return call(apply_model, args)
        if not mine:
            if run.expect_absent and not state.kept and torch.is_grad_enabled():
                # the kept branch was absent from the last call: this batch may be all there is (gated)
                state.gated = True
                y = call(apply_model, args)
                return _Gate.apply(y, state) if y.requires_grad else y
            with torch.no_grad():
                return call(apply_model, args)
        state.kept = True

        def part(idx, grad: bool):
            rows = torch.cat([torch.arange(i * size, (i + 1) * size) for i in idx])
            with contextlib.nullcontext() if grad else torch.no_grad():
                sub = {**args, "input": x[rows.to(x.device)], "timestep": args["timestep"][rows.to(x.device)],
                       "c": _slice_c(args["c"], rows, x.shape[0], [chunks[i] for i in idx]),
                       "cond_or_uncond": [chunks[i] for i in idx]}
                return rows, call(apply_model, sub)

        pieces = [part(mine, True), part(other, False)]
        out = None
        for rows, y in pieces:
            if out is None:
                out = y.new_empty((x.shape[0],) + tuple(y.shape[1:]))
            out = out.index_copy(0, rows.to(y.device), y)
        return out

    return wrapper


def with_branch(model_options: dict, branch: str, run: BranchRun | None = None) -> dict:
    """``model_options`` (copied) whose model function gives the gradient to one CFG ``branch`` only."""
    if branch == "combined":
        return model_options
    options = dict(model_options or {})
    options["model_function_wrapper"] = branch_wrapper(branch, options.get("model_function_wrapper"), run)
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
