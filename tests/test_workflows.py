"""The example workflows (example_workflows/*.json, UI format) against the live node definitions of the test host:
they convert to API format, their links connect matching types, ComfyUI's own validator accepts them, and they
are what workflows/build.py writes. Also: the UI → API converter on Reroute/PrimitiveNode/muted/bypassed nodes,
and corrupted workflows fail."""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import sys

import pytest

import workflow_files as wfiles
from headless import nodeinfo
from headless.runner import CORE_NODES_ADDED
from headless.ui_to_api import UnknownNodeTypes, api_link_check, is_api_format, ui_to_api

NAMES = [os.path.basename(p) for p in wfiles.WORKFLOWS]


@pytest.fixture(scope="module")
def info(host):
    wfiles.write_reference(os.path.join(host.workdir, "input"))
    return nodeinfo.object_info()


@pytest.fixture(scope="module")
def build_module():
    spec = importlib.util.spec_from_file_location("ug_workflows_build", os.path.join(wfiles.BUILD_DIR,
                                                                                     "build.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def skip_if_host_lacks(workflow: dict, info: dict):
    missing = sorted({n["type"] for n in workflow["nodes"]} - set(info) - set(nodeinfo.VIRTUAL_NODES))
    if missing:
        core = [m for m in missing if m in CORE_NODES_ADDED]
        why = (f"core ComfyUI nodes added in {max(CORE_NODES_ADDED[m] for m in core)}" if core == missing
               else "node types of other packs")
        pytest.skip(f"this ComfyUI has no {', '.join(missing)} ({why}); run with COMFYUI_PATH=<newer ComfyUI>")


def test_there_are_workflows():
    assert {"image.json", "samplercustom.json", "samplercustom_advanced.json"} <= {wfiles.key_of(p) for p in
                                                                                   wfiles.WORKFLOWS}


@pytest.mark.parametrize("name", ["image_workflow_v0.1.json", "samplercustom_workflow_v0.1.json"])
def test_workflows_saved_by_the_previous_release_still_load(name, host, info):
    """Files saved before the samplers gained inputs and the KSampler its report output (tests/data holds the
    first release's image.json and samplercustom.json): they convert, the new inputs take their defaults, and
    ComfyUI's validator accepts them. The expert knobs that file stores after the daily ones (since moved to UG
    Sampler Options) are passed on to the sampler, which reads them."""
    wf = wfiles.load(os.path.join(os.path.dirname(__file__), "data", name))
    warnings = []
    prompt = ui_to_api(wf, info, warnings=warnings)
    sampler = prompt["20" if "samplercustom" in name else "5"]["inputs"]
    assert {k: sampler[k] for k in ("schedule", "backward_optimizer", "backward_early_stop", "jacobian")} == {
        "schedule": "constant", "backward_optimizer": "adam", "backward_early_stop": 0.0, "jacobian": True}
    # max_step, cfg_branch, low_memory did not exist then: the sampler's defaults apply (low_memory 'auto' keeps
    # the gradient the same; it only decides, from the free memory, whether activations are recomputed).
    assert "max_step" not in sampler and "low_memory" not in sampler and "options" not in sampler
    assert not any("ignored" in w for w in warnings), warnings
    wfiles.substitute_files_api(prompt)
    ok, error, _, node_errors = host.validate(prompt)
    assert ok, (error, node_errors)


def test_workflow_with_the_expert_knobs_on_the_sampler_means_the_same(host, info):
    """A file saved before the expert knobs moved to UG Sampler Options (23 widget values on the KSampler, the
    expert ones set away from their defaults) runs as the same graph with an options node holding those values:
    the same image, bit for bit."""
    wf = wfiles.load(os.path.join(os.path.dirname(__file__), "data", "image_workflow_before_options.json"))
    warnings = []
    old = wfiles.substitute_files_api(ui_to_api(wf, info, warnings=warnings))
    assert not any("ignored" in w for w in warnings), warnings
    expert = {"schedule": "linear", "backward_optimizer": "sgd", "backward_early_stop": 0.05, "jacobian": False,
              "smoothing": 0.1, "smoothing_samples": 4, "smoothing_reduction": "logmeanexp", "max_step": 5.0,
              "cfg_branch": "cond", "low_memory": "on"}
    assert {k: old["5"]["inputs"][k] for k in expert} == expert
    old["5"]["inputs"].update(steps=2, backward_steps=1)
    old["4"]["inputs"].update(width=64, height=64)
    new = copy.deepcopy(old)
    for k in expert:
        del new["5"]["inputs"][k]
    new["40"] = {"class_type": "UniversalGuidanceSamplerOptions", "inputs": dict(expert)}
    new["5"]["inputs"]["options"] = ["40", 0]
    plain = copy.deepcopy(new)
    del plain["40"], plain["5"]["inputs"]["options"]

    def image(prompt):
        result = host.run(prompt)
        err = result.error()
        assert result.success, err and err["exception_message"]
        out = result.outputs["7"]["images"][0]
        from PIL import Image  # the PNG's bytes hold the prompt too: compare the pixels
        return Image.open(os.path.join(host.workdir, "output", out.get("subfolder", ""), out["filename"])).tobytes()

    assert image(old) == image(new) != image(plain)


@pytest.mark.parametrize("name", NAMES)
def test_every_input_image_is_shipped_or_named_in_the_note(name):
    """A Load Image file other than ComfyUI's own example.png is shipped in workflows/inputs/ (and the note says
    so), or the note names the file and says what to load."""
    wf = wfiles.load(os.path.join(wfiles.WORKFLOW_DIR, name))
    note = " ".join(n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "Note")
    for n in wf["nodes"]:
        if n["type"] != "LoadImage" or n["widgets_values"][0] == "example.png":
            continue
        file = n["widgets_values"][0]
        assert file in note, (name, file)
        shipped = os.path.join(wfiles.BUILD_DIR, "inputs", file)
        assert os.path.isfile(shipped) and f"workflows/inputs/{file}" in note or "not shipped" in note, (name, file)


def test_example_inputs_are_what_inputs_py_writes():
    import numpy as np
    from PIL import Image
    spec = importlib.util.spec_from_file_location("ug_workflow_inputs", os.path.join(wfiles.BUILD_DIR,
                                                                                      "inputs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for file, make in module.EXAMPLES.items():
        shipped = np.asarray(Image.open(os.path.join(wfiles.BUILD_DIR, "inputs", file)).convert("RGB"))
        assert np.array_equal(shipped, np.asarray(make())), f"{file} is stale: run .venv/bin/python workflows/build.py"


@pytest.mark.parametrize("name", NAMES)
def test_file_is_ui_format_with_a_note(name):
    wf = wfiles.load(os.path.join(wfiles.WORKFLOW_DIR, name))
    assert wf["version"] == 0.4 and isinstance(wf["links"], list) and isinstance(wf["groups"], list)
    assert not is_api_format(wf)
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and wf["last_node_id"] >= max(ids)
    assert wf["last_link_id"] >= max(link[0] for link in wf["links"])
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert notes, "every workflow explains which model files it needs in a Note"
    text = notes[0]["widgets_values"][0]
    for node in wf["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            assert node["widgets_values"][0] in text and "models/checkpoints" in text


@pytest.mark.parametrize("name", NAMES)
def test_nodes_match_live_definitions(name, info):
    """Sockets and outputs as the definitions declare them, and one stored value per widget — for every node
    type this host has (so the pack's nodes are checked in every file, even where core nodes are missing)."""
    wf = wfiles.load(os.path.join(wfiles.WORKFLOW_DIR, name))
    checked = 0
    # A workflow for a newer ComfyUI (core nodes this host lacks, e.g. Flux's) may use core nodes this host has in
    # an older form (2024-03's UNETLoader has no weight_dtype): there, only the pack's nodes are checked.
    newer = any(n["type"] in CORE_NODES_ADDED and n["type"] not in info for n in wf["nodes"])
    for node in wf["nodes"]:
        if node["type"] not in info or (newer and not node["type"].startswith("UniversalGuidance")):
            continue
        d = info[node["type"]]
        sockets = nodeinfo.socket_inputs(d)
        assert [(i["name"], i["type"]) for i in node.get("inputs", [])] == [(n, t) for n, t, _ in sockets], node["id"]
        outputs = ["COMBO" if isinstance(t, (list, tuple)) else t for t in d["output"]]
        assert [o["type"] for o in node.get("outputs", [])] == outputs, node["id"]
        layout = nodeinfo.widget_layout(d)
        assert len(node["widgets_values"]) == len(layout), node["id"]
        for slot, value in zip(layout, node["widgets_values"]):
            values = nodeinfo.combo_values(slot.spec) if slot.serialized else None
            model_file = (node["type"], slot.name) in wfiles.FILE_SUBSTITUTIONS  # files: see below
            if values and not model_file and node["type"] not in ("CheckpointLoaderSimple", "LoadImage"):
                assert value in values, (node["id"], slot.name, value)
        checked += node["type"].startswith("UniversalGuidance")
    assert checked, "every workflow uses nodes of this pack"


@pytest.mark.parametrize("name", NAMES)
def test_links_connect_matching_types(name, info):
    wf = wfiles.load(os.path.join(wfiles.WORKFLOW_DIR, name))
    skip_if_host_lacks(wf, info)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, origin, origin_slot, target, target_slot, link_type in wf["links"]:
        src, dst = nodes[origin], nodes[target]
        out_type = info[src["type"]]["output"][origin_slot]
        dst_input = dst["inputs"][target_slot]
        in_type = nodeinfo.input_type(nodeinfo.spec_of(info[dst["type"]], dst_input["name"]))
        assert link_type == out_type == src["outputs"][origin_slot]["type"], link_id
        assert nodeinfo.types_compatible(out_type, in_type), (link_id, out_type, in_type)
        assert dst_input["link"] == link_id and link_id in src["outputs"][origin_slot]["links"]


@pytest.mark.parametrize("name", NAMES)
def test_converts_and_passes_comfyui_validation(name, host, info):
    wf = wfiles.load(os.path.join(wfiles.WORKFLOW_DIR, name))
    skip_if_host_lacks(wf, info)
    prompt = ui_to_api(wf, info)
    assert "30" not in prompt  # the Note is frontend-only
    assert api_link_check(prompt, info) == []
    wfiles.substitute_files_api(prompt)
    folders = contextlib.nullcontext()
    if any(e["class_type"] == "UNETLoader" for e in prompt.values()):  # Flux: the tiny Flux files
        from test_model_families import FAMILIES, ensure_files, family_folders
        ensure_files(FAMILIES["flux"])
        folders = family_folders(host, FAMILIES["flux"])
    with folders:
        ok, error, outputs, node_errors = host.validate(prompt)
    assert ok, (error, node_errors)
    # the saved image and the run report's preview (8 after the KSampler, 25 after UG Run Report)
    assert sorted(outputs) in (["7", "8"], ["25", "7"]), outputs


@pytest.mark.parametrize("name", NAMES)
def test_files_are_what_build_py_writes(name, info, build_module):
    """widgets_values follow the current widget order: rebuild from the live definitions and compare."""
    wf = next((w for w in build_module.WORKFLOWS if os.path.basename(build_module.output_path(w)) == name), None)
    if wf is None:
        pytest.skip(f"{name} is not generated by workflows/build.py")
    missing = sorted(build_module.node_types(wf) - set(info))
    if missing:
        pytest.skip(f"this ComfyUI has no {', '.join(missing)}; run with COMFYUI_PATH=<newer ComfyUI>")
    with open(os.path.join(wfiles.WORKFLOW_DIR, name), encoding="utf-8") as f:
        assert f.read() == build_module.dumps(build_module.build(wf, info)), \
            f"{name} is stale: run .venv/bin/python workflows/build.py"


def image_workflow():
    return wfiles.load(wfiles.path("image.json"))


def node(wf, node_id):
    return next(n for n in wf["nodes"] if n["id"] == node_id)


def test_seed_control_value_is_skipped(info):
    prompt = ui_to_api(image_workflow(), info)
    inputs = prompt["5"]["inputs"]
    assert inputs["seed"] == 0 and inputs["steps"] == 100 and "control_after_generate" not in inputs
    assert prompt["11"]["inputs"] == {"image": "example.png"}  # the upload button is not an input


def test_corrupted_widget_values_fail_validation(host, info):
    wf = image_workflow()
    node(wf, 5)["widgets_values"][2] = 0            # steps below min 1
    node(wf, 10)["widgets_values"][0] = "l3"        # loss not in [l2, l1]
    prompt = wfiles.substitute_files_api(ui_to_api(wf, info))
    ok, _, _, node_errors = host.validate(prompt)
    assert not ok
    assert "steps" in json.dumps(node_errors["5"]) and node_errors["5"]["class_type"] == "UniversalGuidanceKSampler"
    assert "l3" in json.dumps(node_errors["10"])


def test_mismatched_link_fails(host, info):
    wf = image_workflow()
    prompt = wfiles.substitute_files_api(ui_to_api(wf, info))
    prompt["5"]["inputs"]["vae"] = ["1", 0]  # MODEL into a VAE input
    assert any("'vae'" in e and "MODEL" in e for e in api_link_check(prompt, info))
    ok, _, _, node_errors = host.validate(prompt)
    assert not ok and "5" in node_errors


def test_unknown_node_type_is_named(info):
    wf = image_workflow()
    node(wf, 12)["type"] = "NoSuchMaskNode"
    with pytest.raises(UnknownNodeTypes) as e:
        ui_to_api(wf, info)
    assert e.value.missing == [("12", "NoSuchMaskNode")]
    api = {"1": {"class_type": "NoSuchLoader", "inputs": {}}}
    with pytest.raises(UnknownNodeTypes):
        ui_to_api(api, info)


def test_api_format_is_returned_unchanged(info):
    prompt = ui_to_api(image_workflow(), info)
    assert ui_to_api(copy.deepcopy(prompt), info) == prompt
    assert ui_to_api({"prompt": copy.deepcopy(prompt)}, info) == prompt


def test_reroute_primitive_muted_and_bypassed_nodes(host, info):
    """The frontend's rules: Reroutes are followed, a PrimitiveNode's value flows into its widget, muted nodes
    and the inputs linked to them vanish, links through a bypassed node go to its input of the same type."""
    wf = image_workflow()
    links = wf["links"]
    next_id = [wf["last_link_id"]]

    def new_link(origin, slot, target, tslot, kind):
        next_id[0] += 1
        links.append([next_id[0], origin, slot, target, tslot, kind])
        return next_id[0]

    def retarget(target, tslot, origin, slot):
        for link in links:
            if link[3] == target and link[4] == tslot:
                link[1], link[2] = origin, slot
                node(wf, target)["inputs"][tslot]["link"] = link[0]
                return link[0]

    # Reroute between Load Checkpoint's VAE and VAE Decode.
    wf["nodes"].append({"id": 40, "type": "Reroute", "pos": [0, 0], "mode": 0,
                        "inputs": [{"name": "", "type": "*", "link": None}],
                        "outputs": [{"name": "", "type": "VAE", "links": []}]})
    node(wf, 40)["inputs"][0]["link"] = new_link(1, 2, 40, 0, "VAE")
    retarget(6, 1, 40, 0)
    # PrimitiveNode driving the sampler's seed (a widget converted to an input).
    wf["nodes"].append({"id": 41, "type": "PrimitiveNode", "pos": [0, 0], "mode": 0,
                        "outputs": [{"name": "INT", "type": "INT", "links": [], "widget": {"name": "seed"}}],
                        "widgets_values": [1234, "fixed"]})
    seed_link = len(node(wf, 5)["inputs"])
    node(wf, 5)["inputs"].append({"name": "seed", "type": "INT", "link": new_link(41, 0, 5, seed_link, "INT"),
                                  "widget": {"name": "seed"}})
    # Bypassed ImageInvert between VAE Decode and Save Image.
    wf["nodes"].append({"id": 42, "type": "ImageInvert", "pos": [0, 0], "mode": 4,
                        "inputs": [{"name": "image", "type": "IMAGE", "link": None}],
                        "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": []}], "widgets_values": []})
    node(wf, 42)["inputs"][0]["link"] = new_link(6, 0, 42, 0, "IMAGE")
    retarget(7, 0, 42, 0)
    # Muted InvertMask: the guidance node's mask input disappears with it.
    node(wf, 12)["mode"] = 2
    # A muted PreviewImage hanging off VAE Decode.
    wf["nodes"].append({"id": 43, "type": "PreviewImage", "pos": [0, 0], "mode": 2,
                        "inputs": [{"name": "images", "type": "IMAGE", "link": None}], "widgets_values": []})
    node(wf, 43)["inputs"][0]["link"] = new_link(6, 0, 43, 0, "IMAGE")

    prompt = ui_to_api(wf, info)
    assert prompt["6"]["inputs"]["vae"] == ["1", 2]
    assert prompt["5"]["inputs"]["seed"] == 1234
    assert prompt["7"]["inputs"]["images"] == ["6", 0]
    assert "mask" not in prompt["10"]["inputs"]
    assert not {"12", "40", "41", "42", "43"} & set(prompt)
    ok, error, _, node_errors = host.validate(wfiles.substitute_files_api(prompt))
    assert ok, (error, node_errors)


def test_widget_layout_rules():
    seed = {"input": {"required": {"model": ("MODEL",), "seed": ("INT", {}), "steps": ("INT", {"default": 3}),
                                   "mode": (["a", "b"], {"control_after_generate": True})},
                      "optional": {"x": ("INT", {"control_after_generate": True}),
                                   "y": ("FLOAT", {"forceInput": True})}}}
    assert [(s.name, s.kind) for s in nodeinfo.widget_layout(seed)] == [
        ("seed", "value"), ("control_after_generate", "control"), ("steps", "value"), ("mode", "value"),
        ("control_after_generate", "control"), ("control_filter_list", "filter"), ("x", "value"),
        ("control_after_generate", "control")]
    load = {"input": {"required": {"image": (["a.png"], {"image_upload": True}), "channel": (["alpha"],)}}}
    assert [s.kind for s in nodeinfo.widget_layout(load)] == ["value", "value", "upload"]


def test_every_combo_of_the_pack_has_a_default(info):
    """A freshly added node shows a chosen value in every list (not the host's first entry, nor 'undefined' in
    the search preview of the current frontend): each combo of the pack names a default that is one of its
    choices (the KSampler's scheduler: ddim_uniform, the workflows' setting)."""
    from headless.host import pack_module
    missing = []
    for node_type in pack_module().NODE_CLASS_MAPPINGS:
        for name, spec, _ in nodeinfo.ordered_inputs(info[node_type]):
            values = nodeinfo.combo_values(spec)
            if values is None:
                continue
            default = nodeinfo.input_options(spec).get("default")
            if default is None or default not in values:
                missing.append(f"{node_type}.{name} (default {default!r})")
    assert not missing, missing
    scheduler = nodeinfo.spec_of(info["UniversalGuidanceKSampler"], "scheduler")
    assert nodeinfo.input_options(scheduler)["default"] == "ddim_uniform"


@pytest.mark.parametrize("name", NAMES)
def test_prompt_and_guidance_targets_tell_one_story(name, info):
    """What a CLIP text term asks for (the words after 'of') is in the positive prompt, and a segmentation map of
    a person goes with a prompt that has a person: the prompt and the guidance do not pull apart."""
    wf = wfiles.load(os.path.join(wfiles.WORKFLOW_DIR, name))
    skip_if_host_lacks(wf, info)
    prompt = ui_to_api(wf, info)
    positive = prompt["2"]["inputs"]["text"].lower().replace(",", " ").split()
    for entry in prompt.values():
        if entry["class_type"] == "UniversalGuidanceCLIPText":
            subject = entry["inputs"]["text"].lower().split(" of ", 1)[-1]
            words = [w for w in subject.replace(",", " ").split() if len(w) > 3]
            assert words and all(w in positive for w in words), (name, subject, " ".join(positive))
        if entry["class_type"] == "UniversalGuidanceSegmentation":
            assert "person" in positive, (name, " ".join(positive))
