"""The five guidance-loss nodes in a real ComfyUI: tiny random networks of the real architectures, saved in the
real file formats in the folders the nodes look in, loaded by the nodes; each term must lower its own loss on the
final image versus the unguided image of the same seed."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

import guidance as G
import prompts
import random_networks as rn
from conftest import CHECKPOINT

SIZE = 32
STEPS = 3

try:
    import facenet_pytorch  # noqa: F401
    HAVE_FACENET = True
except ImportError:
    HAVE_FACENET = False


def graph(term_nodes: dict, guidance_ref, *, seed: int, knobs: dict) -> dict:
    p = prompts.base(CHECKPOINT, size=SIZE)
    p.update(term_nodes)
    p["5"] = {"class_type": "UniversalGuidanceKSampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
        "vae": ["1", 2], "guidance": guidance_ref, "seed": seed, "steps": STEPS, "cfg": 1.0,
        "scheduler": "normal", "denoise": 1.0, **{**prompts.KNOBS, **knobs}}}
    p["6"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}
    p["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"net_{seed}"}}
    return p


def window(weight):
    return {"weight": weight, "start_percent": 0.0, "end_percent": 1.0}


def clip_text_node(nets, chain=None):
    arch, path = nets["clip_vit"]
    node = {"class_type": "UniversalGuidanceCLIPText", "inputs": {
        "text": "a red apple", "clip_model": os.path.basename(path), "architecture": "auto (from file)",
        "cutouts": 0, **window(1.0)}}
    if chain:
        node["inputs"]["guidance"] = chain
    return node


def seg_node(nets, chain=None):
    node = {"class_type": "UniversalGuidanceSegmentation", "inputs": {
        "model": os.path.basename(nets["seg"]), "architecture": "auto (from file)", "class_name": "person",
        "outside_mask": "background", "input_size": 64, "segmentation_map": ["30", 0], **window(1.0)}}
    if chain:
        node["inputs"]["guidance"] = chain
    return node


def final_image(host, result):
    info = result.outputs["7"]["images"][0]
    arr = np.asarray(Image.open(os.path.join(host.workdir, "output", info["filename"])).convert("RGB"))
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1)[None]


def run_pair(host, term_nodes, ref, seed, strength=1.5):
    """(unguided image, guided image) with the same seed; guidance in normalized mode (loss-scale free)."""
    out = []
    for s in (0.0, strength):
        result = host.run(graph(term_nodes, ref, seed=seed,
                                knobs={"forward_strength": s, "strength_mode": "normalized"}))
        err = result.error()
        assert result.success, err and (err["exception_message"], err["traceback"][-3:]) or result.messages
        out.append(final_image(host, result))
    return out


def assert_lowered(loss_fn, unguided, guided, margin=0.02):
    with torch.no_grad():
        lu, lg = float(loss_fn(unguided)[0]), float(loss_fn(guided)[0])
    assert lg < lu - margin * max(abs(lu), 1e-3), (lg, lu)


def load_image_node(name, node_id):
    return {node_id: {"class_type": "LoadImage", "inputs": {"image": name}}}


def test_clip_text_node_lowers_its_loss(host, nets):
    arch, path = nets["clip_vit"]
    unguided, guided = run_pair(host, {"40": clip_text_node(nets)}, ["40", 0], seed=3)
    assert_lowered(G.CLIPTextLoss(G.load_clip(arch, path), "a red apple"), unguided, guided)


def test_segmentation_node_lowers_its_loss(host, nets):
    from guidance import segmentation as S
    nodes_ = {**load_image_node("ug_seg.png", "30"), "41": seg_node(nets)}
    unguided, guided = run_pair(host, nodes_, ["41", 0], seed=4)
    target = S.colors_to_class_map(torch.from_numpy(np.asarray(Image.open(
        os.path.join(host.workdir, "input", "ug_seg.png"))).astype(np.float32) / 255)[None])
    net = S.load_segmentation_model("lraspp_mobilenet_v3_large", nets["seg"])
    assert_lowered(S.SegmentationLoss(net, target, input_size=64), unguided, guided)


def test_detection_node_lowers_its_loss(host, nets):
    from guidance import detection as D
    boxes = "2,2,20,30,person; 16,8,30,24,dog"
    node = {"class_type": "UniversalGuidanceDetection", "inputs": {
        "boxes": boxes, "coordinates": "pixels", "width": SIZE, "height": SIZE,
        "model": os.path.basename(nets["det"]), "box_regression": False, "detector_size": 64, **window(1.0)}}
    unguided, guided = run_pair(host, {"42": node}, ["42", 0], seed=5)
    net = D.load_detection_model(nets["det"], min_size=64, max_size=1333)
    assert_lowered(D.DetectionLoss(net, boxes, image_size=(SIZE, SIZE), relative=False), unguided, guided)


def test_style_node_lowers_its_loss(host, nets):
    arch, path = nets["clip_rn"]
    node = {"class_type": "UniversalGuidanceStyle", "inputs": {
        "style_image": ["31", 0], "clip_model": os.path.basename(path), "architecture": "auto (from file)",
        "gram_weight": 0.5, **window(1.0)}}
    unguided, guided = run_pair(host, {**load_image_node("ug_style.png", "31"), "43": node}, ["43", 0], seed=6)
    style = rn.coffee((SIZE, SIZE))
    assert_lowered(G.StyleLoss(G.load_clip(arch, path), style, gram_weight=0.5), unguided, guided)


@pytest.mark.skipif(not HAVE_FACENET, reason="facenet-pytorch not installed (make venv installs it --no-deps)")
def test_face_node_lowers_its_loss(host, nets):
    from guidance import face as F
    node = {"class_type": "UniversalGuidanceFace", "inputs": {
        "reference": ["32", 0], "model": os.path.basename(nets["face"]), "loss": "l1", "crop": "full",
        **window(1.0)}}
    unguided, guided = run_pair(host, {**load_image_node("ug_face_ref.png", "32"), "44": node}, ["44", 0], seed=7)
    ref = rn.astronaut((SIZE, SIZE))
    assert_lowered(F.FaceLoss(F.load_face_model(nets["face"]), ref, loss="l1", crop="full"), unguided, guided)


@pytest.mark.skipif(not HAVE_FACENET, reason="facenet-pytorch not installed (make venv installs it --no-deps)")
def test_face_not_found_in_a_step_is_counted_and_logged(host, nets, caplog):
    node = {"class_type": "UniversalGuidanceFace", "inputs": {
        "reference": ["32", 0], "model": os.path.basename(nets["face"]), "loss": "l1", "crop": "detect",
        **window(1.0)}}
    ref_big = (rn.astronaut((160, 160))[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(ref_big).save(os.path.join(host.workdir, "input", "ug_face_ref160.png"))
    with caplog.at_level(logging.INFO, logger="universal_guidance"):
        result = host.run(graph({**load_image_node("ug_face_ref160.png", "32"), "44": node}, ["44", 0], seed=8,
                                knobs={"forward_strength": 1.0}))
    assert result.success
    assert any("no face found in 3 of 3 evaluations" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


def test_segmentation_and_clip_chained_both_act(host, nets):
    from guidance import segmentation as S
    arch, path = nets["clip_vit"]
    nodes_ = {**load_image_node("ug_seg.png", "30"), "41": seg_node(nets), "40": clip_text_node(nets, ["41", 0])}
    unguided, guided = run_pair(host, nodes_, ["40", 0], seed=9)
    target = S.colors_to_class_map(torch.from_numpy(np.asarray(Image.open(
        os.path.join(host.workdir, "input", "ug_seg.png"))).astype(np.float32) / 255)[None])
    net = S.load_segmentation_model("lraspp_mobilenet_v3_large", nets["seg"])
    assert_lowered(S.SegmentationLoss(net, target, input_size=64), unguided, guided, margin=0.0)
    assert_lowered(G.CLIPTextLoss(G.load_clip(arch, path), "a red apple"), unguided, guided, margin=0.0)


# ------------------------------------------------------------------------------------------- bad inputs

def run_error(host, term_nodes, ref, validate=True):
    result = host.run(graph(term_nodes, ref, seed=0, knobs={}), validate=validate)
    assert not result.success
    err = result.error()
    assert err is not None, result.messages
    return err["exception_message"]


def validation_errors(host, prompt) -> dict:
    """``{node id: [error text, ...]}`` from ComfyUI's own validator (the prompt must be invalid)."""
    ok, _, _, node_errors = host.validate(prompt)
    assert not ok
    return {nid: [f"{e['message']}: {e['details']}" for e in entry["errors"]] for nid, entry in node_errors.items()}


