"""What a guided denoiser or decoder call does differently from a plain one, in ComfyUI: which CFG branch carries
the gradient, activation checkpointing (``low_memory``), and precision (guidance networks under autocast on CUDA,
loss scaling for half-precision models, operations that have no backward pass). Nothing here changes the cached
model for longer than a run: the CFG branch goes into a copy of the run's model options, checkpointing wraps module
instances' ``forward`` only inside ``low_memory``, autocast wraps the image terms of the run's own ``Guidance``.
"""
from __future__ import annotations

import contextlib
import functools
import re

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

def _checkpointed(forward, copy_saved: bool = False):
    """``forward`` under non-reentrant activation checkpointing while autograd records.

    ``copy_saved``: for blocks that add residuals in place to their own inputs, which they have also saved for
    backward (Flux's ``txt += …``, ``x += …``). Checkpointing keeps the block's inputs and runs the block again in
    the backward pass, so (1) the block runs on copies of its tensor inputs, leaving the kept ones as they were,
    and (2) the recomputation copies the tensors on the gradient path that it saves (one block at a time, freed
    after its backward), as the denoiser's saved-tensor hooks do without checkpointing: otherwise the recomputed
    in-place add changes a tensor just saved, and the gradient is silently wrong.
    """
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if not copy_saved:
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        calls = [0]

        def block(*a, **k):
            calls[0] += 1
            a = [v.clone() if isinstance(v, torch.Tensor) else v for v in a]
            k = {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in k.items()}
            if calls[0] == 1:  # the forward: checkpointing's hooks keep nothing of it
                return forward(*a, **k)
            return _with_copied_saves(forward, *a, **k)  # a recomputation in the backward pass

        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)
    return run


def _with_copied_saves(forward, *args, **kwargs):
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None:
        raise RuntimeError("Universal Guidance: no checkpointing hooks found while recomputing a block")
    pack, unpack = hooks

    def pack_copy(t):
        return pack(t.clone() if t.requires_grad and not isinstance(t, torch.nn.Parameter) else t)

    with torch.autograd.graph.saved_tensors_hooks(pack_copy, unpack):
        return forward(*args, **kwargs)


# Transformer blocks of the DiT families, by class name (models built on them reuse the classes): SD3's joint
# block, Flux's double- and single-stream blocks. The Flux blocks add residuals in place to their own inputs.
DIT_BLOCKS = frozenset({"JointBlock", "DoubleStreamBlock", "SingleStreamBlock"})
INPLACE_DIT_BLOCKS = frozenset({"DoubleStreamBlock", "SingleStreamBlock"})
# The recomputation's copies need the saved-tensor hooks in force (a torch API without a public name): where torch
# lacks it, the in-place blocks are not checkpointed (the rest still is).
_CAN_COPY_SAVES = hasattr(torch._C._autograd, "_top_saved_tensors_default_hooks")


def checkpoint_targets(unet, vae_model, inplace_residual: bool) -> list:
    """Modules whose activations are recomputed in the backward pass instead of kept: the UNet's ResBlocks and
    its SpatialTransformers — where the transformer block adds its residual in place (hosts before 2025-06), its
    attention layers instead (``CrossAttention``: their inputs are never modified in place; at 512² they hold the
    attention probabilities, ~1 GB per self-attention layer at CFG batch 2); SD3's joint blocks and Flux's double-
    and single-stream blocks (a block recomputes its weights' per-layer casts too: with ComfyUI's manual cast, fp8
    weights or partial loading, no cast weight is kept for the backward pass); the VAE decoder's ResnetBlocks and
    attention, or TAESD's blocks. Returns ``[(module, copy_saved)]`` (see ``_checkpointed``)."""
    targets = []
    if unet is not None:
        dit = [m for m in unet.modules() if type(m).__name__ in DIT_BLOCKS]
        targets += [(m, type(m).__name__ in INPLACE_DIT_BLOCKS) for m in dit
                    if _CAN_COPY_SAVES or type(m).__name__ not in INPLACE_DIT_BLOCKS]
        if not dit:
            try:
                from comfy.ldm.modules.attention import CrossAttention, SpatialTransformer
                from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
            except ImportError:  # pragma: no cover - every supported host has the UNet classes
                kinds = ()
            else:
                kinds = (ResBlock, CrossAttention) if inplace_residual else (ResBlock, SpatialTransformer)
            targets += [(m, False) for m in unet.modules() if kinds and isinstance(m, kinds)]
    if vae_model is not None:
        decoder = getattr(vae_model, "decoder", None) or getattr(vae_model, "taesd_decoder", None)
        if decoder is not None:
            names = ("ResnetBlock", "AttnBlock", "Block")
            targets += [(m, False) for m in decoder.modules() if type(m).__name__ in names]
    return targets


@contextlib.contextmanager
def low_memory(targets: list):
    """Activation checkpointing on the ``(module, copy_saved)`` targets for the duration of the block (their
    ``forward`` is wrapped on the instance and restored afterwards; the cached model is left as it was)."""
    wrapped = []
    try:
        for m, copy_saved in targets:
            if "forward" not in m.__dict__:
                m.forward = _checkpointed(m.forward, copy_saved)
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


LOSS_SCALE = 2.0 ** 10


def loss_scale_for(*dtypes) -> float:
    """The loss scale a run starts from: 2¹⁰ when anything on the gradient's path computes in fp16 — the UNet, the
    VAE, or the guidance networks' autocast (fp16 gradients underflow below 6e-8) — else 1. The engine divides it by
    the largest term weight and halves it on overflow (``guidance.sampler.LOSS_SCALE_BACKOFFS``)."""
    return LOSS_SCALE if torch.float16 in dtypes else 1.0


