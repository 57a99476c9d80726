"""Weights and saved activations made usable under autograd for one guided run, without copying the model.

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
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch


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
