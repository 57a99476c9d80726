"""The speed benchmarks (benchmarks/speed/) end to end on the session's ComfyUI host and the tiny checkpoint."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import CHECKPOINT

from benchmarks.speed import harness, iteration, terms


def test_speed_benchmark_writes_complete_json(host, tmp_path):
    config = harness.Config(latent=4, steps=2, repeats=1, warmup=1, part_repeats=1, threads=1)
    result = iteration.benchmark(host, CHECKPOINT, config, str(tmp_path), log=lambda *_: None)
    path = tmp_path / "speed.json"
    assert result["output"] == str(path)
    data = json.loads(path.read_text())

    assert iteration.problems(data) == {}
    for key in ("plain_step_s", "guided_iteration_s", "overhead_ratio", "backward_step_extra_s",
                "no_jacobian_iteration_s", "peak_rss_mb"):
        assert math.isfinite(data[key]) and data[key] > 0, (key, data[key])
    assert set(data["parts"]) == {"denoiser_fwd_bwd_s", "decoder_fwd_bwd_s", "guidance_fwd_bwd_s"}
    assert all(math.isfinite(v) and v > 0 for v in data["parts"].values()), data["parts"]
    assert (data["latent"], data["batch"], data["steps"], data["repeats"]) == (4, 1, 2, 1)
    assert data["cfg"] == config.cfg and data["checkpoint"] == CHECKPOINT
    assert data["machine"]["device"] and data["machine"]["torch"] and data["machine"]["cores"] >= 1
    assert os.path.isfile(os.path.join(data["comfyui"]["path"], "nodes.py"))
    # a guided iteration does a denoiser backward pass on top of a plain step's forward
    assert data["guided_iteration_s"] > data["plain_step_s"]
    # the denoiser's saved activations are counted (what the in-place guard copies on old hosts)
    assert data["extra"]["denoiser_saved_for_backward_mb"]["activations"] > 0
    assert "overhead ratio" in iteration.table(data)


def test_guidance_terms_are_pluggable_by_name():
    assert "image" in terms.TERMS
    try:
        @terms.register_term("test-constant")
        def _constant(g, size, batch, gen):
            return lambda image: image.mean(dim=(1, 2, 3))

        assert terms.TERMS["test-constant"] is _constant
    finally:
        terms.TERMS.pop("test-constant", None)


@pytest.mark.parametrize("name", sorted(terms.TERMS))
def test_registered_guidance_terms_build_and_differentiate(host, name):
    """Every term the benchmark can plug in by name builds offline (random weights) and has an input gradient."""
    if name == "clip":
        pytest.importorskip("open_clip")
    g = harness.pack_module("guidance")
    loss_fn = terms.TERMS[name](g, 32, 1, torch.Generator().manual_seed(0))
    if callable(getattr(loss_fn, "prepare", None)):
        loss_fn.prepare(torch.device("cpu"), None)
    with torch.inference_mode(False), torch.enable_grad():
        image = torch.rand(1, 3, 32, 32, requires_grad=True)
        loss = loss_fn(image)
        (grad,) = torch.autograd.grad(loss.sum(), image)
    assert loss.shape == (1,) and torch.isfinite(loss).all()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# ------------------------------------------------------------------------- every mode (python -m benchmarks.speed_modes)
from benchmarks.speed import orchestrate, report, summary  # noqa: E402
from benchmarks.speed.measure import ModeBench  # noqa: E402
from benchmarks.speed.modes import Mode, default_modes  # noqa: E402


@pytest.fixture(scope="module")
def taesd_dir(host):
    import random_networks as rn
    folder = host.model_dir("vae_approx")
    if not os.path.exists(os.path.join(folder, "taesd_decoder.safetensors")):
        rn.write_taesd(folder, "taesd", seed=0)
    return folder


def test_mode_names_round_trip_and_list_their_parts():
    modes = default_modes()
    assert len(modes) == 8 and len({m.name for m in modes}) == 8
    for m in modes + [m.with_low_memory() for m in modes]:
        assert Mode.parse(m.name) == m
    assert Mode.parse("jacobian/taesd/uncond").parts() == [
        "unet_fwd_bwd_uncond", "taesd_decoder_fwd_bwd", "guidance_fwd_bwd"]
    assert Mode.parse("no_jacobian/vae/low_memory").parts() == [
        "unet_fwd", "vae_decoder_fwd_bwd+low_memory", "guidance_fwd_bwd"]
    with pytest.raises(ValueError):
        Mode(False, "vae", "cond")


def test_every_mode_is_timed_in_process_with_its_parts(host, taesd_dir):
    """The in-process timing of the 512² benchmark at a tiny latent: every mode and part, backward steps timed on
    their own, the whole-image comparison, and the summary's ratios and targets."""
    config = harness.Config(latent=2, steps=1, threads=1)
    bench = ModeBench(host, CHECKPOINT, config, log=lambda *_: None, backward_steps=2)
    modes = default_modes()
    raw = bench.time_modes(modes + [Mode(True, "taesd", "cond", True)], repeats=1)
    assert set(raw["runs"]) == {"plain"} | {m.name for m in modes} | {"jacobian/taesd/cond/low_memory"}
    assert "unet_fwd_bwd_cond+low_memory" in raw["parts"] and "taesd_decoder_fwd_bwd+low_memory" in raw["parts"]
    assert len(raw["runs"]["no_jacobian/vae"]["backward_steps"]) == 2
    assert len(raw["runs"]["jacobian/vae/combined"]["backward_steps"]) == 0
    assert raw["runs"]["jacobian/vae/combined"]["peak_rss_mb"] > 0
    result = summary.summarize(raw, memory={}, flops=None, config={"batch": 1, "cfg": config.cfg})
    for name, e in result["modes"].items():
        assert e["iteration_s"] > 0 and e["parts_sum_s"] > 0 and math.isfinite(e["overhead_ratio"]), name
    assert set(result["backward_step"]) == {"vae", "taesd"}
    assert result["taesd_speedup"] > 0 and result["backward_step_speedup"] > 0
    assert result["targets"]["low_memory_peak_cut"]["met"] is None  # no memory children here
    e2e = bench.end_to_end(steps=2, recurrence=2, repeats=1, warmup_steps=1)
    assert set(e2e["seconds_per_image"]) == {"plain", "guided/vae", "guided/taesd"}
    assert e2e["guided_iterations"] == 3 and all(v > 0 for v in e2e["ratio_to_plain"].values())


