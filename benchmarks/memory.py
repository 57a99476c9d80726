"""What one image-guided iteration needs in GPU memory, for full-size SD1.5, SDXL, SD3.5 and Flux-dev, counted
without the hardware.

The denoisers and decoders are ComfyUI's own model classes (``comfy.supported_models`` → ``model_base``, with the
``unet_config`` ComfyUI detects in the released checkpoints; ``comfy.ldm.modules.diffusionmodules.model`` VAE;
``comfy.taesd`` TAESD / TAESD3 / TAEF1), built with their weights on the ``meta`` device (shapes and dtypes, no
storage, no compute) in the dtypes ComfyUI picks on a current NVIDIA GPU: fp16 UNets (SD1.5, SDXL), bf16 DiTs
(SD3.5, Flux), Flux also with fp8 (e4m3fn) weights cast to bf16 layer by layer (``comfy.ops.manual_cast``, as
``weight_dtype fp8_e4m3fn`` loads it), bf16 VAEs. Attention is the memory-efficient kind ComfyUI uses on GPUs
(PyTorch SDPA; counted with the flash kernel, which keeps the output and the log-sum-exp, not the N×N matrix).

One guided iteration = the denoiser's forward on the CFG batch (2 for SD1.5/SDXL/SD3.5; 1 for the
guidance-distilled Flux), x̂0, the decoder's forward on x̂0 (the full VAE or the tiny one), a pixel loss, and the
backward pass to the input latent (never to the weights). ``low_memory`` = activation checkpointing (non-reentrant
``torch.utils.checkpoint``, as ``nodes/guided_calls.low_memory`` applies it) of the UNet's ResBlocks and
SpatialTransformers, SD3's joint blocks, Flux's double and single blocks, the VAE decoder's ResnetBlocks/attention
and TAESD's blocks. Flux's blocks add a residual in place to an input autograd saved: that input is copied at the
block's entry (inside the checkpoint when on). Counted per row:

* ``weights_gb``: the denoiser's and the decoder's parameters and buffers, once (no copy of any weight; text
  encoders and the guidance network are not resident during the iteration and are left out);
* ``saved_gb``: bytes of the distinct storages autograd keeps for the backward pass (``saved_tensors_hooks``),
  weights excluded; per-layer cast weights (fp8 → bf16) are not weights and are counted here;
* ``peak_gb`` = ``weights_gb`` + inputs + the highest sum of live bytes of every storage created during the forward
  and the backward (a ``TorchDispatchMode`` sees every operator output; a storage is live from its first appearance
  until a weakref finalizer sees it freed). It is what PyTorch's caching allocator must hold at least; the
  allocator's rounding and fragmentation, the CUDA context (~0.3-0.5 GB) and ComfyUI's reserve come on top.

The method is checked against real tensors: the full-size SD1.5 UNet and VAE at 256² with random fp32 weights on
the CPU, counted on the meta device and then run for real under the same accounting and under
``torch.profiler``'s allocator record (an independent peak of the CPU allocator).

    python -m benchmarks.memory --out out/bench     # ComfyUI v0.3.64 (COMFYUI_PATH): memory.json + the table
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GB = 1e9
CARDS_GB = (8, 12, 16, 24)
DEFAULT_COMFYUI = os.path.join(os.environ.get("TMPDIR", "/tmp"), "universal-guidance-hosts", "comfyui-0.3.64")


# ----------------------------------------------------------------------------------------------- the counter

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


# ------------------------------------------------------------------------------------------------ the models

# unet_config of the released checkpoints, as ComfyUI's model_detection finds them (SD1.5/SDXL: its own lists in
# unet_config_from_diffusers_unet; SD3.5/Flux: detect_unet_config on the files' keys and shapes).
SD15_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320,
             'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0],
             'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1, 'use_linear_in_transformer': False,
             'context_dim': 768, 'num_heads': 8, 'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             'use_temporal_attention': False, 'use_temporal_resblock': False}
SDXL_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4,
             'model_channels': 320, 'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10],
             'channel_mult': [1, 2, 4], 'transformer_depth_middle': 10, 'use_linear_in_transformer': True,
             'context_dim': 2048, 'num_head_channels': 64,
             'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
             'use_temporal_attention': False, 'use_temporal_resblock': False}


def _mmdit(depth: int, pos_embed_max_size: int, x_block_self_attn_layers: list) -> dict:
    return {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": depth, "input_size": None,
            "adm_in_channels": 2048,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": 64 * depth}},
            "num_patches": pos_embed_max_size ** 2, "pos_embed_max_size": pos_embed_max_size, "qk_norm": "rms",
            "pos_embed_scaling_factor": None, "x_block_self_attn_layers": x_block_self_attn_layers}


FLUX_DEV = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
            "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
            "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
            "guidance_embed": True}

VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

# family: unet_config, weight dtype, compute dtype (manual cast), pixels, CFG batch, text tokens × width,
# pooled width (y), latent channels
FAMILIES = {
    "SD1.5": dict(unet=SD15_UNET, dtype=torch.float16, pixels=512, batch=2, ctx=(77, 768), y=None, ch=4),
    "SDXL": dict(unet=SDXL_UNET, dtype=torch.float16, pixels=1024, batch=2, ctx=(77, 2048), y=2816, ch=4),
    "SD3.5-medium": dict(unet=_mmdit(24, 384, list(range(13))), dtype=torch.bfloat16, pixels=1024, batch=2,
                         ctx=(154, 4096), y=2048, ch=16),
    "SD3.5-large": dict(unet=_mmdit(38, 192, []), dtype=torch.bfloat16, pixels=1024, batch=2, ctx=(154, 4096),
                        y=2048, ch=16),
    "Flux-dev": dict(unet=FLUX_DEV, dtype=torch.bfloat16, pixels=1024, batch=1, ctx=(256, 4096), y=768, ch=16),
    "Flux-dev fp8": dict(unet=FLUX_DEV, dtype=torch.float8_e4m3fn, compute=torch.bfloat16, pixels=1024, batch=1,
                         ctx=(256, 4096), y=768, ch=16),
}
VAE_DTYPE = torch.bfloat16  # ComfyUI's VAE dtype on GPUs with bf16 (model_management.vae_dtype)


def build_denoiser(family: dict, device="meta"):
    """(model_config, diffusion_model) through ComfyUI's own classes: the supported model that matches the config,
    its inference dtype set as a loader does, and ``get_model`` (model_base → the UNet / MMDiT / Flux)."""
    import comfy.model_detection as detection
    unet_config = dict(family["unet"])
    model_config = detection.model_config_from_unet_config(unet_config)
    if model_config is None:
        raise RuntimeError(f"ComfyUI knows no model with unet_config {unet_config}")
    model_config.set_inference_dtype(family["dtype"], family.get("compute"))
    model = model_config.get_model({}, device=device)
    model.diffusion_model.requires_grad_(False)
    return model_config, model


def build_decoder(kind: str, latent_channels: int, device="meta", dtype=None):
    """(resident module, decode function): the full VAE (encoder + decoder resident, decoder run) or TAESD."""
    dtype = dtype or VAE_DTYPE
    if kind == "vae":
        from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder
        import comfy.ops
        cfg = dict(VAE_DDCONFIG, z_channels=latent_channels)
        with torch.device(device):
            vae = torch.nn.Module()
            vae.encoder = Encoder(**cfg)
            vae.decoder = Decoder(**cfg)
            if latent_channels == 4:  # SD VAE: quant convs; SD3/Flux VAE: none
                vae.quant_conv = comfy.ops.disable_weight_init.Conv2d(8, 8, 1)
                vae.post_quant_conv = comfy.ops.disable_weight_init.Conv2d(4, 4, 1)
        vae = vae.to(dtype).requires_grad_(False)
        for m in vae.modules():  # SDPA, as ComfyUI's VAE uses on GPUs
            if hasattr(m, "optimized_attention"):
                from comfy.ldm.modules.diffusionmodules.model import pytorch_attention
                m.optimized_attention = pytorch_attention

        def decode(z):
            if hasattr(vae, "post_quant_conv"):
                z = vae.post_quant_conv(z)
            return vae.decoder(z)
        return vae, decode
    from comfy.taesd.taesd import TAESD
    with torch.device(device):
        tae = TAESD(latent_channels=latent_channels)
    tae = tae.to(dtype).requires_grad_(False)
    return tae, tae.decode


def low_memory_targets(unet, decoder) -> list:
    """The blocks recomputed in the backward pass: the UNet's ResBlocks and SpatialTransformers (as
    ``nodes.guided_calls.checkpoint_targets`` on hosts without in-place residuals), SD3's JointBlocks, Flux's
    DoubleStreamBlocks and SingleStreamBlocks, the decoder's ResnetBlocks / AttnBlocks / TAESD Blocks."""
    names = ("JointBlock", "DoubleStreamBlock", "SingleStreamBlock")
    targets = [m for m in unet.modules() if type(m).__name__ in names]
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    targets += [m for m in unet.modules() if isinstance(m, (ResBlock, SpatialTransformer))]
    dec = getattr(decoder, "decoder", None) or getattr(decoder, "taesd_decoder", None)
    if dec is not None:
        targets += [m for m in dec.modules() if type(m).__name__ in ("ResnetBlock", "AttnBlock", "Block")]
    return targets


