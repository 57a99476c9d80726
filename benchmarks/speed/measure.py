"""Guided iterations timed per mode, with their parts, in one ComfyUI process (the timing child of
``python -m benchmarks.speed_modes``), and whole images against the stock KSampler (``--end-to-end``).

Models: the checkpoint of the run (by default the random-weight full-size SD1.5 one, UNet 860 M parameters, SD VAE)
and a random-weight full-size TAESD in the real file format, loaded by the stock ``VAELoader`` from
``models/vae_approx`` (random weights cost what trained ones cost).

* per part, timed on its own with the sampler's own tensors (``HostBench.probe``): UNet forward (the CFG batch),
  UNet forward+backward (combined, and each CFG branch with the other under no_grad), VAE / TAESD decoder
  forward+backward, guidance terms forward+backward;
* per mode, one guided iteration of the pack's sampler (``steps`` iterations per run; forward guidance, k = 1,
  m = 0); the no-Jacobian runs also take ``backward_steps`` backward-guidance steps, each timed on its own.

Each round runs every part once and then every mode once (the order reversed on odd rounds), so that load changes
on a shared machine hit all of them alike.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import torch

from benchmarks.speed.harness import Config, HostBench, pack_module
from benchmarks.speed.modes import Mode, backward_step_parts
from benchmarks.speed.tools import (MB, ROOT, median, ratio, reset_peak_rss, status_bytes, sync,
                                    torch_threads)

TAESD_NAME = "taesd"
TAESD_CACHE = os.path.join(ROOT, "out", "bench-models", "vae_approx")


def ensure_taesd(folder: str = TAESD_CACHE, name: str = TAESD_NAME) -> str:
    """A random full-size TAESD (encoder + decoder, the pair the stock VAELoader lists) in ``folder``, written once
    by ``tests/random_networks.write_taesd`` (needs ComfyUI importable: boot the host first)."""
    if all(os.path.exists(os.path.join(folder, f"{name}_{p}.safetensors")) for p in ("encoder", "decoder")):
        return folder
    tests_dir = os.path.join(ROOT, "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    import random_networks
    tmp = folder + ".part"
    os.makedirs(tmp, exist_ok=True)
    random_networks.write_taesd(tmp, name)
    os.makedirs(folder, exist_ok=True)
    for p in ("encoder", "decoder"):
        os.replace(os.path.join(tmp, f"{name}_{p}.safetensors"), os.path.join(folder, f"{name}_{p}.safetensors"))
    os.rmdir(tmp)
    return folder


class ModeBench(HostBench):
    """Guided iterations per mode and their parts, on a booted host (the checkpoint and ``taesd`` loadable by
    name)."""

    def __init__(self, host, checkpoint: str, config: Config, taesd: str = TAESD_NAME, log=print,
                 backward_steps: int = 1, normal_weights: bool = False):
        super().__init__(host, checkpoint, config, log=log)
        # normal_weights: load outside inference mode, so that no run needs the trainable copies of the stock
        # loaders' inference-tensor weights (+3.6 GB for SD1.5 in fp32); the compute is the same
        self.load_in_inference_mode = not normal_weights
        self.taesd_name = taesd
        self.backward_steps = backward_steps
        self.guided_calls = pack_module("nodes.guided_calls")

    def load(self):
        import gc

        import nodes
        super().load()
        with torch.inference_mode() if self.load_in_inference_mode else torch.no_grad():  # as the executor does
            self.taesd = nodes.VAELoader().load_vae(self.taesd_name)[0]
        self.vaes = {"vae": self.vae, "taesd": self.taesd}
        # The prompts are encoded: drop the text encoder (~0.5 GB in fp32 on a CPU), as ComfyUI does when it needs
        # the memory, so that the sampler's own memory has room on a small machine.
        self.clip = None
        gc.collect()
        if hasattr(self.mm, "cleanup_models"):
            try:
                self.mm.cleanup_models()
            except TypeError:
                self.mm.cleanup_models(keep_clone_weights_loaded=False)
        gc.collect()

    def latent_of(self, size: int) -> dict:
        import nodes
        if size == self.cfg.latent:
            return self.latent
        with torch.inference_mode():
            return nodes.EmptyLatentImage().generate(size * 8, size * 8, self.cfg.batch)[0]

    def mode_settings(self, mode: Optional[Mode]):
        """Forward guidance, k = 1; ``None``: guidance off (a plain step). No-Jacobian runs add backward steps."""
        if mode is None:
            return self.g.Settings(forward_strength=0.0)
        return self.g.Settings(forward_strength=self.cfg.forward_strength, recurrence=1, jacobian=mode.jacobian,
                               backward_steps=0 if mode.jacobian else self.backward_steps)

    def mode_options(self, mode: Mode):
        return self.bridge.RunOptions(guidance_vae=self.taesd if mode.decoder == "taesd" else None,
                                      cfg_branch=mode.branch, low_memory=mode.low_memory)

    def run_guided(self, mode: Optional[Mode], *, steps: Optional[int] = None, latent: Optional[dict] = None):
        """One run; its ``peak_rss`` is the kernel's exact high-water mark of the run where it can be reset (Linux),
        else the polled peak."""
        exact = reset_peak_rss()
        if mode is None:
            t = self.run_sampler(self.mode_settings(None), steps=steps, name="plain", latent=latent)
        else:
            t = self.run_sampler(self.mode_settings(mode), self.mode_options(mode), steps=steps, latent=latent,
                                 check="grad" if mode.jacobian else "decode", name=mode.name)
        if exact:
            t.peak_rss = status_bytes("VmHWM")
        return t

    # ---- parts
    def part_keys(self, modes: list) -> list:
        keys = ["unet_fwd"]
        for m in modes:
            keys += m.parts()
            if not m.jacobian and self.backward_steps:
                keys += backward_step_parts(m.decoder, m.low_memory)
        return list(dict.fromkeys(keys))

    def _low_memory_targets(self, ctx):
        unet = getattr(ctx.base, "diffusion_model", None)
        weights = pack_module("nodes.autograd_weights")
        inplace = weights._host_has_inplace_residual() or weights._model_has_inplace_residual(ctx.base)
        targets = self.guided_calls.checkpoint_targets(unet, None, inplace)
        for vae in self.vaes.values():
            targets += self.guided_calls.checkpoint_targets(None, vae.first_stage_model, inplace)
        return targets

    def measure_mode_parts(self, keys: list, *, calls: int = 1, warmup: bool = True,
                           latent: Optional[dict] = None) -> dict:
        """``{key: [(wall_s, cpu_s), ...]}`` for the part keys (``+low_memory`` ones timed with checkpointing)."""
        out = {}
        for low in (False, True):
            mine = [k for k in keys if k.endswith("+low_memory") == low]
            if not mine:
                continue
            got = self.probe(lambda ctx: (self._mode_part_fns(ctx, mine), None), vaes=list(self.vaes.values()),
                             calls=calls, warmup=warmup, latent=latent,
                             low_memory=self._low_memory_targets if low else None)
            out.update({k: got[k] for k in mine})
        return out

    def _mode_part_fns(self, ctx, keys: list) -> dict:
        gen = torch.Generator().manual_seed(self.cfg.seed + 2)
        x, guidance = ctx.x, self.guidance
        with torch.no_grad():
            x0 = ctx.denoise(x).detach()
        cot_x0 = torch.randn(x0.shape, generator=gen).to(x0)
        images, cots = {}, {}
        for name, vae in self.vaes.items():
            with torch.no_grad():
                images[name] = ctx.decoder(vae)(x0).detach()
            cots[name] = torch.randn(images[name].shape, generator=gen).to(images[name])
        branch_options = {b: self.guided_calls.with_branch(ctx.extra_args.get("model_options", {}), b)
                          for b in ("cond", "uncond")}

        def unet_fwd():
            with torch.no_grad():
                ctx.denoise(x)

        def unet_fwd_bwd(options=None):
            def run():
                with torch.enable_grad():
                    leaf = x.detach().requires_grad_(True)
                    torch.autograd.grad(ctx.denoise(leaf, options), leaf, grad_outputs=cot_x0)
            return run

        def decoder_fwd_bwd(name):
            decode = ctx.decoder(self.vaes[name])

            def run():
                with torch.enable_grad():
                    leaf = x0.detach().requires_grad_(True)
                    torch.autograd.grad(decode(leaf), leaf, grad_outputs=cots[name])
            return run

        def decoder_fwd(name):
            decode = ctx.decoder(self.vaes[name])

            def run():
                with torch.no_grad():
                    decode(x0)
            return run

        def guidance_fwd_bwd():
            with torch.enable_grad():
                leaf = images["vae"].detach().requires_grad_(True)
                loss = guidance(leaf, 0.5)
                if loss.requires_grad:
                    torch.autograd.grad(loss.sum(), leaf)

        fns = {"unet_fwd": unet_fwd, "unet_fwd_bwd": unet_fwd_bwd(),
               "unet_fwd_bwd_cond": unet_fwd_bwd(branch_options["cond"]),
               "unet_fwd_bwd_uncond": unet_fwd_bwd(branch_options["uncond"]),
               "vae_decoder_fwd_bwd": decoder_fwd_bwd("vae"), "taesd_decoder_fwd_bwd": decoder_fwd_bwd("taesd"),
               "vae_decoder_fwd": decoder_fwd("vae"), "taesd_decoder_fwd": decoder_fwd("taesd"),
               "guidance_fwd_bwd": guidance_fwd_bwd}
        out = {}
        for key in keys:
            base = key[:-len("+low_memory")] if key.endswith("+low_memory") else key
            if base not in fns:
                raise ValueError(f"unknown part {key!r}")
            out[key] = fns[base]
        return out

    def guidance_tflop(self) -> float:
        """FLOPs of the guidance terms' forward+backward (input gradient) on an image of the run's size."""
        from torch.utils.flop_counter import FlopCounterMode
        size = self.cfg.latent * 8
        with torch.inference_mode(False):
            self.guidance.reset()
            self.guidance.prepare(self.device)
            image = torch.rand(self.cfg.batch, 3, size, size, device=self.device, requires_grad=True)
            with FlopCounterMode(display=False) as counter, torch.enable_grad():
                loss = self.guidance(image, 0.5)
                if loss.requires_grad:
                    torch.autograd.grad(loss.sum(), image)
        return counter.get_total_flops() / 1e12

    def dtypes(self) -> dict:
        def first(module):
            p = next(iter(module.parameters()), None)
            return str(p.dtype) if p is not None else None
        return {"unet": self.unet_dtype, "vae": str(getattr(self.vae, "vae_dtype", first(self.vae.first_stage_model))),
                "taesd": str(getattr(self.taesd, "vae_dtype", first(self.taesd.first_stage_model)))}

    # ---- rounds
    def time_modes(self, modes: list, *, repeats: int, warmup_latent: Optional[int] = None,
                   part_extra: tuple = (), on_round=None) -> dict:
        """Interleaved rounds of every mode (and a plain step) and every part; raw samples per mode and part."""
        with torch_threads(self.cfg.threads):
            return self._time_modes(modes, repeats=repeats, warmup_latent=warmup_latent, part_extra=part_extra,
                                    on_round=on_round)

    def _time_modes(self, modes, *, repeats, warmup_latent, part_extra, on_round):
        if not getattr(self, "_loaded", False):
            self.load()
        keys = self.part_keys(modes) + [k for k in part_extra if k not in self.part_keys(modes)]
        # the hungriest runs (the VAE with the Jacobian) last, so that a run killed for memory loses the least
        order = [None] + sorted(modes, key=lambda m: m.jacobian and m.decoder == "vae")
        if warmup_latent:
            self.log(f"warm-up at latent {warmup_latent} ...")
            small = self.latent_of(warmup_latent)
            for mode in order:
                self.run_guided(mode, steps=1, latent=small)
            self.measure_mode_parts(keys, warmup=False, latent=small)
        runs = {("plain" if m is None else m.name): [] for m in order}
        parts = {k: [] for k in keys}

        def save(done):
            if on_round is not None:
                on_round(self.raw(modes, runs, parts, done))

        for r in range(repeats):
            # a round: every part, then every mode (reversed on odd rounds); the raw samples saved after each
            part_keys = keys if r % 2 == 0 else keys[::-1]
            t0 = time.perf_counter()
            got = self.measure_mode_parts(part_keys, warmup=False)
            for k in keys:
                parts[k] += got[k]
            self.log(f"  round {r + 1}/{repeats}: parts: {time.perf_counter() - t0:.1f} s")
            save(r)
            for mode in (order if r % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                runs["plain" if mode is None else mode.name].append(self.run_guided(mode))
                self.log(f"  round {r + 1}/{repeats}: {'plain' if mode is None else mode.name}: "
                         f"{time.perf_counter() - t0:.1f} s")
                save(r)
            save(r + 1)
        return self.raw(modes, runs, parts, repeats)

    def raw(self, modes, runs, parts, repeats) -> dict:
        def run_samples(ts):
            return {"iteration": [[w, c] for t in ts for w, c in zip(t.intervals, t.cpu_intervals)],
                    "before_backward": [list(v) for t in ts for v in t.before_backward],
                    "backward_steps": [list(v) for t in ts for v in t.backward_steps],
                    "setup_s": [t.setup_s for t in ts],
                    "peak_rss_mb": max((t.peak_rss for t in ts), default=0) / MB,
                    "rss_start_mb": median([t.rss_start for t in ts]) / MB if ts else float("nan"),
                    "rss_before_mb": median([t.rss_before for t in ts]) / MB if ts else float("nan"),
                    "peak_cuda_mb": max((t.peak_cuda for t in ts), default=0) / MB}
        return {"modes": [m.name for m in modes], "repeats_done": repeats,
                "runs": {name: run_samples(ts) for name, ts in runs.items()},
                "parts": {k: [list(v) for v in vs] for k, vs in parts.items()}}

    # ---- whole images (GPU figure)
    def end_to_end(self, *, steps: int = 50, recurrence: int = 2, window=(0.5, 1.0), repeats: int = 3,
                   decoders=("vae", "taesd"), warmup_steps: int = 2) -> dict:
        """Seconds per image: the Universal KSampler node (image guidance, k = ``recurrence`` in the
        ``window``) and the stock KSampler (``ddim``), same model, prompt, steps, cfg and scheduler, each followed by
        the stock VAE Decode; medians of ``repeats`` interleaved runs after one short warm-up run of each."""
        import nodes
        sampler_nodes = pack_module("nodes.sampler_nodes")
        cfg = self.cfg
        knobs = {k: spec[1]["default"] for k, spec in sampler_nodes.GUIDANCE_KNOBS.items()}
        knobs.update(recurrence=recurrence, start_percent=window[0], end_percent=window[1],
                     forward_strength=cfg.forward_strength)

        def decode(latent):
            return nodes.VAEDecode().decode(self.vae, latent)[0]

        def plain(n):
            return decode(nodes.KSampler().sample(self.model, cfg.seed, n, cfg.cfg, "ddim", cfg.scheduler,
                                                  self.positive, self.negative, self.latent)[0])

        def guided(n, decoder):
            extra = {"guidance_vae": self.taesd} if decoder == "taesd" else {}
            node = sampler_nodes.UniversalGuidanceKSampler()
            out = node.sample(self.model, self.positive, self.negative, self.latent, self.vae, self.guidance,
                              cfg.seed, n, cfg.cfg, cfg.scheduler, 1.0, **knobs, **extra)[0]
            return decode(out)

        with torch_threads(self.cfg.threads):
            return self._end_to_end(plain, guided, steps, recurrence, window, repeats, decoders, warmup_steps)

    def _end_to_end(self, plain, guided, steps, recurrence, window, repeats, decoders, warmup_steps):
        jobs = {"plain": lambda n: plain(n)}
        for d in decoders:
            jobs[f"guided/{d}"] = (lambda dd: (lambda n: guided(n, dd)))(d)
        times = {k: [] for k in jobs}
        with torch.inference_mode():
            for fn in jobs.values():
                fn(warmup_steps)
            for r in range(repeats):
                for k, fn in (jobs.items() if r % 2 == 0 else list(jobs.items())[::-1]):
                    sync(self.device)
                    t0 = time.perf_counter()
                    image = fn(steps)
                    sync(self.device)
                    times[k].append(time.perf_counter() - t0)
                    if not torch.isfinite(image).all():
                        raise RuntimeError(f"end-to-end {k}: non-finite image")
                    self.log(f"  end-to-end {k}: {times[k][-1]:.2f} s")
        med = {k: median(v) for k, v in times.items()}
        guided_iterations = sum(recurrence if window[0] <= i / steps < window[1] else 1 for i in range(steps))
        return {"steps": steps, "recurrence": recurrence, "window": list(window), "repeats": repeats,
                "guided_iterations": guided_iterations, "includes_final_vae_decode": True,
                "plain_sampler": "stock KSampler, ddim", "seconds_per_image": med,
                "ratio_to_plain": {k: ratio(v, med["plain"]) for k, v in med.items() if k != "plain"},
                "samples_s": times}

