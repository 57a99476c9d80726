"""The memory counter: what one forward + backward needs, read off the operators themselves, with no device.

``MemoryCounter`` (a ``TorchDispatchMode``) sees every operator output: a storage is live from its first
appearance until a weakref finalizer sees it freed; the peak of the live bytes is what PyTorch's caching allocator
must hold at least. Saved-for-backward bytes are counted through ``saved_tensors_hooks``. ``count`` runs a function
under it on the ``meta`` device or on real tensors; ``profiler_peak`` is the independent check (the CPU allocator's
record in ``torch.profiler``). ``wrapped_blocks`` applies ``low_memory``'s activation checkpointing (and Flux's
in-place-input copies) for a count.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

GB = 1e9


def _storage(t: torch.Tensor):
    return t.untyped_storage()


class MemoryCounter(TorchDispatchMode):
    """Live bytes of the storages created inside the block (by storage: views and in-place results count once;
    freed when the storage's Python object is finalized), their peak, and the bytes autograd saves for backward.

    ``resident(tensors)`` registers storages that exist already (weights, inputs): never counted as live, and a
    saved tensor on one of them is a saved weight (``saved_resident_bytes``), not new memory."""

    def __init__(self):
        super().__init__()
        self._known = WeakIdKeyDictionary()
        self._resident = WeakIdKeyDictionary()
        self._saved = WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0
        self.saved_bytes = 0
        self.saved_resident_bytes = 0
        self._hooks = None

    def resident(self, tensors) -> int:
        total = 0
        for t in tensors:
            st = _storage(t)
            if st not in self._resident:
                self._resident[st] = True
                self._known[st] = True
                total += st.nbytes()
        return total

    def _free(self, nbytes: int):
        self.live -= nbytes

    def _track(self, t):
        if not isinstance(t, torch.Tensor):
            return
        st = _storage(t)
        if st in self._known:
            return
        n = st.nbytes()
        self._known[st] = True
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, n)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._track(t)
        return out

    def _pack(self, t):
        st = _storage(t)
        if st not in self._saved:
            self._saved[st] = True
            if st in self._resident:
                self.saved_resident_bytes += st.nbytes()
            else:
                self.saved_bytes += st.nbytes()
        return t

    @contextlib.contextmanager
    def saving(self):
        """Count what autograd saves in the block (outermost hooks: checkpointed blocks keep only their inputs)."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield


def _flash_sdpa(orig):
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is None and not dropout_p and not kwargs:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, is_causal, scale=scale)[0]
        return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)
    return sdpa


@contextlib.contextmanager
def memory_efficient_attention():
    """ComfyUI's attention as PyTorch SDPA (its GPU default), and SDPA as the flash kernel on every device: on the
    meta device SDPA would pick the math path and keep the N×N probabilities, which no GPU run does."""
    mods = []
    for name in ("comfy.ldm.modules.attention", "comfy.ldm.flux.math", "comfy.ldm.modules.diffusionmodules.mmdit"):
        try:  # without ComfyUI (a plain PyTorch model): SDPA only
            mods.append(__import__(name, fromlist=["x"]))
        except ImportError:
            pass
    saved = [(m, n, getattr(m, n)) for m in mods for n in ("optimized_attention", "optimized_attention_masked")
             if hasattr(m, n)]
    orig = torch.nn.functional.scaled_dot_product_attention
    try:
        for m, n, _ in saved:
            setattr(m, n, mods[0].attention_pytorch)
        torch.nn.functional.scaled_dot_product_attention = _flash_sdpa(orig)
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
        for m, n, v in saved:
            setattr(m, n, v)


def module_tensors(*modules) -> list:
    return [t for m in modules if m is not None for t in list(m.parameters()) + list(m.buffers())]


def count(fn, inputs: list, modules: list, *, checkpoint_modules=()) -> dict:
    """Run ``fn(*inputs)`` (forward + backward) under the counter: weights (``modules``), saved bytes, peak;
    ``checkpoint_modules`` recomputed in the backward pass."""
    counter = MemoryCounter()
    weights = counter.resident(module_tensors(*modules))
    inputs_b = counter.resident([t for t in inputs if t is not None])
    with wrapped_blocks(modules[0], list(checkpoint_modules)), memory_efficient_attention(), torch.enable_grad(), counter:
        fn(counter, *inputs)
    return {"weights_gb": weights / GB, "inputs_gb": inputs_b / GB, "saved_gb": counter.saved_bytes / GB,
            "saved_weights_gb": counter.saved_resident_bytes / GB, "transient_peak_gb": counter.peak / GB,
            "peak_gb": (weights + inputs_b + counter.peak) / GB}


# Flux's blocks add a residual in place to an input (DoubleStreamBlock ``txt += …``, SingleStreamBlock ``x += …``)
# that autograd has saved: a correct backward needs that input copied once at the block's entry.
INPLACE_INPUT = {"DoubleStreamBlock": "txt", "SingleStreamBlock": "x"}


def _guarded(forward, arg: str):
    sig = inspect.signature(forward)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        if torch.is_grad_enabled():
            bound.arguments[arg] = bound.arguments[arg].clone()
        return forward(*bound.args, **bound.kwargs)
    return run


def _checkpointed(forward):

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


@contextlib.contextmanager
def wrapped_blocks(model, checkpointed: list):
    """For the duration of the block: Flux's in-place inputs copied at block entry (every block of ``model``), and
    activation checkpointing of ``checkpointed`` (instance ``forward`` wrapped, restored after) as the pack's
    ``low_memory`` does it; the copy happens inside the checkpoint, so it is recomputed, not kept."""
    ck = {id(m) for m in checkpointed}
    mods = list(checkpointed) + [m for m in model.modules() if type(m).__name__ in INPLACE_INPUT and id(m) not in ck]
    wrapped = []
    try:
        for m in mods:
            if "forward" in m.__dict__:
                continue
            fwd = m.forward
            if type(m).__name__ in INPLACE_INPUT:
                fwd = _guarded(fwd, INPLACE_INPUT[type(m).__name__])
            if id(m) in ck:
                fwd = _checkpointed(fwd)
            m.forward = fwd
            wrapped.append(m)
        yield len(wrapped)
    finally:
        for m in wrapped:
            del m.forward


def profiler_peak(fn) -> int:
    """Peak bytes of the CPU allocator during ``fn()``, relative to its start: the allocation and free records of
    ``torch.profiler`` (``profile_memory``), summed in time order."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            records.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, n in sorted(records):
        live += n
        peak = max(peak, live)
    return peak