# Flux's blocks add a residual in place to an input (DoubleStreamBlock ``txt += …``, SingleStreamBlock ``x += …``)
# that autograd has saved: a correct backward needs that input copied once at the block's entry.
INPLACE_INPUT = {"DoubleStreamBlock": "txt", "SingleStreamBlock": "x"}


def _guarded(forward, arg: str):
    import functools
    import inspect
    sig = inspect.signature(forward)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        if torch.is_grad_enabled():
            bound.arguments[arg] = bound.arguments[arg].clone()
        return forward(*bound.args, **bound.kwargs)
    return run


def _checkpointed(forward):
    import functools

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


def iteration_fn(model_config, unet, family: dict, decode, *, cfg_scale: float = 5.0):
    """One guided iteration (forward + backward to the latent), on the denoiser's own call signature."""
    dtype = family.get("compute") or family["dtype"]
    image_model = family["unet"].get("image_model")
    latent_format = model_config.latent_format
    vae_dtype = family.get("vae_dtype", VAE_DTYPE)

    def run(counter, x, t, ctx, y, guidance, target):
        with counter.saving():
            xl = x.detach().requires_grad_(True)
            xin = torch.cat([xl] * family["batch"]).to(dtype)
            kw = {}
            if image_model == "flux":
                out = unet(xin, t, ctx, y=y, guidance=guidance, transformer_options={})
            elif "depth" in family["unet"]:  # MMDiT
                out = unet(xin, t, context=ctx, y=y, transformer_options={})
            else:
                if y is not None:
                    kw["y"] = y
                out = unet(xin, timesteps=t, context=ctx, transformer_options={}, **kw)
            out = out.float()  # ComfyUI's apply_model returns fp32
            if family["batch"] == 2:
                cond, uncond = out.chunk(2)
                out = uncond + cfg_scale * (cond - uncond)
            x0 = xl - 0.5 * out  # calculate_denoised (σ = 0.5), EPS or flow alike
            z = latent_format.process_out(x0).to(vae_dtype)
            img = decode(z).float()
            loss = ((img.clamp(-1, 1) - target) ** 2).mean()
        grad, = torch.autograd.grad(loss, xl)
        return grad
    return run


