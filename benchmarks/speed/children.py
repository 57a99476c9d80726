"""The two kinds of child process of ``python -m benchmarks.speed_modes`` (``--child memory|timing``), each a
ComfyUI of its own that writes its result to ``--result`` (JSON) for the parent (``benchmarks.speed.orchestrate``):

* ``memory``: one sampler run of one mode; its peak resident memory (the kernel's high-water mark, reset when the
  sampler is called; on CUDA ``torch.cuda.max_memory_allocated``) and iteration time. Where the iteration starts, a
  partial result is written first, so that a child killed for memory still says where it started from.
* ``timing``: the interleaved timing rounds (the raw samples written after every round, so that a run stopped
  early keeps what it measured), the FLOP counts, the memory autograd saves (counted on the meta device), and
  with ``--end-to-end`` whole images.
"""
from __future__ import annotations

import torch

from benchmarks.speed.harness import Config, boot_host, pack_module
from benchmarks.speed.measure import ModeBench
from benchmarks.speed.modes import Mode
from benchmarks.speed.tools import GB, MB, comfyui_info, interrupt_hook, median, status_bytes, write_json


def _bench(args, log, **kwargs) -> ModeBench:
    """The child's ``ModeBench`` on a ComfyUI booted for it, models loaded (torch threads set for the whole child)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    host, ckpt = boot_host(args.comfyui, args.checkpoint, cpu=args.device == "cpu", vae_approx=args.taesd_dir)
    config = Config(latent=args.latent, batch=args.batch, cfg=args.cfg, steps=args.steps, repeats=args.repeats,
                    warmup=0, guidance=args.guidance, threads=args.threads)
    bench = ModeBench(host, ckpt, config, taesd=args.taesd, log=log, **kwargs)
    bench.load()
    return bench


def child_memory(args) -> int:
    """One sampler run of ``args.mode`` (``--steps`` iterations, m = 0): its peak memory and iteration time."""
    bench = _bench(args, log=lambda *a: None, backward_steps=0)
    mode = Mode.parse(args.mode)
    result = {"mode": mode.name, "latent": args.latent, "threads": torch.get_num_threads(), "dtypes": bench.dtypes(),
              "rss_loaded_mb": status_bytes("VmRSS") / MB}

    def at_start():  # written once at the first iteration's start: kept if the run is killed for memory
        if "rss_start_mb" not in result:
            result["rss_start_mb"] = status_bytes("VmRSS") / MB
            write_json(args.result, {**result, "partial": True})

    with interrupt_hook(at_start):
        timing = bench.run_guided(mode)  # resets the high-water mark first: its peak_rss is this run's
    result.update({
        "peak_rss_mb": timing.peak_rss / MB,
        "rss_before_mb": timing.rss_before / MB,
        "rss_start_mb": timing.rss_start / MB,
        "iteration_s": median(timing.intervals),
        "iteration_cpu_s": median(timing.cpu_intervals),
        "setup_s": timing.setup_s,
    })
    result["iteration_peak_mb"] = result["peak_rss_mb"] - result["rss_start_mb"]
    if bench.device.type == "cuda":
        result["peak_cuda_mb"] = timing.peak_cuda / MB
    write_json(args.result, result)
    return 0


def saved_activations_gb(latent: int, batch: int = 1, cfg_on: bool = True) -> dict:
    """GB that autograd keeps for the backward pass of one guided iteration, counted on the meta device (no compute):
    the UNet (CFG batch; on hosts whose transformer block adds its residual in place, every saved activation copied
    by the bridge's guard, once per saving op, as it does) and each decoder, without and with ``low_memory``'s
    checkpointing (what stays saved; the recomputation inside one block comes on top). An estimate for sizes whose
    runs do not fit."""
    import comfy.model_management as mm
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.taesd import taesd

    from headless.random_models import FULL_SD15_UNET, VAE_DDCONFIG
    guided_calls = pack_module("nodes.guided_calls")
    inplace = pack_module("nodes.autograd_weights")._host_has_inplace_residual()
    big = 1 << 40

    def count(fn, inp, per_save: bool):
        total, seen = [0], set()

        def pack(t):
            if t.requires_grad and not isinstance(t, torch.nn.Parameter):
                key = id(t._base if t._base is not None else t)
                if per_save or key not in seen:
                    seen.add(key)
                    total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda p: p), torch.enable_grad():
            fn(inp.detach().requires_grad_(True))
        return total[0] / GB

    old_free = mm.get_free_memory
    mm.get_free_memory = lambda dev=None, torch_free_too=False: (big, big) if torch_free_too else big
    try:
        with torch.device("meta"):
            unet = UNetModel(**FULL_SD15_UNET, operations=comfy.ops.disable_weight_init).requires_grad_(False)
            vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4).requires_grad_(False)
            tiny = taesd.TAESD().requires_grad_(False) if hasattr(taesd, "TAESD") else None
            b = batch * (2 if cfg_on else 1)
            x, t, ctx = torch.empty(b, 4, latent, latent), torch.empty(b), torch.empty(b, 77, 768)
            z = torch.empty(batch, 4, latent, latent)
        nets = {"unet": (lambda leaf: unet(leaf, timesteps=t, context=ctx), x, inplace, unet, None),
                "vae_decoder": (lambda leaf: vae.decode(leaf), z, False, None, vae)}
        if tiny is not None:
            nets["taesd_decoder"] = (lambda leaf: tiny.decode(leaf), z, False, None, tiny)
        out = {"guard_copies_per_save": inplace}
        for name, (fn, inp, per_save, u, v) in nets.items():
            out[name] = count(fn, inp, per_save)
            with guided_calls.low_memory(guided_calls.checkpoint_targets(u, v, inplace)):
                out[name + "+low_memory"] = count(fn, inp, per_save)
        return out
    finally:
        mm.get_free_memory = old_free


def child_timing(args) -> int:
    """The interleaved timing rounds (writing the raw samples after every round), FLOPs, end-to-end."""
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    bench = _bench(args, log=log, backward_steps=args.backward_steps, normal_weights=not args.inference_weights)
    modes = [Mode.parse(n) for n in args.modes.split(",")]
    out = {"threads": torch.get_num_threads(), "unet_parameters": bench.unet_params, "dtypes": bench.dtypes(),
           "weights_loaded_in_inference_mode": bench.load_in_inference_mode,
           "comfyui": comfyui_info(bench.host.path), "device": str(bench.device)}
    if bench.device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(bench.device)
    try:
        out["guidance_tflop"] = bench.guidance_tflop()
    except Exception as e:  # a term the counter cannot trace: no FLOP figure for it
        out["guidance_tflop"] = None
        out["guidance_tflop_error"] = repr(e)

    try:
        from benchmarks import flops as flop_model
        out["flops"] = flop_model.parts(args.latent)
    except Exception as e:  # no FLOP figures rather than no benchmark
        out["flops"] = None
        out["flops_error"] = repr(e)

    try:
        out["saved_activations_gb"] = saved_activations_gb(args.latent, args.batch, args.cfg != 1.0)
    except Exception as e:
        out["saved_activations_gb"] = None
        out["saved_activations_error"] = repr(e)

    def save(raw):
        write_json(args.result, {**out, **raw})

    raw = bench.time_modes(modes, repeats=args.repeats, warmup_latent=args.warmup_latent, on_round=save)
    out.update(raw)
    save(out)
    if args.end_to_end:
        log("end-to-end ...")
        out["end_to_end"] = bench.end_to_end(steps=args.e2e_steps, recurrence=args.e2e_recurrence,
                                             window=(args.e2e_start, args.e2e_end), repeats=args.e2e_repeats)
        save(out)
    return 0
