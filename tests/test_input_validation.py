"""Bad widget values are refused by ComfyUI's real validator with an error that names the node and the input, and a
value that only arrives when the node runs (from a linked node) is checked then, before any model work.

Each case here once ran: NaN weights, boxes and cfg succeeded with wrong images, NaN denoise / noise_level failed
deep inside with no node or input named, and a combo read by a node's own check ran with a value not in its list.
"""
from __future__ import annotations

import math

import pytest
import torch

import prompts
from conftest import CHECKPOINT
from headless.host import pack_module

SIZE = 32


def _validation_text(host, prompt) -> str:
    ok, error, outputs, node_errors = host.validate(prompt)
    assert not ok, "the prompt passed validation"
    return " | ".join(f"{nid}: {e.get('message')}: {e.get('details')}"
                      for nid, entry in node_errors.items() for e in entry.get("errors", []))


def _refusal_text(host, prompt) -> str:
    """The validation errors; where the prompt passes validation, the run's error. The 2024-03 host validates no
    node reached only through an optional input (UG Sampler Options): that node refuses bad values when it runs."""
    ok, error, outputs, node_errors = host.validate(prompt)
    if not ok:
        return " | ".join(f"{nid}: {e.get('message')}: {e.get('details')}"
                          for nid, entry in node_errors.items() for e in entry.get("errors", []))
    result = host.run(prompt)
    assert not result.success, "the prompt ran"
    return result.error()["exception_message"]


@pytest.fixture(scope="module")
def reference(host):
    import os

    import numpy as np
    from PIL import Image
    Image.fromarray(np.full((SIZE, SIZE, 3), 200, np.uint8)).save(os.path.join(host.workdir, "input", "ug_val.png"))
    return "ug_val.png"


# The samplers' expert knobs (inputs of UG Sampler Options; nodes/sampler_nodes.py EXPERT_KNOBS).
EXPERT = {
    "schedule", "backward_optimizer", "backward_early_stop", "jacobian", "smoothing", "smoothing_samples",
    "smoothing_reduction", "max_step", "guidance_vae", "cfg_branch", "low_memory"}


def guided(reference, **sampler):
    """The KSampler graph; expert knobs go on a connected UG Sampler Options node."""
    p = prompts.ksampler_guided(CHECKPOINT, reference, size=SIZE, steps=1)
    p["5"]["inputs"].update({k: v for k, v in sampler.items() if k not in EXPERT})
    expert = {k: v for k, v in sampler.items() if k in EXPERT}
    if expert:
        p["30"] = {"class_type": "UniversalGuidanceSamplerOptions", "inputs": expert}
        p["5"]["inputs"]["options"] = ["30", 0]
    return p


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_term_weight_is_refused_naming_node_and_input(host, reference, value):
    p = guided(reference)
    p["10"]["inputs"]["weight"] = value
    text = _validation_text(host, p)
    assert "UG Image Guidance" in text and "input 'weight'" in text, text


@pytest.mark.parametrize("name", ["cfg", "denoise", "forward_strength", "backward_lr", "max_step", "smoothing"])
def test_nan_sampler_values_are_refused_naming_node_and_input(host, reference, name):
    text = _refusal_text(host, guided(reference, **{name: math.nan}))
    node = "UG Sampler Options" if name in EXPERT else "Universal KSampler"
    assert node in text and f"input '{name}'" in text and "NaN" in text, text


def test_nan_or_infinite_box_coordinates_are_refused(host, reference):
    p = guided(reference)
    p["10"] = {"class_type": "UniversalGuidanceDetection", "inputs": {
        "boxes": "nan,4,20,20,person; 2,2,inf,20,dog", "coordinates": "pixels", "width": SIZE, "height": SIZE,
        "model": "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth", "box_regression": False, "detector_size": 64,
        "weight": 100.0, "start_percent": 0.0, "end_percent": 1.0}}
    text = _validation_text(host, p)
    assert "input 'boxes'" in text and "box 1" in text and "box 2" in text and "finite" in text, text


