"""What a guided run needs in memory, told to ComfyUI before sampling; ``low_memory`` = ``auto``.

ComfyUI reserves memory for sampling from its inference estimate ``BaseModel.memory_required(shape)`` (with
memory-efficient attention: area × dtype size × 0.01 × the family's ``memory_usage_factor`` MiB) and for decoding from ``VAE.memory_used_decode(shape, dtype)``.
A guided iteration keeps the denoiser's and the decoder's activations for the backward pass, so it needs a multiple
of both. The multiples below are what ``make bench-memory`` counted (ComfyUI v0.3.64's model classes, weights on
the meta device, one image-guided iteration: transient peak above the weights, on the CFG batch) divided by
ComfyUI's estimate for the same batch, rounded up:

=============  ==========================  =================================
family         denoiser, low_memory off/on  counted (1024²; SD1.5 512²)
=============  ==========================  =================================
SD1.x / SD2.x  12 / 3.5                    11.1 / 2.9
SDXL           24 / 3.5                    22.2 / 3.1
SD3 / SD3.5    30 / 3.5                    16.6–28.6 / 2.2–3.4
Flux           24 / 3.0                    22.4 / 2.5 (bf16 weights)
other          40 / 4.0                    (the largest, rounded up)
=============  ==========================  =================================

Weights kept in a smaller dtype than they compute in (fp8 weights, ``comfy.ops`` manual cast) are cast layer by
layer and, without ``low_memory``, each cast weight is kept for backward: 0.75 of the model in its compute dtype
(Flux fp8: 17.1 GB counted, 0.72). The decoder's forward + backward: 2.5× (off) / 1.0× (on) ComfyUI's decode
estimate (counted: 2.0–2.2 / 0.8 for the SD and SDXL VAEs); a TAESD/TAEF1 decoder a tenth of that.
``make bench-memory`` prints the resulting reservation next to each counted row ("reserved by the pack"); every row
is covered.

Guidance networks (CLIP, face, detection, segmentation) are moved to the device for the run and back to ComfyUI's
offload device after it (``release_networks``); their size is part of what is reserved.
"""
from __future__ import annotations

import dataclasses

import torch

GB = 1e9
LOW_MEMORY_CHOICES = ["auto", "on", "off"]
LEGACY_LOW_MEMORY = {True: "on", False: "off"}  # the BOOLEAN widget of earlier releases

DENOISER_RATIO = {"BaseModel": (12.0, 3.5), "SDXL": (24.0, 3.5), "SDXLRefiner": (24.0, 3.5),
                  "SD3": (30.0, 3.5), "Flux": (24.0, 3.0)}
OTHER_RATIO = (40.0, 4.0)
CAST_WEIGHTS_KEPT = 0.75
DECODER_RATIO = (2.5, 1.0)
TAESD_SHARE = 0.1


def normalize_mode(value) -> str:
    """``auto`` / ``on`` / ``off`` from a widget value (a boolean of an earlier release's workflow included)."""
    if isinstance(value, bool):
        return LEGACY_LOW_MEMORY[value]
    if value in LOW_MEMORY_CHOICES:
        return value
    raise ValueError(f"low_memory must be one of {LOW_MEMORY_CHOICES}, got {value!r}")


def _ratio(base_model) -> tuple:
    for klass in type(base_model).__mro__:
        if klass.__name__ in DENOISER_RATIO and (klass.__name__ != "BaseModel" or klass is type(base_model)):
            return DENOISER_RATIO[klass.__name__]
    return OTHER_RATIO


def _module_bytes(module, dtype=None) -> int:
    if not isinstance(module, torch.nn.Module):
        return 0
    total = 0
    for t in module.parameters():
        size = torch.empty((), dtype=dtype).element_size() if dtype is not None else t.element_size()
        total += t.numel() * size
    return total


def _cast_weight_bytes(base_model) -> int:
    """Bytes of the weights in their compute dtype where they are kept in a smaller one (cast per layer)."""
    compute = getattr(base_model, "manual_cast_dtype", None)
    net = getattr(base_model, "diffusion_model", None)
    if compute is None or not isinstance(net, torch.nn.Module):
        return 0
    itemsize = torch.empty((), dtype=compute).element_size()
    return sum(t.numel() * itemsize for t in net.parameters() if t.element_size() < itemsize)