def detection_node(nets, boxes, model=None, **overrides):
    return {"class_type": "UniversalGuidanceDetection", "inputs": {
        "boxes": boxes, "coordinates": "pixels", "width": SIZE, "height": SIZE,
        "model": model or os.path.basename(nets["det"]), "box_regression": False, "detector_size": 64,
        **window(1.0), **overrides}}


def test_unknown_label_names_the_entry_at_validation(host, nets):
    node = detection_node(nets, "2,2,20,30,person; 4,4,10,10,unicorn")
    errors = validation_errors(host, graph({"42": node}, ["42", 0], seed=0, knobs={}))
    assert list(errors) == ["42"] and len(errors["42"]) == 1, errors
    msg = errors["42"][0]
    assert "UG Object Detection Guidance" in msg and "input 'boxes'" in msg and "box 2" in msg and "unicorn" in msg


def test_every_bad_box_is_listed_at_once(host, nets):
    node = detection_node(nets, "2,2,20,30,person; 10,10,40,20,dog; 5,5,1,1,cat")
    (msg,) = validation_errors(host, graph({"42": node}, ["42", 0], seed=0, knobs={}))["42"]
    assert "box 2" in msg and "outside" in msg and "box 3" in msg and "empty box" in msg
    assert "box 1" not in msg