def test_combo_values_outside_their_lists_are_refused_where_the_node_checks_its_inputs(host, reference):
    p = guided(reference, strength_mode="bogus")
    p["10"] = {"class_type": "UniversalGuidanceDetection", "inputs": {
        "boxes": "2,2,20,20,person", "coordinates": "bogus", "width": SIZE, "height": SIZE,
        "model": "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth", "box_regression": False, "detector_size": 64,
        "weight": 100.0, "start_percent": 0.0, "end_percent": 1.0}}
    text = _validation_text(host, p)
    assert "input 'coordinates'" in text and "'bogus' is not one of its choices ('pixels', 'relative')" in text, text
    assert "input 'strength_mode'" in text, text
    p["10"] = {"class_type": "UniversalGuidanceSGMove", "inputs": {
        "clip": ["1", 1], "prompt": "a photo of a cat", "words": "cat", "layers": "all", "weight": 4.0,
        "start_percent": 0.0, "end_percent": 0.6, "mode": "bogus", "x": 0.2, "y": 0.5}}
    text = _validation_text(host, p)
    assert "input 'mode'" in text and "UG Move Object" in text, text
    assert "input 'strength_mode'" in text, text


def test_optional_inputs_are_checked_on_every_host(host, reference):
    """The 2024-03 host checks no optional input itself (a negative augment count and a NaN smoothing ran)."""
    p = guided(reference, strength_mode="bogus")
    p["10"]["inputs"]["augment"] = -3
    text = _validation_text(host, p)
    assert "input 'augment'" in text and "below its minimum 0" in text, text
    assert "input 'strength_mode'" in text, text


def test_attention_map_nan_noise_level_is_refused(host):
    p = prompts.base(CHECKPOINT, size=SIZE)
    p["10"] = {"class_type": "UniversalGuidanceAttentionMap", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "prompt": "a photo of a cat", "words": "cat", "layers": "all",
        "latent": ["4", 0], "noise_level": math.nan, "seed": 0}}
    p["11"] = {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}}
    text = _validation_text(host, p)
    assert "UG Attention Map" in text and "input 'noise_level'" in text, text


def test_values_that_arrive_when_the_node_runs_are_checked_before_any_work(host, reference):
    """A value from a linked node is not known at validation; the node checks it when called, before loading."""
    node = host.node_types["UniversalGuidanceImage"]()
    image = torch.zeros(1, SIZE, SIZE, 3)
    with torch.inference_mode(), pytest.raises(Exception) as info:
        node.build(image=image, loss="l2", weight=math.nan, start_percent=0.0, end_percent=1.0)
    assert "UG Image Guidance" in str(info.value) and "input 'weight'" in str(info.value)
    with torch.inference_mode(), pytest.raises(Exception) as info:
        node.build(image, "l3", 1.0, 0.0, 1.0)  # positional, as a script would call it
    assert "input 'loss'" in str(info.value)
    with torch.inference_mode(), pytest.raises(Exception) as info:
        node.build(image=image, loss="l2", weight=1.0, start_percent=0.0, end_percent=1.0, augment=None)
    assert "input 'augment'" in str(info.value) and "no value" in str(info.value)
    term = node.build(image=image, loss="l2", weight=1.0, start_percent=0.0, end_percent=1.0)[0]
    assert len(term.terms) == 1


def test_validate_inputs_names_every_widget_and_no_socket(host):
    """ComfyUI decides from the signature which values it passes (and which of its own checks it skips)."""
    import inspect
    validation = pack_module("nodes.validation")
    for name, cls in pack_module().NODE_CLASS_MAPPINGS.items():
        specs = validation.widget_specs(cls.INPUT_TYPES())
        args = inspect.getfullargspec(cls.VALIDATE_INPUTS).args
        assert set(args) == set(specs), (name, args, list(specs))


def test_an_old_workflow_architecture_that_needs_a_model_hub_is_told_why(host, reference, nets):
    """An architecture no longer listed (its tokenizer comes from a model hub) gets the reason, not a bare list."""
    import os
    p = guided(reference)
    p["10"] = {"class_type": "UniversalGuidanceCLIPText", "inputs": {
        "text": "a red apple", "clip_model": os.path.basename(nets["clip_vit"][1]), "architecture": "roberta-ViT-B-32",
        "cutouts": 0, "weight": 100.0, "start_percent": 0.0, "end_percent": 1.0}}
    text = _validation_text(host, p)
    assert "input 'architecture'" in text and "Hugging Face" in text, text
