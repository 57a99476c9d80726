"""The samplers' expert knobs on a 'UG Sampler Options' node, in a real ComfyUI: the node's values reach the run,
unconnected means the defaults, and a prompt of an earlier release that sets those knobs on the sampler itself
still means the same (checked with the options node's rules; both at once is refused)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

import prompts
from conftest import CHECKPOINT
from headless.host import pack_module
from test_guided_patches import image_of
from test_precision import run_error, run_ok

SIZE = 32
EXPERT = {"backward_optimizer": "sgd", "jacobian": False}
DAILY = {"backward_steps": 1, "backward_lr": 0.5}


@pytest.fixture(scope="module")
def reference(host):
    ref = np.zeros((SIZE, SIZE, 3), np.uint8)
    ref[:, : SIZE // 2] = 255
    Image.fromarray(ref).save(os.path.join(host.workdir, "input", "ug_opts.png"))
    return "ug_opts.png"


def ksampler(reference, seed, expert=None, options=None):
    """The KSampler graph; ``expert``: knobs set on the sampler itself (an earlier release's layout);
    ``options``: knobs on a connected options node."""
    p = prompts.ksampler_guided(CHECKPOINT, reference, size=SIZE, steps=2, seed=seed, knobs=dict(DAILY))
    p["5"]["inputs"].update(expert or {})
    if options is not None:
        p["30"] = {"class_type": "UniversalGuidanceSamplerOptions", "inputs": dict(options)}
        p["5"]["inputs"]["options"] = ["30", 0]
    return p


def test_options_node_and_old_direct_values_mean_the_same(host, reference):
    """The same knobs on an options node and on the sampler itself (a prompt of an earlier release) give the same
    image, bit for bit; the defaults (nothing connected, and an options node left at its defaults) another."""
    with_node = image_of(host, run_ok(host, ksampler(reference, 11, options=EXPERT)))
    direct = image_of(host, run_ok(host, ksampler(reference, 11, expert=EXPERT)))
    default = image_of(host, run_ok(host, ksampler(reference, 11)))
    node_defaults = image_of(host, run_ok(host, ksampler(reference, 11, options={})))
    assert np.array_equal(with_node, direct)
    assert np.array_equal(default, node_defaults)
    assert np.abs(with_node - default).max() > 1e-3


def test_options_node_and_direct_values_together_are_refused(host, reference):
    text = run_error(host, ksampler(reference, 12, expert={"max_step": 5.0}, options=EXPERT))
    assert "Universal KSampler" in text and "'options'" in text and "'max_step'" in text, text


@pytest.mark.parametrize("name, value, said", [("cfg_branch", "neither", "not one of its choices"),
                                                ("smoothing", float("nan"), "NaN")])
def test_bad_old_direct_values_are_refused_at_run_naming_node_and_input(host, reference, name, value, said):
    text = run_error(host, ksampler(reference, 13, expert={name: value}))
    assert "Universal KSampler" in text and f"input '{name}'" in text and said in text, text
    assert "UG Sampler Options" in text, text


def test_bad_options_values_are_refused_naming_node_and_inputs(host, reference):
    """Refused by ComfyUI's validator; the 2024-03 host validates no node that is reached only through an optional
    input, so there the options node refuses them when it runs, before the sampler starts."""
    p = ksampler(reference, 14, options={"cfg_branch": "neither", "max_step": float("nan")})
    ok, _, _, node_errors = host.validate(p)
    text = " | ".join(f"{e.get('message')}: {e.get('details')}" for entry in node_errors.values()
                      for e in entry.get("errors", []))
    if ok:
        text = run_error(host, p)
    assert "UG Sampler Options" in text and "input 'cfg_branch'" in text and "input 'max_step'" in text, text


def test_old_boolean_low_memory_set_on_the_sampler_still_runs(host, reference):
    """low_memory was a BOOLEAN on the sampler: true means 'on' (same gradient, recomputed activations)."""
    on = image_of(host, run_ok(host, ksampler(reference, 15, expert={"low_memory": True})))
    off = image_of(host, run_ok(host, ksampler(reference, 15, options={"low_memory": "off"})))
    assert np.abs(on - off).max() <= 2 / 255


def test_samplercustom_sampler_takes_options_and_refuses_both(host, reference):
    p = prompts.samplercustom_guided(CHECKPOINT, reference, size=SIZE, steps=2, seed=16, knobs=dict(DAILY))
    p["30"] = {"class_type": "UniversalGuidanceSamplerOptions", "inputs": dict(EXPERT)}
    p["20"]["inputs"]["options"] = ["30", 0]
    with_node = image_of(host, run_ok(host, p))
    direct = prompts.samplercustom_guided(CHECKPOINT, reference, size=SIZE, steps=2, seed=16,
                                          knobs={**DAILY, **EXPERT})
    assert np.array_equal(with_node, image_of(host, run_ok(host, direct)))
    p["20"]["inputs"]["jacobian"] = True
    text = run_error(host, p)
    assert "Guidance Sampler (Universal)" in text and "'jacobian'" in text and "'options'" in text, text


def test_the_old_layout_tables_agree(host):
    """headless/ui_to_api.py reads old files' widget values by the order the samplers had them."""
    from headless import ui_to_api
    sampler_nodes = pack_module("nodes.sampler_nodes")
    for node_type in ("UniversalGuidanceKSampler", "UniversalGuidanceSampler"):
        assert list(ui_to_api.LEGACY_WIDGETS[node_type]) == sampler_nodes.LEGACY_LAYOUT
