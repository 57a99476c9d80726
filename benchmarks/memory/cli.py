"""The command ``python -m benchmarks.memory``: every row (family × decoder × ``low_memory`` off/on) counted on the
meta device, the CPU check, ``memory.json`` and the table of docs/performance-and-memory.md; with ``--device``, the rows run for real there
(``memory_<device>.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from benchmarks.memory.families import FAMILIES, ROOT, count_row
from benchmarks.memory.real import cpu_check, device_row

DEFAULT_COMFYUI = os.path.join(os.environ.get("TMPDIR", "/tmp"), "universal-guidance-hosts", "comfyui-0.3.64")
ROWS = [(f, d, lm) for f in FAMILIES for d in ("vae", "taesd") for lm in (False, True)]


def device_table(rows: list) -> str:
    lines = ["| model | size | decoder | low_memory | counted peak GB | CUDA max_memory_allocated GB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['pixels']}² | {r['decoder']} | {'on' if r['low_memory'] else 'off'} | "
                     f"{r['counted_on_device']['peak_gb']:.2f} | "
                     f"{r.get('cuda_max_allocated_gb', float('nan')):.2f} |")
    return "\n".join(lines)


def table(rows: list) -> str:
    """The table of docs/performance-and-memory.md: one line per model × decoder, ``low_memory`` off and on side by side."""
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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI)
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--no-check", action="store_true", help="skip the 256² check on real CPU tensors")
    parser.add_argument("--check-pixels", type=int, default=256)
    parser.add_argument("--device", default=None,
                        help="measure the rows for real on this device (cuda: max_memory_allocated) instead of "
                             "counting them on the meta device; writes memory_<device>.json")
    parser.add_argument("--pixels", type=int, default=None, help="with --device: one size for every row")
    args = parser.parse_args(argv)
    _boot(args.comfyui)
    if args.device:
        return _measure_on_device(args)
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


def _measure_on_device(args) -> int:
    rows = []
    for fam, dec, lm in ROWS:
        if fam not in args.families.split(","):
            continue
        try:
            r = device_row(fam, dec, lm, args.device, args.pixels)
        except torch.cuda.OutOfMemoryError as e:  # noqa: PERF203 - a row that does not fit is a result too
            r = {"family": fam, "decoder": dec, "low_memory": lm, "device": args.device, "error": str(e)[:200]}
            torch.cuda.empty_cache()
        rows.append(r)
        print(json.dumps(r)[:400], flush=True)
    result = {"what": "one image-guided iteration measured on a device (random full-size weights), GB = 1e9 B",
              "torch": torch.__version__, "comfyui": args.comfyui, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"memory_{torch.device(args.device).type}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(device_table([r for r in rows if "error" not in r]))
    print(f"wrote {path}")
    return 0