def inputs(family: dict, pixels: int, device="meta", dtype=None):
    lat = pixels // 8
    b = family["batch"]
    dt = dtype or family.get("compute") or family["dtype"]
    with torch.device(device):
        x = torch.zeros(1, family["ch"], lat, lat)
        t = torch.full((b,), 0.5)
        ctx = torch.zeros(b, *family["ctx"], dtype=dt)
        y = torch.zeros(b, family["y"], dtype=dt) if family["y"] else None
        guidance = torch.full((b,), 3.5) if family["unet"].get("image_model") == "flux" else None
        target = torch.zeros(1, 3, pixels, pixels)
    return [x, t, ctx, y, guidance, target]


def _memory_plan():
    """The pack's ``nodes/memory_plan.py`` (loaded by path: ``nodes`` is ComfyUI's own module here)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ug_memory_plan", os.path.join(ROOT, "nodes", "memory_plan.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class _DecodeEstimate:
    """ComfyUI v0.3.64's ``VAE.memory_used_decode`` for AutoencoderKL and TAESD files (both keep the default)."""

    vae_dtype = VAE_DTYPE

    def __init__(self, kind: str):
        if kind != "vae":
            self.first_stage_model = type("TAESD", (), {})()  # what memory_plan tells TAESD files by

    @staticmethod
    def memory_used_decode(shape, dtype):
        return 2178 * shape[2] * shape[3] * 64 * torch.empty((), dtype=dtype).element_size()


