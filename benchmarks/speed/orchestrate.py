"""What a guided iteration costs in every mode, at the real size (512², ``--latent 64``), in the real ComfyUI: the
command ``python -m benchmarks.speed_modes``, which runs the measurements in child processes under a memory watchdog
and writes ``speed_<pixels>[_<device>].json`` and ``.png``.

1. Memory: one child per ``"<latent>:<mode>"`` (``memory_specs``): the peak resident memory of one guided iteration
   with and without ``low_memory``. A parent watchdog (``run_child``) kills a child whose resident memory passes
   ``--mem-limit-gb`` (default: the memory available at start minus ``--reserve-gb``, so other processes keep that
   much) or when the machine's available memory falls below half the reserve; such a mode is recorded as not
   fitting, and the timing run then uses ``low_memory`` for every mode (flagged in the JSON).
2. Timing: one child runs every mode and part in interleaved rounds (``benchmarks.speed.measure``), counts FLOPs
   and, with ``--end-to-end``, times whole images.
3. The result: ``benchmarks.speed.summary`` (medians, ratios, speedups, targets) and ``benchmarks.speed.report``
   (the printed table, the chart). The load average is sampled during the run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch

from benchmarks.speed.children import child_memory, child_timing
from benchmarks.speed.harness import BENCH_CHECKPOINT, MODEL_CACHE
from benchmarks.speed.measure import TAESD_CACHE, TAESD_NAME
from benchmarks.speed.modes import Mode, default_modes
from benchmarks.speed.report import chart, table
from benchmarks.speed.summary import memory_summary, recipes, summarize
from benchmarks.speed.tools import (GB, MB, NO_COMFYUI, ROOT, LoadSampler, default_threads, machine_info,
                                    write_json)


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
    machine = machine_info(torch.device("cpu"))
    threads = default_threads(args.threads, args.device == "cpu")
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
    write_json(stem + ".json", result)
    return result


def build_parser() -> argparse.ArgumentParser:
    from headless.host import default_comfyui_path
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed_modes", description=__doc__.split("\n\n")[0])
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
    ap.add_argument("--guidance", default="image", help="comma-separated guidance terms (benchmarks/speed/terms.py)")
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
    ap.add_argument("--checkpoint", default=os.path.join(MODEL_CACHE, BENCH_CHECKPOINT),
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
    default_ckpt = os.path.abspath(args.checkpoint) == os.path.abspath(os.path.join(MODEL_CACHE,
                                                                                   BENCH_CHECKPOINT))
    if not os.path.exists(args.checkpoint) and not default_ckpt:
        raise SystemExit(f"no checkpoint at {args.checkpoint}")
    code = ("import sys,tempfile; sys.path.insert(0, %r); from headless.host import Host; "
            "Host(%r, tempfile.mkdtemp(prefix='ug-models-')); from benchmarks.speed import harness, measure; "
            "%s measure.ensure_taesd(%r, %r)" % (
                ROOT, args.comfyui, "harness.ensure_bench_checkpoint();" if default_ckpt else "",
                args.taesd_dir, args.taesd))
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.comfyui:
        raise SystemExit(NO_COMFYUI)
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

