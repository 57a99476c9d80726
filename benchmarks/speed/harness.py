"""The pack's sampler run inside a booted ComfyUI, timed: what both speed benchmarks measure with.

``HostBench`` loads a checkpoint with the stock loaders (as the executor runs them), builds the guidance terms
(``benchmarks.speed.terms``), and then

* ``run_sampler``: one run of the pack's sampler through ``comfy.sample.sample_custom`` (what the Universal
  KSampler does), timed per iteration from timestamps inside the run: the engine calls its ``interrupt`` check at
  the start of every iteration (and of every backward-guidance step) and reports progress at its end. The time from
  the first check to the first progress update, and between two progress updates, is one whole iteration with
  everything the sampler does per step; the one-off set-up of a run (weights made trainable, models loaded) comes
  before the first check and is reported separately (``RunTiming.setup_s``);
* ``probe``: functions timed on their own with the sampler's own tensors, inside a probe SAMPLER that ComfyUI calls
  exactly like the pack's and set up exactly as ``nodes/comfy_bridge.py`` sets up a run (the parts of an
  iteration: denoiser, decoder, guidance terms).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from benchmarks.speed.terms import TERMS
from benchmarks.speed.tools import ROOT, PeakMemory, interrupt_hook, progress_hook, sync
from headless.host import Host
from headless.host import pack_module  # noqa: F401  (the pack's modules as ComfyUI loaded them: the nodes' copy)

BENCH_CHECKPOINT = "ug-bench-sd15-full-v2-fp16.safetensors"  # bump the version when random_models changes
MODEL_CACHE = os.path.join(ROOT, "out", "bench-models", "checkpoints")
NODE = "Universal Guidance speed benchmark"


@dataclass
class Config:
    latent: int = 8          # latent side (pixels = 8×)
    batch: int = 1
    cfg: float = 7.5         # ≠ 1: the denoiser runs on the cond and uncond batch, as with the paper's settings
    steps: int = 4           # sampler steps per run (each one timed)
    repeats: int = 5
    warmup: int = 1          # whole warm-up rounds (every mode once) before measuring
    part_repeats: Optional[int] = None  # calls of each part per repeat (default: 1)
    guidance: tuple = ("image",)  # term names (benchmarks.speed.terms), or one comma-separated string
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
        if isinstance(self.guidance, str):
            self.guidance = tuple(t for t in self.guidance.split(",") if t)
        self.guidance = tuple(self.guidance)


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


def boot_host(comfyui: str, checkpoint: str, *, cpu: bool, workdir: Optional[str] = None, **model_dirs):
    """ComfyUI booted in ``workdir`` (default: a new temporary folder) with the folder of the ``checkpoint`` file
    and ``model_dirs`` (``{kind: folder}``) among its model folders: ``(host, the checkpoint's name)``."""
    ckpt_dir, ckpt = os.path.split(os.path.abspath(checkpoint))
    host = Host(comfyui, workdir or tempfile.mkdtemp(prefix="ug-bench-"), cpu=cpu,
                extra_model_dirs={"checkpoints": ckpt_dir, **model_dirs})
    return host, ckpt


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


class HostBench:
    """Timed runs of the pack's sampler on an existing ``Host`` and a checkpoint the host can load by name."""

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
                sync(self.device)
                marks["end"] = time.perf_counter()

        stamps, checks = [], []

        def on_progress(value, total, *_, **__):
            sync(self.device)
            stamps.append((time.perf_counter(), time.process_time()))

        def on_check():
            sync(self.device)
            if not checks:
                marks["rss_start"] = proc.memory_info().rss
            checks.append((time.perf_counter(), time.process_time(), len(stamps)))

        with progress_hook(on_progress), interrupt_hook(on_check), PeakMemory(self.device) as mem:
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
        largest of them needs (``run_setup.load_together`` with ``memory_plan``'s estimate, low_memory off)."""
        package = self.bridge.__name__.rsplit(".", 1)[0]
        plan = importlib.import_module(package + ".memory_plan")
        setup = importlib.import_module(package + ".run_setup")
        patchers = [p for p in [setup._model_patcher_of(base)] + [getattr(v, "patcher", None) for v in vaes]
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
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                sync(device)
                samples[k].append((time.perf_counter() - t0, time.process_time() - c0))
        return samples

