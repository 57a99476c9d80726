"""The counts checked against real tensors: full-size SD1.5 at a small size in fp32 on the CPU (``cpu_check``: the
same counter on real tensors, and the CPU allocator's record), and every row run for real on a device with random
full-size weights (``device_row``; on CUDA, ``torch.cuda.max_memory_allocated``: ``make bench-gpu``).
"""
from __future__ import annotations

import contextlib
import time

import torch

from benchmarks.memory.counter import (GB, count, memory_efficient_attention, module_tensors, profiler_peak,
                                       wrapped_blocks)
from benchmarks.memory.families import (FAMILIES, build_decoder, build_denoiser, count_row, inputs, iteration_fn,
                                        low_memory_targets)


def cpu_check(pixels: int = 256, decoder_kind: str = "vae", lowmem: bool = False) -> dict:
    """Full-size SD1.5 (UNet + decoder) at ``pixels``² in fp32: counted on meta, then run for real on the CPU with
    random weights under the same counter and under the profiler's allocator record."""
    fam = dict(FAMILIES["SD1.5"], dtype=torch.float32, vae_dtype=torch.float32)
    meta = count_row("SD1.5", decoder_kind, lowmem, pixels=pixels, family=fam)
    model_config, base = build_denoiser(fam, "meta")
    unet = base.diffusion_model
    dec, decode = build_decoder(decoder_kind, fam["ch"], "meta", torch.float32)
    unet, dec = unet.to_empty(device="cpu"), dec.to_empty(device="cpu")
    _random_fill([unet, dec])
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


def _random_fill(modules, seed: int = 0):
    """Random weights (N(0, 0.02²), cast to each tensor's dtype: fp8 too), filled tensor by tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module_tensors(*modules):
            if t.is_floating_point():
                t.copy_((torch.randn(t.shape, generator=gen) * 0.02).to(t.dtype))


def device_row(name: str, decoder_kind: str, lowmem: bool, device: str, pixels=None) -> dict:
    """The row's iteration run for real on ``device`` with random full-size weights: the counted figures of the
    same run (the counter on real tensors) and, on CUDA, the allocator's own ``max_memory_allocated`` above what
    was allocated before the iteration (weights and inputs), plus the weights."""
    family = FAMILIES[name]
    pixels = pixels or family["pixels"]
    model_config, base = build_denoiser(family, "meta")
    unet = base.diffusion_model.to_empty(device=device)
    dec, decode = build_decoder(decoder_kind, family["ch"], "meta", family.get("vae_dtype"))
    dec = dec.to_empty(device=device)
    _random_fill([unet, dec])
    fn = iteration_fn(model_config, unet, family, decode)
    ins = inputs(family, pixels, device)
    targets = low_memory_targets(unet, dec) if lowmem else ()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    res = count(fn, ins, [unet, dec], checkpoint_modules=targets)
    out = {"family": name, "pixels": pixels, "decoder": decoder_kind, "low_memory": lowmem, "device": device,
           "counted_on_device": res, "seconds": round(time.time() - t0, 2)}
    if cuda:
        torch.cuda.synchronize()
        out["cuda_weights_and_inputs_gb"] = before / GB
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / GB
        out["cuda_transient_gb"] = (torch.cuda.max_memory_allocated() - before) / GB
        out["cuda_device"] = torch.cuda.get_device_name()
    del unet, dec
    if cuda:
        torch.cuda.empty_cache()
    return out