def plan_estimate(base_model, family: dict, pixels: int, lowmem: bool, decoder_kind: str = "vae") -> float:
    """What the pack reserves for this iteration before sampling (GB): ``memory_plan``'s estimate of the transient
    memory (denoiser and decoder activations; cast weights without low_memory), the networks aside."""
    plan = _memory_plan()
    shape = (1, family["ch"], pixels // 8, pixels // 8)
    d = plan.denoiser_bytes(base_model, shape, family["batch"])
    v = plan.decoder_bytes(_DecodeEstimate(decoder_kind), shape)
    return (d[1] + v[1] if lowmem else d[0] + v[0]) / GB


def count_row(name: str, decoder_kind: str, lowmem: bool, *, pixels=None, device="meta", family=None) -> dict:
    family = family or FAMILIES[name]
    pixels = pixels or family["pixels"]
    model_config, base = build_denoiser(family, device)
    unet = base.diffusion_model
    dec, decode = build_decoder(decoder_kind, family["ch"], device, family.get("vae_dtype"))
    fn = iteration_fn(model_config, unet, family, decode)
    ins = inputs(family, pixels, device)
    targets = low_memory_targets(unet, dec) if lowmem else ()
    t0 = time.time()
    res = count(fn, ins, [unet, dec], checkpoint_modules=targets)
    res["plan_estimate_gb"] = plan_estimate(base, family, pixels, lowmem, decoder_kind)
    res["plan_estimate_covers"] = res["plan_estimate_gb"] >= res["transient_peak_gb"]
    return {"family": name, "pixels": pixels, "decoder": decoder_kind, "low_memory": lowmem,
            "weight_dtype": str(family["dtype"]).replace("torch.", ""),
            "compute_dtype": str(family.get("compute") or family["dtype"]).replace("torch.", ""),
            "vae_dtype": str(family.get("vae_dtype", VAE_DTYPE)).replace("torch.", ""), "cfg_batch": family["batch"],
            "checkpointed_modules": len(targets), **res,
            "fits_gb": [c for c in CARDS_GB if res["peak_gb"] <= c], "count_seconds": round(time.time() - t0, 1)}


# ---------------------------------------------------------------------------------------- the check on the CPU

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


def cpu_check(pixels: int = 256, decoder_kind: str = "vae", lowmem: bool = False) -> dict:
    """Full-size SD1.5 (UNet + decoder) at ``pixels``² in fp32: counted on meta, then run for real on the CPU with
    random weights under the same counter and under the profiler's allocator record."""
    fam = dict(FAMILIES["SD1.5"], dtype=torch.float32, vae_dtype=torch.float32)
    meta = count_row("SD1.5", decoder_kind, lowmem, pixels=pixels, family=fam)
    model_config, base = build_denoiser(fam, "meta")
    unet = base.diffusion_model
    dec, decode = build_decoder(decoder_kind, fam["ch"], "meta", torch.float32)
    unet, dec = unet.to_empty(device="cpu"), dec.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module_tensors(unet, dec):
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    fn = iteration_fn(model_config, unet, fam, decode)
    ins = inputs(fam, pixels, "cpu")
    targets = low_memory_targets(unet, dec) if lowmem else ()
    t0 = time.time()
    real = count(fn, ins, [unet, dec], checkpoint_modules=targets)
    seconds = time.time() - t0

    class _Null:
        @contextlib.contextmanager
        def saving(self):
            yield
    with wrapped_blocks(unet, list(targets)), memory_efficient_attention(), torch.enable_grad():
        prof = profiler_peak(lambda: fn(_Null(), *ins))
    del unet, dec
    return {"family": "SD1.5", "pixels": pixels, "dtype": "float32", "decoder": decoder_kind, "low_memory": lowmem,
            "meta_transient_peak_gb": meta["transient_peak_gb"], "meta_saved_gb": meta["saved_gb"],
            "real_transient_peak_gb": real["transient_peak_gb"], "real_saved_gb": real["saved_gb"],
            "profiler_allocator_peak_gb": prof / GB,
            "meta_vs_real": meta["transient_peak_gb"] / real["transient_peak_gb"] - 1,
            "meta_vs_profiler": meta["transient_peak_gb"] / (prof / GB) - 1,
            "weights_gb": real["weights_gb"], "real_seconds": round(seconds, 1)}


# ------------------------------------------------------------------------------------------------- reporting

ROWS = [(f, d, lm) for f in FAMILIES for d in ("vae", "taesd") for lm in (False, True)]


def table(rows: list) -> str:
    """The README table: one line per model × decoder, ``low_memory`` off and on side by side."""
    def cards(r):
        return f"{min(r['fits_gb'])}+" if r["fits_gb"] else "> 24"
    lines = ["| model (weights) | size | decoder | weights GB | saved GB off / on | peak GB off / on | "
             "smallest card (8/12/16/24 GB) off / on | reserved by the pack GB off / on |",
             "|---|---|---|---|---|---|---|---|"]
    for off in (r for r in rows if not r["low_memory"]):
        on = next((r for r in rows if r["low_memory"] and r["family"] == off["family"]
                   and r["decoder"] == off["decoder"]), None)
        if on is None:
            continue
        tiny = "TAESD" if off["family"][:2] == "SD" and not off["family"].startswith("SD3") else (
            "TAESD3" if off["family"].startswith("SD3") else "TAEF1")
        lines.append(f"| {off['family'].replace(' fp8', '')} ({off['weight_dtype'].replace('float', 'fp').replace('bfp', 'bf')}) | "
                     f"{off['pixels']}² | {'VAE' if off['decoder'] == 'vae' else tiny} | {off['weights_gb']:.1f} | "
                     f"{off['saved_gb']:.1f} / {on['saved_gb']:.1f} | {off['peak_gb']:.1f} / {on['peak_gb']:.1f} | "
                     f"{cards(off)} / {cards(on)} | {_estimate(off)} / {_estimate(on)} |")
    return "\n".join(lines)


def _estimate(row) -> str:
    """The pack's reservation for the activations, marked where it is below the counted transient peak."""
    if "plan_estimate_gb" not in row:
        return "–"
    return f"{row['plan_estimate_gb']:.1f}" + ("" if row["plan_estimate_covers"] else " (below)")


def _pick(rows, family, decoder, lowmem):
    return next(r for r in rows if r["family"] == family and r["decoder"] == decoder and r["low_memory"] == lowmem)


def targets(rows: list) -> dict:
    out = {}
    for key, fam, limit in (("sdxl_1024_taesd_low_memory_le_12gb", "SDXL", 12),
                            ("flux_dev_fp8_1024_low_memory_le_24gb", "Flux-dev fp8", 24)):
        decoder = "taesd"
        r = _pick(rows, fam, decoder, True)
        out[key] = {"peak_gb": r["peak_gb"], "limit_gb": limit, "met": r["peak_gb"] <= limit,
                    "over_by_gb": max(0.0, r["peak_gb"] - limit), "weights_gb": r["weights_gb"],
                    "activations_gb": r["peak_gb"] - r["weights_gb"]}
        rv = _pick(rows, fam, "vae", True)
        out[key]["with_vae_peak_gb"] = rv["peak_gb"]
    return out


def _boot(comfyui: str):
    from headless.host import Host
    return Host(comfyui, tempfile.mkdtemp(prefix="ug-bench-memory-"), cpu=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI)
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--no-check", action="store_true", help="skip the 256² check on real CPU tensors")
    parser.add_argument("--check-pixels", type=int, default=256)
    args = parser.parse_args(argv)
    _boot(args.comfyui)
    import comfy.model_management as mm
    old_free = mm.get_free_memory
    big = 1 << 40
    mm.get_free_memory = lambda dev=None, torch_free_too=False: (big, big) if torch_free_too else big
    rows = []
    try:
        for fam, dec, lm in ROWS:
            if fam not in args.families.split(","):
                continue
            r = count_row(fam, dec, lm)
            rows.append(r)
            print(f"{fam:14s} {dec:5s} low_memory={'on ' if lm else 'off'} weights {r['weights_gb']:6.2f} GB  "
                  f"saved {r['saved_gb']:6.2f} GB  peak {r['peak_gb']:6.2f} GB  ({r['count_seconds']} s)", flush=True)
        checks = []
        if not args.no_check:
            for lm in (False, True):
                c = cpu_check(args.check_pixels, "vae", lm)
                checks.append(c)
                print(f"check SD1.5 {c['pixels']}² fp32 low_memory={lm}: meta {c['meta_transient_peak_gb']:.3f} GB, "
                      f"real (same counter) {c['real_transient_peak_gb']:.3f} GB, profiler allocator "
                      f"{c['profiler_allocator_peak_gb']:.3f} GB", flush=True)
    finally:
        mm.get_free_memory = old_free
    result = {"what": "one image-guided iteration (denoiser fwd+bwd to the latent, decoder fwd+bwd), GB = 1e9 B",
              "torch": torch.__version__, "comfyui": args.comfyui, "rows": rows,
              "targets": targets(rows) if {"SDXL", "Flux-dev fp8"} <= {r["family"] for r in rows} else None,
              "cpu_check": checks}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "memory.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(table(rows))
    if result["targets"]:
        for k, v in result["targets"].items():
            print(f"{k}: peak {v['peak_gb']:.2f} GB ≤ {v['limit_gb']}: {'met' if v['met'] else 'NOT met'}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
