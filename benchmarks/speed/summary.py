"""The per-mode benchmark's result from its raw samples: medians per part and per mode, overhead ratios (iteration ÷
the sum of its parts), the TAESD and backward-step speedups, what ``low_memory`` cuts and costs (``memory_summary``),
FLOPs per mode and per recipe (``benchmarks/flops.py``), and the targets each is held to (``TARGETS``)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from benchmarks.speed.modes import Mode, backward_step_parts
from benchmarks.speed.tools import finite, median, ratio


def summarize(raw: dict, *, memory: dict, flops: Optional[dict], config: dict) -> dict:
    """The result: per part and per mode medians, overhead ratios, speedups, memory, FLOPs and the targets."""
    batch, cfg_on = config["batch"], config["cfg"] != 1.0
    parts = {}
    tf = _part_tflop(flops, batch, cfg_on, raw.get("guidance_tflop")) if flops else {}
    for key, samples in raw["parts"].items():
        wall = median([s[0] for s in samples])
        cpu = median([s[1] for s in samples])
        entry = {"s": wall, "cpu_s": cpu, "samples": len(samples)}
        base = key.split("+")[0]
        if base in tf and tf[base] is not None:
            entry["tflop"] = tf[base]
            if "+low_memory" not in key:
                entry["tflop_per_cpu_s"] = ratio(tf[base], cpu)
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
        it, it_cpu = median([s[0] for s in samples]), median([s[1] for s in samples])
        keys = mode.parts()
        entry = {"jacobian": mode.jacobian, "decoder": mode.decoder, "cfg_branch": mode.branch if mode.jacobian
                 else None, "low_memory": mode.low_memory, "iteration_s": it, "iteration_cpu_s": it_cpu,
                 "parts": keys, "parts_sum_s": sum_parts(keys, "s"), "parts_sum_cpu_s": sum_parts(keys, "cpu_s"),
                 "samples": len(samples), "setup_s": median(r["setup_s"]), "peak_rss_mb": r["peak_rss_mb"]}
        entry["overhead_ratio"] = ratio(it, entry["parts_sum_s"])
        entry["overhead_ratio_cpu"] = ratio(it_cpu, entry["parts_sum_cpu_s"])
        if flops:
            entry["tflop"] = _mode_tflop(flops, mode, batch, cfg_on, raw.get("guidance_tflop"))
        modes[name] = entry

    plain = raw["runs"].get("plain", {}).get("iteration", [])
    result = {"parts": parts, "modes": modes, "modes_not_measured": missing,
              "plain_step_s": median([s[0] for s in plain]), "plain_step_cpu_s": median([s[1] for s in plain])}
    result["plain_step_overhead_ratio"] = ratio(result["plain_step_s"], parts.get("unet_fwd", {}).get("s"))

    # backward-guidance steps (taken by the no-Jacobian runs), per decoder
    steps = {}
    for name in modes:
        mode = Mode.parse(name)
        bs = raw["runs"][name]["backward_steps"]
        if mode.jacobian or not bs:
            continue
        keys = backward_step_parts(mode.decoder, mode.low_memory)
        e = {"s": median([s[0] for s in bs]), "cpu_s": median([s[1] for s in bs]), "samples": len(bs),
             "from_mode": name, "parts": keys, "parts_sum_s": sum_parts(keys, "s"),
             "parts_sum_cpu_s": sum_parts(keys, "cpu_s")}
        e["overhead_ratio"] = ratio(e["s"], e["parts_sum_s"])
        e["overhead_ratio_cpu"] = ratio(e["cpu_s"], e["parts_sum_cpu_s"])
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
                "wall": ratio(e["iteration_s"], modes[twin]["iteration_s"]),
                "cpu": ratio(e["iteration_cpu_s"], modes[twin]["iteration_cpu_s"])}
    head = next((k for k in ("jacobian/combined", "jacobian/combined/low_memory") if k in by_mode), None)
    result["taesd_speedup"] = by_mode[head]["wall"] if head else float("nan")
    result["taesd_speedup_cpu"] = by_mode[head]["cpu"] if head else float("nan")
    result["taesd_speedup_mode"] = head
    result["taesd_speedup_by_mode"] = by_mode
    if "vae" in steps and "taesd" in steps:
        result["backward_step_speedup"] = ratio(steps["vae"]["s"], steps["taesd"]["s"])
        result["backward_step_speedup_cpu"] = ratio(steps["vae"]["cpu_s"], steps["taesd"]["cpu_s"])
        result["backward_step_speedup_parts"] = ratio(steps["vae"]["parts_sum_cpu_s"],
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
    if not vals or not all(finite(v) for v in vals):
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
        if finite(r.get("peak_rss_mb")) and finite(r.get("rss_start_mb")):
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
             "iteration_peak_cut": 1.0 - ratio(on["iteration_peak_mb"], r["iteration_peak_mb"]),
             "process_peak_cut": 1.0 - ratio(on["peak_rss_mb"], r["peak_rss_mb"]),
             "time_ratio": ratio(on["iteration_s"], r["iteration_s"]),
             "time_ratio_cpu": ratio(on["iteration_cpu_s"], r["iteration_cpu_s"])}
        if finite(r.get("peak_cuda_mb")) and finite(on.get("peak_cuda_mb")):
            e["cuda_peak_mb"] = [r["peak_cuda_mb"], on["peak_cuda_mb"]]
            e["cuda_peak_cut"] = 1.0 - ratio(on["peak_cuda_mb"], r["peak_cuda_mb"])
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
        if int(lat) != latent or mode.low_memory or r.get("fit") or not lm or not finite(lm.get("iteration_peak_mb")):
            continue
        # the iteration without low_memory needed more than the limit less where it started (its own start when
        # it got that far, else the timing run's)
        above = limit_mb - (r.get("rss_start_mb") or lm["rss_start_mb"])
        bounds[name] = {"low_memory_from": "a fresh child" if lm is child else "the timing run (a warm process: "
                                                                          "understates)",
                        "low_memory_iteration_peak_mb": lm["iteration_peak_mb"],
                        "without_low_memory_iteration_peak_above_mb": above,
                        "iteration_peak_cut_at_least": 1.0 - ratio(lm["iteration_peak_mb"], above),
                        "low_memory_process_peak_mb": lm["peak_rss_mb"],
                        "process_peak_cut_at_least": 1.0 - ratio(lm["peak_rss_mb"], limit_mb)}
    out["low_memory_bounds_at_main_latent"] = bounds
    return out