# Operations that have no backward pass, so a gradient cannot pass through them: fp8 matrix multiplication
# (``torch._scaled_mm``) in ComfyUI's scaled-fp8 layers, and attention kernels written for inference only. (ComfyUI's
# fp8 "fast" layers, ``fp8_ops``: --fast / weight_dtype fp8_e4m3fn_fast, fall back to a cast weight by themselves when
# the input needs a gradient, so they need nothing here.)
_FP8_ADVICE = ("load an fp16, bf16 or plain fp8 file of the model instead of the scaled-fp8 one (Load Diffusion Model "
               "with weight_dtype fp8_e4m3fn stores an fp16 file in fp8 without fp8 multiplication), or turn "
               "'jacobian' off (the gradient then skips the diffusion model)")
_ATTENTION_ADVICE = {
    "sage": "start ComfyUI without --use-sage-attention and remove any node that patches sage attention into the "
            "model (e.g. --use-pytorch-cross-attention instead)",
    "flash": "start ComfyUI without --use-flash-attention (e.g. --use-pytorch-cross-attention instead)",
}


def _closure_value(fn, name: str, default=None):
    fn = getattr(fn, "__func__", fn)
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not cells or name not in code.co_freevars:
        return default
    try:
        return cells[code.co_freevars.index(name)].cell_contents
    except ValueError:  # empty cell
        return default


def _uses_fp8_matmul(module: torch.nn.Module) -> bool:
    """Whether this layer multiplies with ``torch._scaled_mm`` and has no fallback: ComfyUI's ``scaled_fp8_ops``
    layers built with fp8 matrix multiplication (a scaled-fp8 file whose marker asks for it, on a GPU with fp8
    compute), for float8_e4m3fn weights."""
    fp8 = getattr(torch, "float8_e4m3fn", None)
    weight = getattr(module, "weight", None)
    if fp8 is None or not isinstance(weight, torch.Tensor) or weight.dtype != fp8:
        return False
    return bool(_closure_value(getattr(type(module), "forward_comfy_cast_weights", None), "fp8_matrix_mult", False))


def _attention_kind(fn):
    """``"sage"`` / ``"flash"`` for attention functions without a backward pass, else None."""
    if fn is None:
        return None
    name = getattr(fn, "__name__", type(fn).__name__).lower()
    if "sage" in name:
        return "sage"
    if "flash" in name:
        import comfy.ldm.modules.attention as attention
        wrapper = getattr(attention, "flash_attn_wrapper", None)
        # ComfyUI's flash kernel is a torch custom op; it has a backward only if an autograd formula was registered
        if wrapper is not None and getattr(wrapper, "_backward_fn", None) is None:
            return "flash"
    return None


def backward_problem(diffusion_model, model_options=None):
    """Why a gradient cannot pass through this diffusion model as ComfyUI will run it (a sentence saying what to
    change), or None: fp8 matrix-multiplication layers, or an attention kernel without a backward pass (ComfyUI's
    global choice, or a ``transformer_options`` override another node installed)."""
    if isinstance(diffusion_model, torch.nn.Module):
        fp8 = sum(1 for m in diffusion_model.modules() if _uses_fp8_matmul(m))
        if fp8:
            return (f"{fp8} of this model's layers multiply in fp8 (a scaled-fp8 file, which ComfyUI runs with "
                    f"torch._scaled_mm on a GPU with fp8 compute), which has no backward pass, so guidance cannot take "
                    f"a gradient through the model: " + _FP8_ADVICE)
    try:
        import comfy.ldm.modules.attention as attention
    except Exception:  # no such module: nothing to check
        return None
    transformer_options = (model_options or {}).get("transformer_options", {}) or {}
    for fn, where in ((transformer_options.get("optimized_attention_override"), "a node patched into the model"),
                      (getattr(attention, "optimized_attention", None), "ComfyUI's attention setting")):
        kind = _attention_kind(fn)
        if kind is not None:
            return (f"the model's attention runs {kind} attention ({where}: {getattr(fn, '__name__', fn)}), whose "
                    f"kernel has no backward pass, so guidance cannot take a gradient through the model: "
                    f"{_ATTENTION_ADVICE[kind]}, or turn 'jacobian' off (the gradient then skips the diffusion "
                    f"model)")
    return None


_NO_BACKWARD = re.compile(r"derivative for \S+ is not implemented|no autograd formula|implement either the backward"
                          r"|autograd kernel was not registered|don't support automatic differentiation")


def no_backward_message(error: BaseException):
    """For an autograd error saying an operation has no backward pass: a user-facing sentence naming it and what to
    change; None for any other error."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if not isinstance(error, (RuntimeError, NotImplementedError)) or not _NO_BACKWARD.search(text):
        return None
    advice = (_FP8_ADVICE if "_scaled_mm" in text else
              "for guided runs, remove what patches the model's attention or layers for speed (sage / flash "
              "attention: --use-sage-attention, --use-flash-attention or a patch node; fp8 matrix multiplication: "
              "--fast, scaled-fp8 files), or turn 'jacobian' off (the gradient then skips the diffusion model)")
    return (f"an operation on the guidance gradient's path has no backward pass ({text[:200]}), so guidance cannot "
            f"take a gradient through it: {advice}")