def inference_bytes(base_model, latent_shape, batch: int) -> float:
    """ComfyUI's inference estimate for a batch with memory-efficient attention (``BaseModel.memory_required`` on
    a GPU with PyTorch or xformers attention): area × dtype size × 0.01 × ``memory_usage_factor`` MiB. The formula is
    taken whatever the host's attention, so the estimate does not change with it (without memory-efficient
    attention a guided iteration needs more than this plan says)."""
    dtype = getattr(base_model, "manual_cast_dtype", None)
    if dtype is None and hasattr(base_model, "get_dtype"):
        dtype = base_model.get_dtype()
    itemsize = torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4
    area = batch
    for n in latent_shape[2:]:
        area *= int(n)
    factor = float(getattr(base_model, "memory_usage_factor", 1.0) or 1.0)
    return area * itemsize * 0.01 * factor * 2**20


def denoiser_bytes(base_model, latent_shape, batch: int) -> tuple:
    """(low_memory off, on): transient bytes of the denoiser's forward + backward for a ``batch`` of latents."""
    inference = inference_bytes(base_model, latent_shape, batch)
    off, on = _ratio(base_model)
    return inference * off + CAST_WEIGHTS_KEPT * _cast_weight_bytes(base_model), inference * on


def decoder_bytes(vae, latent_shape) -> tuple:
    """(off, on): the guidance decoder's forward + backward for one image per latent of the batch. ComfyUI gives
    TAESD files the full VAE's decode estimate; their decoder keeps about a tenth of it (``TAESD_SHARE``)."""
    if vae is None:
        return 0.0, 0.0
    try:
        decode = float(vae.memory_used_decode(tuple(latent_shape), vae.vae_dtype))
    except Exception:
        return 0.0, 0.0
    if type(getattr(vae, "first_stage_model", None)).__name__ == "TAESD":
        decode *= TAESD_SHARE
    decode *= max(1, int(latent_shape[0]))  # ComfyUI's formula is per image (it leaves the batch out)
    return decode * DECODER_RATIO[0], decode * DECODER_RATIO[1]


def network_modules(guidance) -> list:
    """The networks of a run's guidance terms, each once: modules held by a term's loss or by an object it holds
    (a CLIP term's image encoder, an autocast wrapper's loss)."""
    found = []

    def visit(obj, depth):
        if isinstance(obj, torch.nn.Module):
            if not any(obj is m for m in found):
                found.append(obj)
            return
        if depth == 0 or isinstance(obj, (torch.Tensor, str, bytes, int, float)):
            return
        for value in (getattr(obj, "__dict__", None) or {}).values():
            visit(value, depth - 1)

    for term in getattr(guidance, "terms", ()):
        visit(getattr(term, "loss", None), 3)
    return found


def networks_bytes(guidance, device) -> int:
    """Bytes the guidance networks will add on ``device`` (those not there yet)."""
    total = 0
    for net in network_modules(guidance):
        for t in list(net.parameters()) + list(net.buffers()):
            if t.device != torch.device(device):
                total += t.numel() * t.element_size()
    return total


@dataclasses.dataclass
class Plan:
    """What one guided run reserves, and whether it recomputes activations."""

    mode: str
    low_memory: bool
    need_off: float
    need_on: float
    networks: float = 0.0
    free: float | None = None

    @property
    def reserve(self) -> float:
        return (self.need_on if self.low_memory else self.need_off) + self.networks

    def line(self, device) -> str:
        chosen = "on" if self.low_memory else "off"
        how = f"auto → {chosen}" if self.mode == "auto" else chosen
        free = f", {self.free / GB:.2f} GB free on {device} after loading" if self.free is not None else ""
        return (f"low_memory {how}: a guided iteration needs about {self.need_off / GB:.2f} GB for its backward "
                f"pass without it, {self.need_on / GB:.2f} GB with it (estimate){free}; "
                f"{self.networks / GB:.2f} GB of guidance networks")


def plan(mode: str, base_model, decoder_vae, latent_shape, batch: int, guidance, device) -> Plan:
    """The estimate for a run (``decoder_vae`` None: nothing is decoded, only self-guidance)."""
    d_off, d_on = denoiser_bytes(base_model, latent_shape, batch)
    v_off, v_on = decoder_bytes(decoder_vae, latent_shape)
    mode = normalize_mode(mode)
    return Plan(mode, mode == "on", d_off + v_off, d_on + v_on, float(networks_bytes(guidance, device)))


def decide(p: Plan, free_bytes: float) -> Plan:
    """``auto``: on where the run without it would not fit in the free memory (after loading for ``need_on``)."""
    p.free = float(free_bytes)
    if p.mode == "auto":
        p.low_memory = p.need_off + p.networks > p.free
    return p


def release_networks(guidance, offload_device) -> None:
    """Move the guidance networks to ComfyUI's offload device after a run (they stay cached there)."""
    with torch.inference_mode(False):
        for net in network_modules(guidance):
            net.to(offload_device)