def test_bad_window_and_bad_boxes_are_listed_together_once_each(host, nets):
    """One queue shows every mistake: the sampler's window and the detection node's boxes and window."""
    node = detection_node(nets, "2,2,20,30,unicorn", start_percent=0.7000000000000001, end_percent=0.4)
    prompt = graph({"42": node}, ["42", 0], seed=0, knobs={"start_percent": 0.9, "end_percent": 0.3})
    errors = validation_errors(host, prompt)
    assert sorted(errors) == ["42", "5"], errors
    assert len(errors["42"]) == 1 and len(errors["5"]) == 1, errors  # reported once per node
    det, sampler = errors["42"][0], errors["5"][0]
    assert "unicorn" in det and "window from 0.7 to 0.4 is empty" in det and "0.7000000000000001" not in det
    assert "Universal KSampler" in sampler and "window from 0.9 to 0.3 is empty" in sampler
    assert "start_percent - start_percent" not in sampler  # no doubled prefix


@pytest.mark.skipif(not HAVE_FACENET, reason="facenet-pytorch not installed (make venv installs it --no-deps)")
def test_reference_without_a_face_is_a_clear_error(host, nets):
    coffee = (rn.coffee((160, 160))[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(coffee).save(os.path.join(host.workdir, "input", "ug_coffee.png"))
    node = {"class_type": "UniversalGuidanceFace", "inputs": {
        "reference": ["32", 0], "model": os.path.basename(nets["face"]), "loss": "l1", "crop": "detect",
        **window(1.0)}}
    msg = run_error(host, {**load_image_node("ug_coffee.png", "32"), "44": node}, ["44", 0])
    assert "UG Face Guidance" in msg and "input 'reference'" in msg and "no face found" in msg


def test_missing_model_file_names_file_and_folder(host, nets):
    """A non-standard file that is gone by the time the node runs (deleted after the prompt was validated)."""
    import shutil
    tmp = os.path.join(nets["ug_segmentation"], "lraspp_mobilenet_v3_large-gone.pth")
    shutil.copy(nets["seg"], tmp)
    nodes_ = {**load_image_node("ug_seg.png", "30"), "41": seg_node(nets)}
    nodes_["41"]["inputs"]["model"] = os.path.basename(tmp)
    assert host.validate(graph(nodes_, ["41", 0], seed=0, knobs={}))[0]
    os.remove(tmp)
    msg = run_error(host, nodes_, ["41", 0], validate=False)
    assert "input 'model'" in msg and "lraspp_mobilenet_v3_large-gone.pth" in msg and nets["ug_segmentation"] in msg


def test_standard_file_missing_offline_names_file_folder_and_url(host, nets, monkeypatch):
    """A standard file that is not present is downloaded on first use; offline, the error says what to do."""
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    nodes_ = {**load_image_node("ug_seg.png", "30"), "41": seg_node(nets)}
    nodes_["41"]["inputs"]["model"] = "lraspp_mobilenet_v3_large-d234d4ea.pth"
    msg = run_error(host, nodes_, ["41", 0])
    assert "lraspp_mobilenet_v3_large-d234d4ea.pth" in msg and "download.pytorch.org" in msg
    assert "by hand" in msg


def test_segmentation_needs_exactly_one_target(host, nets):
    node = seg_node(nets)
    del node["inputs"]["segmentation_map"]
    msg = run_error(host, {"41": node}, ["41", 0])
    assert "UG Segmentation Guidance" in msg and "'segmentation_map' / 'mask'" in msg


def test_empty_clip_text_is_a_validation_error(host, nets):
    node = clip_text_node(nets)
    node["inputs"]["text"] = "  "
    (msg,) = validation_errors(host, graph({"40": node}, ["40", 0], seed=0, knobs={}))["40"]
    assert "UG CLIP Text Guidance" in msg and "input 'text'" in msg


# ------------------------------------------------------------------------------------- model-file safety

def _file_nodes(nets):
    """Per node: (folder, file name for a crafted archive, node builder given that file name)."""
    clip_arch = nets["clip_vit"][0]

    def clip(name):
        n = clip_text_node(nets)
        n["inputs"]["clip_model"] = name
        return {"40": n}, ["40", 0]

    def style(name):
        return {**load_image_node("ug_style.png", "31"), "43": {"class_type": "UniversalGuidanceStyle", "inputs": {
            "style_image": ["31", 0], "clip_model": name, "architecture": "auto (from file)", "gram_weight": 0.0,
            **window(1.0)}}}, ["43", 0]

    def seg(name):
        n = seg_node(nets)
        n["inputs"]["model"] = name
        return {**load_image_node("ug_seg.png", "30"), "41": n}, ["41", 0]

    def det(name):
        return {"42": detection_node(nets, "2,2,20,30,person", model=name)}, ["42", 0]

    def face(name):
        return {**load_image_node("ug_face_ref.png", "32"), "44": {"class_type": "UniversalGuidanceFace", "inputs": {
            "reference": ["32", 0], "model": name, "loss": "l1", "crop": "full", **window(1.0)}}}, ["44", 0]

    return {
        "clip_text": (nets["ug_clip"], f"{clip_arch}-crafted.pt", clip),
        "style": (nets["ug_clip"], f"{clip_arch}-crafted2.pt", style),
        "segmentation": (nets["ug_segmentation"], "lraspp_mobilenet_v3_large-crafted.pt", seg),
        "detection": (nets["ug_detection"], "fasterrcnn-crafted.pth", det),
        "face": (nets.get("ug_face"), "vggface2-crafted.pt", face),
    }


@pytest.mark.parametrize("which", ["clip_text", "style", "segmentation", "detection", "face"])
def test_code_running_model_file_is_refused_by_every_node_and_runs_nothing(host, nets, tmp_path, which):
    if which == "face" and not HAVE_FACENET:
        pytest.skip("facenet-pytorch not installed (make venv installs it --no-deps)")
    folder, name, build = _file_nodes(nets)[which]
    marker = tmp_path / "written-by-the-archive"
    path = rn.write_code_running_archive(os.path.join(folder, name), str(marker))
    try:
        term_nodes, ref = build(name)
        msg = run_error(host, term_nodes, ref)
    finally:
        os.remove(path)
    assert not marker.exists(), "loading the model file ran code from it"
    assert "TorchScript archive" in msg and "refused" in msg and ".safetensors" in msg and name in msg, msg


def test_offline_download_names_the_users_models_folder_and_creates_nothing(host, nets, monkeypatch):
    """The download folder is the models folder the host was given (here the test workdir's), not the ComfyUI
    checkout's; offline, nothing is created anywhere."""
    import urllib.request

    import folder_paths

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    name = "deeplabv3_resnet101_coco-586e9e4e.pth"
    target = os.path.join(folder_paths.models_dir, "universal_guidance", "segmentation")
    in_host = os.path.join(host.path, "models", "universal_guidance")
    existed = os.path.exists(in_host)
    nodes_ = {**load_image_node("ug_seg.png", "30"), "41": seg_node(nets)}
    nodes_["41"]["inputs"]["model"] = name
    nodes_["41"]["inputs"]["architecture"] = "deeplabv3_resnet101"
    msg = run_error(host, nodes_, ["41", 0])
    assert folder_paths.models_dir == os.path.join(host.workdir, "models")
    assert repr(target) in msg and name in msg and "by hand" in msg, msg
    assert host.path not in msg
    assert os.path.exists(in_host) == existed
    assert not os.path.exists(os.path.join(target, name))


def test_models_roots_list_universal_guidance_folders(host, nets, tmp_path):
    """A models root added later (extra_model_paths.yaml, the runner's --models) lists its universal_guidance/<kind>
    files in the nodes' widgets, as does the host's own models folder."""
    import folder_paths

    from headless.runner import add_model_roots
    root = tmp_path / "user-models"
    (root / "universal_guidance" / "segmentation").mkdir(parents=True)
    (root / "universal_guidance" / "segmentation" / "lraspp_mobilenet_v3_large-mine.pth").write_bytes(b"x")
    add_model_roots(folder_paths, [str(root)])
    listed = host.node_types["UniversalGuidanceSegmentation"].INPUT_TYPES()["required"]["model"][0]
    assert "lraspp_mobilenet_v3_large-mine.pth" in listed
    assert os.path.basename(nets["seg"]) in listed  # the workdir's models/universal_guidance/segmentation
