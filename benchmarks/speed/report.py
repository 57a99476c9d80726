"""The per-mode benchmark's result for people: the text table it prints and the bar chart it writes
(``speed_<pixels>.png``: per mode, the measured iteration beside the stacked sum of its parts; the memory runs'
peaks)."""
from __future__ import annotations

import os

from benchmarks.speed.tools import finite


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
        if finite(r.get("iteration_peak_mb")):
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
            f"{k} {v:.2f}" for k, v in est.items() if finite(v)))
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
    return f"{v:>{width}.{digits}f}" if finite(v) else f"{'—':>{width}}"


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
                 for n, r in (mem.get("timing_run") or {}).items() if finite(r.get("iteration_peak_mb"))]
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
    vmax = max([r[1] for r in rows if finite(r[1])] + [sum(v for _, v in r[2] if finite(v)) for r in rows] + [1e-9])
    scale = (panel_w - 20) / vmax
    x0 = label_w + pad
    for i, (name, measured, parts) in enumerate(rows):
        y = top + i * row_h
        if i % 2:
            d.rectangle([0, y, width, y + row_h], fill=(246, 246, 246))
        d.text((pad, y + 12), name, fill="black", font=f)
        cx = x0
        for key, v in parts:
            if finite(v):
                w = max(1, int(v * scale))
                d.rectangle([cx, y + 6, cx + w, y + 22], fill=colour(key))
                cx += w
        if finite(measured):
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


