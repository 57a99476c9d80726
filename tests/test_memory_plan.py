"""What a guided run tells ComfyUI it needs, and ``low_memory`` = ``auto`` (nodes/memory_plan.py).

Real executor, tiny SD1.5: the memory reserved with ``load_models_gpu`` before sampling covers the guided
iteration's backward pass (it grows with the batch and with the CFG batch, and is smaller with low_memory on), the
run's summary says whether low_memory was on and why, and a saved workflow of an earlier release (low_memory a
boolean) still validates and means the same. The estimate itself is checked against the counted memory of the
full-size architectures in ``make bench-memory`` (every row covered, printed in its table)."""
from __future__ import annotations

import logging
import os
import re
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import prompts
from conftest import CHECKPOINT
from test_precision import pack

SIZE = 32
REFERENCE = "ug_memory_ref.png"
LINE = re.compile(r"low_memory (auto → (on|off)|on|off): a guided iteration needs about ([\d.]+) GB for its "
                  r"backward pass without it, ([\d.]+) GB with it \(estimate\)")


@pytest.fixture(scope="module")
def reference(host):
    ref = np.zeros((SIZE, SIZE, 3), np.uint8)
    ref[:, : SIZE // 2] = 255
    Image.fromarray(ref, "RGB").save(os.path.join(host.workdir, "input", REFERENCE))


@pytest.fixture
def reserved(monkeypatch):
    """The ``memory_required`` of every ``load_models_gpu`` call the run's setup makes (the call goes through; the
    host's own calls, e.g. for text encoding, are not recorded)."""
    import comfy.model_management as mm
    seen = []
    bridge_mm = pack("run_setup").mm
    load = bridge_mm.load_models_gpu

    def spy(models, memory_required=0, *args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__", "").endswith("run_setup"):
            seen.append(memory_required)
        return load(models, memory_required, *args, **kwargs)

    monkeypatch.setattr(bridge_mm, "load_models_gpu", spy)
    assert bridge_mm is mm
    return seen


def run(host, caplog, seed, **knobs):
    p = prompts.ksampler_guided(CHECKPOINT, REFERENCE, size=SIZE, steps=1, seed=seed, save=False,
                                knobs=knobs.pop("knobs", {}), extra=knobs.pop("extra", None))
    for key, value in knobs.items():
        p["4"]["inputs"][key] = value
    p["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "latents/memory"}}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="universal_guidance"):
        result = host.run(p)
    err = result.error()
    assert result.success, err and (err["exception_message"], err["traceback"][-4:]) or result.messages
    lines = [m for r in caplog.records if r.name == "universal_guidance" for m in [LINE.search(r.getMessage())] if m]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    return lines[0]


def test_reservation_covers_the_backward_pass_and_auto_says_which(host, reference, reserved, caplog):
    import comfy.model_management as mm
    plan = pack("memory_plan")
    line = run(host, caplog, 1)  # the default: auto
    assert line.group(1) == "auto → off", line.group(0)  # a tiny model on a CPU with GBs free
    need_off, need_on = float(line.group(3)), float(line.group(4))
    assert 0 < need_on < need_off
    # auto loads for the low-memory need and then checks the rest fits in what is free
    assert len(reserved) == 1 and reserved[0] / plan.GB == pytest.approx(need_on, abs=0.006)

    reserved.clear()
    line = run(host, caplog, 2, extra={"low_memory": "off"})
    assert line.group(1) == "off" and reserved[0] / plan.GB == pytest.approx(need_off, abs=0.006)
    one = reserved[0]

    # the batch counts (ComfyUI's decode estimate leaves it out): twice the latents, twice the need
    reserved.clear()
    run(host, caplog, 3, extra={"low_memory": "off"}, batch_size=2)
    assert reserved[0] == pytest.approx(2 * one, rel=1e-6)

    # an earlier release's workflow: low_memory was a boolean; it validates and means on / off
    line = run(host, caplog, 4, extra={"low_memory": True})
    assert line.group(1) == "on"
    line = run(host, caplog, 5, extra={"low_memory": False})
    assert line.group(1) == "off"
    assert mm.get_free_memory(mm.get_torch_device()) / plan.GB > need_off


def test_auto_turns_low_memory_on_where_the_run_would_not_fit(host, reference, caplog, monkeypatch):
    """The decision reads the device's free memory from ComfyUI after loading: with less free than the run
    needs without recomputation, auto recomputes (the same model, the same latent)."""
    monkeypatch.setattr(pack("run_setup"), "free_memory", lambda device: 1024.0)
    line = run(host, caplog, 6)
    assert line.group(1) == "auto → on", line.group(0)


def test_an_unknown_value_is_refused_at_validation(host, reference):
    p = prompts.ksampler_guided(CHECKPOINT, REFERENCE, size=SIZE, steps=1, extra={"low_memory": "yes"})
    result = host.run(p)
    assert not result.success
    assert "low_memory" in str(result.messages)


def test_plan_rules(host):
    plan = pack("memory_plan")
    assert [plan.normalize_mode(v) for v in (True, False, "auto", "on", "off")] == ["on", "off", "auto", "on", "off"]
    with pytest.raises(ValueError):
        plan.normalize_mode(1)
    p = plan.Plan("auto", False, need_off=10e9, need_on=2e9, networks=1e9)
    assert plan.decide(p, 12e9).low_memory is False and p.reserve == 11e9
    assert plan.decide(p, 10.5e9).low_memory is True and p.reserve == 3e9
    forced = plan.Plan("off", False, need_off=10e9, need_on=2e9)
    assert plan.decide(forced, 1.0).low_memory is False  # the user's choice stands
    assert "auto → on" in plan.decide(p, 1.0).line("cuda:0")


def test_the_estimate_follows_the_family_and_the_weights_dtype(host):
    plan = pack("memory_plan")
    SDXL = type("SDXL", (), {})
    sdxl = SDXL()
    sdxl.memory_usage_factor, sdxl.manual_cast_dtype = 0.8, None
    sdxl.get_dtype = lambda: torch.float16
    off, on = plan.denoiser_bytes(sdxl, (1, 4, 128, 128), 2)
    inference = 2 * 128 * 128 * 2 * 0.01 * 0.8 * 2**20
    assert off == pytest.approx(24 * inference) and on == pytest.approx(3.5 * inference)
    Unknown = type("Unknown", (), {})
    other = Unknown()
    other.get_dtype = lambda: torch.float16
    assert plan.denoiser_bytes(other, (1, 4, 128, 128), 2)[0] > off  # a family never counted: the largest ratio
    # fp8 weights computed in bf16 (cast per layer): the cast weights are kept without low_memory
    Flux = type("Flux", (), {})
    flux = Flux()
    flux.manual_cast_dtype = torch.bfloat16
    flux.diffusion_model = torch.nn.Linear(1000, 1000).to(torch.float8_e4m3fn)
    off8, on8 = plan.denoiser_bytes(flux, (1, 16, 8, 8), 1)
    flux.manual_cast_dtype = None
    flux.get_dtype = lambda: torch.bfloat16
    flux.diffusion_model = torch.nn.Linear(1000, 1000).to(torch.bfloat16)
    off16, on16 = plan.denoiser_bytes(flux, (1, 16, 8, 8), 1)
    assert off8 - off16 == pytest.approx(0.75 * (1000 * 1000 + 1000) * 2) and on8 == on16


def test_guidance_networks_are_found_and_released(host):
    plan = pack("memory_plan")
    net, inner = torch.nn.Linear(4, 4), torch.nn.Linear(2, 2)
    clip_like = types.SimpleNamespace(encoder=types.SimpleNamespace(model=net), scale=2.0)
    face_like = types.SimpleNamespace(model=inner, detector=None)
    guidance = types.SimpleNamespace(terms=(types.SimpleNamespace(loss=clip_like), types.SimpleNamespace(
        loss=types.SimpleNamespace(loss=face_like)), types.SimpleNamespace(loss=types.SimpleNamespace(model=net))))
    found = plan.network_modules(guidance)
    assert len(found) == 2 and found[0] is net and found[1] is inner
    assert plan.networks_bytes(guidance, "cpu") == 0
    assert plan.networks_bytes(guidance, "meta") == (4 * 4 + 4 + 2 * 2 + 2) * 4
    plan.release_networks(guidance, "meta")
    assert net.weight.device.type == "meta" and inner.weight.device.type == "meta"