def test_speed_modes_end_to_end_writes_json_chart_and_memory(host, taesd_dir, tmp_path):
    """The whole command at a tiny latent: a memory child, the timing child (with the FLOP count),
    speed_<pixels>.json and the chart."""
    from headless.host import default_comfyui_path
    ckpt = os.path.join(os.path.dirname(host.folder_paths.get_full_path("checkpoints", CHECKPOINT)), CHECKPOINT)
    args = orchestrate.build_parser().parse_args([
        "--latent", "2", "--warmup-latent", "0", "--threads", "1", "--out", str(tmp_path),
        "--checkpoint", ckpt, "--taesd-dir", taesd_dir, "--comfyui", default_comfyui_path(),
        "--modes", "jacobian/vae/combined,jacobian/taesd/combined,no_jacobian/vae,no_jacobian/taesd",
        "--memory-runs", "2:jacobian/vae/combined/low_memory"])
    result = orchestrate.orchestrate(args, log=lambda *_: None)
    data = json.loads((tmp_path / "speed_16.json").read_text())
    assert result["output"] == str(tmp_path / "speed_16.json") and (tmp_path / "speed_16.png").stat().st_size > 0
    assert set(data["modes"]) == set(args.modes.split(","))
    run = data["memory"]["runs"]["2:jacobian/vae/combined/low_memory"]
    assert run["fit"] is True and run["peak_rss_mb"] >= run["rss_start_mb"] > 0 and run["iteration_s"] > 0
    assert data["flops"]["unet_fwd_bwd_b2"] > data["flops"]["unet_fwd_b2"] > 0
    assert data["modes"]["jacobian/vae/combined"]["tflop"] > data["modes"]["jacobian/taesd/combined"]["tflop"]
    assert data["recipes_tflop"] and data["machine"]["cpu"] and data["load_average"]["samples"] >= 1
    assert set(data["targets"]) == set(summary.TARGETS)
    assert "overhead" in report.table(data)


def test_watchdog_kills_a_child_over_its_limit(tmp_path):
    res = orchestrate.run_child(["--child", "memory", "--mode", "jacobian/vae/combined", "--result",
                                 str(tmp_path / "r.json"), "--checkpoint", "/nonexistent"],
                                str(tmp_path / "r.json"), limit_bytes=50 * 2 ** 20, reserve_bytes=0,
                                log_path=str(tmp_path / "log"))
    assert not res.ok and res.data is None
    assert "limit" in res.reason or "did not fit" in res.reason


def test_memory_summary_measures_pairs_and_bounds_what_did_not_fit():
    def rec(peak, start, t, fit=True):
        return {"fit": fit, "latent": 0, "peak_rss_mb": peak, "rss_start_mb": start, "iteration_peak_mb": peak - start,
                "iteration_s": t, "iteration_cpu_s": t}
    runs = {"64:jacobian/vae/combined": {"fit": False, "latent": 64, "reason": "killed"},
            "32:jacobian/vae/combined": rec(14000, 8000, 10.0),
            "32:jacobian/vae/combined/low_memory": rec(10000, 8000, 13.0)}
    timing = {"jacobian/vae/combined/low_memory": {"peak_rss_mb": 14000, "rss_start_mb": 8000}}
    mem = summary.memory_summary(runs, timing, latent=64, limit_mb=16000)
    assert mem["did_not_fit"] == ["64:jacobian/vae/combined"]
    lm = mem["low_memory"]
    assert lm["pixels"] == 256 and lm["iteration_peak_cut"] == pytest.approx(2 / 3) and lm["time_ratio"] == 1.3
    bound = mem["low_memory_bounds_at_main_latent"]["jacobian/vae/combined"]
    assert bound["iteration_peak_cut_at_least"] == pytest.approx(1 - 6000 / 8000)
    t = summary.targets({"modes": {}, "backward_step": {}, "taesd_speedup": 2.5, "taesd_speedup_cpu": 2.4,
                             "memory": mem})
    assert t["low_memory_peak_cut"]["met"] is True and t["low_memory_time_ratio"]["met"] is True
    assert t["taesd_speedup"]["met"] is True and t["overhead_ratio_max"]["met"] is None
