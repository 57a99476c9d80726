"""The five guidance networks of the paper (CLIP text, segmentation, face, detection, style) and weight files.

Every network is a randomly initialised instance of the real architecture (tiny open_clip configs for CLIP; the
full torchvision / facenet-pytorch architectures otherwise), saved in the real file format, loaded through the
package's loader. MTCNN always runs with its real weights (they ship in facenet-pytorch).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from guidance import clip as ug_clip
from guidance import detection as ug_det
from guidance import download as ug_dl
from guidance import segmentation as ug_seg
from guidance import style as ug_style
from guidance.objective import Guidance, GuidanceTerm
import random_networks as rn  # noqa: E402
from random_networks import (astronaut, calibrate_bn_, calibration_images, coffee, perturb_,  # noqa: F401
                             smooth_image, write_detector, write_face_net, write_lraspp)

try:
    import facenet_pytorch  # noqa: F401
    HAVE_FACENET = True
except ImportError:
    HAVE_FACENET = False

needs_facenet = pytest.mark.skipif(not HAVE_FACENET, reason="facenet-pytorch not installed "
                                   "(pip install --no-deps facenet-pytorch==2.6.0; pip install requests)")


# ----------------------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """These nets run on tiny tensors, where intra-op threads cost more than they give: on a 2-core box shared
    with other jobs this file took 165 s with 2 threads and 32 s with 1. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def check_loss_and_grad(loss_fn, image):
    """Loss is finite with one value per image; its gradient w.r.t. the image is finite and non-zero."""
    x = image.clone().requires_grad_(True)
    value = loss_fn(x)
    assert value.shape == (image.shape[0],)
    assert torch.isfinite(value).all(), value
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    return value.detach(), grad


def descend(loss_fn, image, steps=4, lr=0.02):
    """A few Adam steps on the image pixels; returns (loss before, loss after), both evaluated after reset()."""
    def evaluate(x):
        if hasattr(loss_fn, "reset"):
            loss_fn.reset()
        with torch.no_grad():
            return loss_fn(x).sum().item()

    x = image.clone().requires_grad_(True)
    before = evaluate(x)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        if hasattr(loss_fn, "reset"):
            loss_fn.reset()
        opt.zero_grad()
        loss_fn(x).sum().backward()
        opt.step()
    return before, evaluate(x.detach())


@pytest.fixture(scope="module")
def tiny_vit_file(tmp_path_factory):
    import open_clip
    name = rn.register_tiny_clip_config()
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    path = tmp_path_factory.mktemp("clip") / "tiny-vit.safetensors"
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(path))
    return name, str(path), model.state_dict()


@pytest.fixture(scope="module")
def tiny_rn_file(tmp_path_factory):
    import open_clip
    name = rn.register_tiny_clip_config(vision="resnet")
    torch.manual_seed(1)
    model = perturb_(open_clip.create_model(name), scale=0.5)
    from guidance.preprocess import CLIP_MEAN, CLIP_STD, normalize
    calibrate_bn_(model, lambda x: model.encode_image(normalize(x, CLIP_MEAN, CLIP_STD)), calibration_images((64, 64)))
    path = tmp_path_factory.mktemp("clip") / "tiny-rn.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, str(path))
    return name, str(path)


def count_calls(obj, attr):
    """Wrap ``obj.attr`` with a call counter; returns the counter list."""
    calls = []
    original = getattr(obj, attr)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(obj, attr, wrapper)
    return calls


# ------------------------------------------------------------------------------------------------------- CLIP

def test_clip_loader_reads_every_format(tiny_vit_file, tmp_path):
    name, path, reference = tiny_vit_file
    plain = tmp_path / "plain.pt"
    torch.save({f"module.{k}": v for k, v in reference.items()}, plain)
    wrapped = tmp_path / "wrapped.bin"
    torch.save({"state_dict": reference}, wrapped)
    for p in (path, str(plain), str(wrapped)):
        model = ug_clip.load_clip(name, p, "cpu")
        assert not model.training and not any(q.requires_grad for q in model.parameters())
        for k, v in model.state_dict().items():
            assert torch.equal(v, reference[k]), (p, k)
        assert model.ug_arch == name


def test_clip_loader_reads_trusted_torchscript_archives_with_quickgelu(tmp_path, monkeypatch):
    import warnings

    import open_clip
    from open_clip.transformer import QuickGELU
    name = rn.register_tiny_clip_config()
    source = open_clip.create_model(name, force_quick_gelu=True)
    path = tmp_path / "ViT-tiny-openai-style.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(source).save(str(path))
    assert ug_dl.is_torchscript_archive(str(path))
    with pytest.raises(RuntimeError, match="TorchScript archive.*refused"):
        ug_clip.load_clip(name, str(path))  # not a standard file: its hash is in no table
    monkeypatch.setitem(ug_dl.EXTRA_TRUSTED_TORCHSCRIPT, ug_dl.file_sha256(str(path)), path.name)
    model = ug_clip.load_clip(name, str(path))
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    for k, v in model.state_dict().items():
        assert torch.equal(v, source.state_dict()[k])


def test_openai_clip_hashes_are_full_sha256():
    table = ug_dl.trusted_torchscript()
    assert sorted(table.values()) == ["RN50.pt", "ViT-B-16.pt", "ViT-B-32.pt", "ViT-L-14.pt"]
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in table)


@pytest.mark.parametrize("name", ["evil.pt", "evil.pth", "evil.bin"])  # OpenAI's names: test_model_file_safety
def test_code_running_torchscript_archive_is_refused_and_runs_nothing(tmp_path, name):
    marker = tmp_path / "marker"
    path = rn.write_code_running_archive(str(tmp_path / name), str(marker))
    assert ug_dl.is_torchscript_archive(path) and not marker.exists()
    with pytest.raises(RuntimeError) as info:
        ug_dl.load_state_dict_file(path)
    assert not marker.exists(), "loading the archive ran its code"
    message = str(info.value)
    assert name in message and "TorchScript" in message and "safetensors" in message


def test_clip_loader_errors(tiny_vit_file, tmp_path):
    name, path, _ = tiny_vit_file
    resnet = rn.register_tiny_clip_config(vision="resnet")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        ug_clip.load_clip("ViT-Q-99", path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ug_clip.load_clip(name, str(tmp_path / "missing.safetensors"))
    with pytest.raises(RuntimeError, match="tiny-vit.safetensors.*does not fit"):
        ug_clip.load_clip(resnet, path)
    pickled = tmp_path / "pickled.pt"
    torch.save({"a": [1, 2]}, pickled)
    with pytest.raises(RuntimeError, match="pickled.pt"):
        ug_clip.load_clip(name, str(pickled))


@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50"])
def test_clip_tokenizers_are_offline(arch, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokens = ug_clip.clip_tokenizer(arch)(["a photo of a cat"])
    assert tokens.shape == (1, 77) and tokens.dtype == torch.long


def test_clip_text_loss(tiny_vit_file):
    name, path, _ = tiny_vit_file
    model = ug_clip.load_clip(name, path)
    text_calls = count_calls(model, "encode_text")
    loss = ug_clip.CLIPTextLoss(model, "a red apple")
    assert len(text_calls) == 1
    image = smooth_image(2, (40, 56))
    value, _ = check_loss_and_grad(loss, image)
    assert (value >= -1.0001).all() and (value <= 1.0001).all()
    before, after = descend(loss, image, steps=5, lr=0.03)
    assert after < before
    loss.prepare("cpu")
    loss(image)
    assert len(text_calls) == 1, "the text embedding must be computed once"


def test_clip_cutouts_are_seeded(tiny_vit_file):
    name, path, _ = tiny_vit_file
    model = ug_clip.load_clip(name, path)
    loss = ug_clip.CLIPTextLoss(model, ["a dog", "a puppy"], cutouts=4, seed=3)
    image = smooth_image(3, (48, 48), seed=1)
    first = loss(image)
    second = loss(image)  # new crops
    loss.reset()
    again = loss(image)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    check_loss_and_grad(loss, image)
    before, after = descend(loss, image, steps=5, lr=0.03)
    assert after < before


def test_clip_bad_inputs(tiny_vit_file):
    name, path, _ = tiny_vit_file
    model = ug_clip.load_clip(name, path)
    with pytest.raises(ValueError, match="non-empty text"):
        ug_clip.CLIPTextLoss(model, "  ")
    with pytest.raises(ValueError, match="cutouts"):
        ug_clip.CLIPTextLoss(model, "x", cutouts=-1)
    loss = ug_clip.CLIPTextLoss(model, "x")
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        loss(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        loss(torch.rand(32, 32))


def test_clip_term_in_a_guidance_objective(tiny_vit_file):
    name, path, _ = tiny_vit_file
    loss = ug_clip.CLIPTextLoss(ug_clip.load_clip(name, path), "a house")
    guidance = Guidance().add(GuidanceTerm("clip", loss, weight=100.0))
    value = guidance(smooth_image(2, (32, 32)), 0.5)
    assert value.shape == (2,) and torch.isfinite(value).all()
    assert guidance.reports() == []
    guidance.reset()


# ------------------------------------------------------------------------------------------------ segmentation

@pytest.fixture(scope="module")
def lraspp_file(tmp_path_factory):
    return write_lraspp(str(tmp_path_factory.mktemp("seg")))


def test_segmentation_loss_lraspp(lraspp_file):
    model = ug_seg.load_segmentation_model("lraspp_mobilenet_v3_large", lraspp_file, "cpu")
    assert not model.training
    target = torch.zeros(1, 48, 48, dtype=torch.long)
    target[:, 10:40, 12:36] = ug_seg.voc_class_index("dog")
    target[:, :4] = ug_seg.IGNORE_INDEX
    loss = ug_seg.SegmentationLoss(model, target, input_size=96)
    image = smooth_image(2, (48, 48))
    check_loss_and_grad(loss, image)
    before, after = descend(loss, image, steps=4, lr=0.03)
    assert after < before


def test_segmentation_default_input_size_is_520(lraspp_file):
    model = ug_seg.load_segmentation_model("lraspp_mobilenet_v3_large", lraspp_file)
    loss = ug_seg.SegmentationLoss(model, torch.zeros(32, 32, dtype=torch.long))
    assert loss.input_size == 520
    seen = []
    handle = model.backbone.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        out = loss.logits(smooth_image(1, (32, 48)))
    finally:
        handle.remove()
    assert seen == [(520, 780)]
    assert out.shape == (1, 21, 32, 48)


def test_segmentation_aux_head_checkpoints_load_strictly(tmp_path):
    # DeepLabV3/FCN checkpoints published by torchvision carry an auxiliary head: read from the file, loaded
    # strictly, then dropped. (MobileNet backbone: the same code path as ResNet50/101, much smaller.)
    torch.manual_seed(0)
    source = ug_seg.build_segmentation_model("deeplabv3_mobilenet_v3_large", aux_loss=True)
    path = tmp_path / "deeplab-aux.safetensors"
    from safetensors.torch import save_file
    save_file(source.state_dict(), str(path))
    model = ug_seg.load_segmentation_model("deeplabv3_mobilenet_v3_large", str(path))
    assert model.aux_classifier is None
    kept = ug_seg.load_segmentation_model("deeplabv3_mobilenet_v3_large", str(path), keep_aux=True)
    assert kept.aux_classifier is not None
    with pytest.raises(RuntimeError, match="auxiliary head"):
        ug_seg.load_segmentation_model("lraspp_mobilenet_v3_large", str(path))
    with pytest.raises(RuntimeError, match="does not fit"):
        ug_seg.load_segmentation_model("fcn_resnet50", str(path))
    with pytest.raises(ValueError, match="unknown segmentation architecture"):
        ug_seg.load_segmentation_model("unet", str(path))


def test_segmentation_architectures_build():
    # The published layouts: DeepLabV3/FCN with auxiliary head, LRASPP without (keys checked, no forward).
    for arch in ("deeplabv3_resnet50", "fcn_resnet50"):
        keys = ug_seg.build_segmentation_model(arch, aux_loss=True).state_dict().keys()
        assert any(k.startswith("aux_classifier.") for k in keys)
        assert any(k.startswith("classifier.") for k in keys)


def test_segmentation_target_of_another_size_is_resized_nearest(lraspp_file):
    model = ug_seg.load_segmentation_model("lraspp_mobilenet_v3_large", lraspp_file)
    target = torch.arange(16).view(1, 4, 4) % 21
    loss = ug_seg.SegmentationLoss(model, target, input_size=32)
    big = loss.target_for((16, 16), torch.device("cpu"))
    assert torch.equal(big, target.repeat_interleave(4, 1).repeat_interleave(4, 2))
    assert loss(smooth_image(1, (16, 16))).shape == (1,)


def test_segmentation_bad_targets(lraspp_file):
    model = ug_seg.load_segmentation_model("lraspp_mobilenet_v3_large", lraspp_file)
    with pytest.raises(ValueError, match="outside 0..20"):
        ug_seg.SegmentationLoss(model, torch.full((8, 8), 30, dtype=torch.long))
    with pytest.raises(ValueError, match="no labelled pixel"):
        ug_seg.SegmentationLoss(model, torch.full((8, 8), 255, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[H,W\] or \[B,H,W\]"):
        ug_seg.SegmentationLoss(model, torch.zeros(2, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="fractional"):
        ug_seg.SegmentationLoss(model, torch.full((8, 8), 0.5))
    loss = ug_seg.SegmentationLoss(model, torch.zeros(2, 8, 8, dtype=torch.long), input_size=32)
    with pytest.raises(ValueError, match="batch of 2"):
        loss(smooth_image(3, (8, 8)))
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        loss(torch.rand(2, 1, 8, 8))


def test_voc_palette_and_colour_maps():
    pal = ug_seg.VOC_PALETTE
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0] and pal[15].tolist() == [192, 128, 128]
    assert pal[255].tolist() == [224, 224, 192]
    assert len(ug_seg.VOC_CLASSES) == 21 and ug_seg.VOC_CLASSES[15] == "person"
    # A colour-coded image: person / dog / background, slight noise, one unknown colour, VOC's void colour.
    cls = torch.zeros(6, 8, dtype=torch.long)
    cls[1:3, 2:6] = 15
    cls[4:, :3] = 12
    img = pal[cls].float() / 255 + 0.02
    img[0, 0] = torch.tensor([0.3, 0.9, 0.1])
    img[5, 7] = pal[255].float() / 255
    out = ug_seg.colors_to_class_map(img)
    expected = cls.clone()
    expected[0, 0] = 255
    expected[5, 7] = 255
    assert out.shape == (1, 6, 8) and torch.equal(out[0], expected)
    # ComfyUI IMAGE batch [B,H,W,3] and uint8 input.
    assert torch.equal(ug_seg.colors_to_class_map((img[None] * 255).round().clamp(0, 255).byte())[0], expected)
    # MASK + class name.
    mask = torch.zeros(1, 4, 4)
    mask[0, 1:3, 1:3] = 1
    m = ug_seg.mask_to_class_map(mask, "Dog")
    assert m[0, 1, 1] == 12 and m[0, 0, 0] == 0
    m = ug_seg.mask_to_class_map(mask[0], "tv monitor", outside="ignore")
    assert m[0, 1, 1] == 20 and m[0, 0, 0] == 255
    assert ug_seg.voc_class_index("airplane") == 1 and ug_seg.voc_class_index("__background__") == 0
    with pytest.raises(ValueError, match="unknown VOC class 'unicorn'"):
        ug_seg.mask_to_class_map(mask, "unicorn")
    with pytest.raises(ValueError, match="outside"):
        ug_seg.mask_to_class_map(mask, "dog", outside="nothing")
    with pytest.raises(ValueError, match=r"\[H,W,3\]"):
        ug_seg.colors_to_class_map(torch.rand(4, 4))


# ------------------------------------------------------------------------------------------------------- face

@pytest.fixture(scope="module")
def detector():
    if not HAVE_FACENET:
        pytest.skip("facenet-pytorch not installed")
    from guidance.face import build_face_detector
    return build_face_detector()


@pytest.fixture(scope="module")
def face_file(tmp_path_factory):
    if not HAVE_FACENET:
        pytest.skip("facenet-pytorch not installed")
    # The published file's layout, including the 8631-class VGGFace2 classifier the loader drops.
    return write_face_net(str(tmp_path_factory.mktemp("face")))


@needs_facenet
def test_mtcnn_real_weights_find_the_astronauts_face(detector):
    from guidance.face import detect_faces
    (box,) = detect_faces(detector, astronaut())
    assert box is not None
    x0, y0, x1, y1 = box
    # The face in skimage's astronaut (512x512) lies around x 180–270, y 60–175.
    assert 150 < x0 < 210 and 240 < x1 < 300 and 30 < y0 < 100 and 140 < y1 < 200
    assert detect_faces(detector, coffee(256)) == [None]


@needs_facenet
def test_face_reference_without_a_face_is_rejected(face_file, detector):
    from guidance.face import FaceLoss, load_face_model
    model = load_face_model(face_file)
    with pytest.raises(ValueError, match="no face found in the reference image"):
        FaceLoss(model, coffee(), detector=detector)
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        FaceLoss(model, torch.rand(1, 160, 160, 3), detector=detector)
    with pytest.raises(ValueError, match="'l1' or 'cosine'"):
        FaceLoss(model, astronaut(), detector=detector, loss="l2")


@needs_facenet
@pytest.mark.parametrize("kind", ["l1", "cosine"])
def test_face_loss(face_file, detector, kind):
    from guidance.face import FaceLoss, load_face_model
    model = load_face_model(face_file)
    forwards = []
    model.register_forward_hook(lambda *a: forwards.append(1))
    reference = astronaut(256).flip(-1).flip(1)  # mirrored, channels reversed: a different embedding
    loss = FaceLoss(model, reference, detector=detector, loss=kind)
    assert len(forwards) == 1 and loss.reference_embedding.shape == (1, 512)
    image = astronaut(160)
    value, _ = check_loss_and_grad(loss, image)
    assert value.item() > 0
    before, after = descend(loss, image, steps=3, lr=0.01)
    assert after < before
    assert len(forwards) == 1 + 1 + 1 + 3 + 1  # reference once, then one forward per call
    assert loss.report() is None


@needs_facenet
def test_face_missing_in_a_sample_is_skipped_and_reported(face_file, detector):
    from guidance.face import FaceLoss, load_face_model
    loss = FaceLoss(load_face_model(face_file), astronaut(160).flip(-1), detector=detector)
    batch = torch.cat([astronaut(160), coffee((160, 160))])
    value, grad = check_loss_and_grad(loss, batch)
    assert value[0] > 0 and value[1] == 0
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() == 0
    assert loss.report() == "no face found in 1 of 2 evaluations; those steps were not face-guided"
    # A batch without any face still gives a differentiable (zero) loss, so autograd does not fail.
    x = coffee((96, 96)).requires_grad_(True)
    (g,) = torch.autograd.grad(loss(x).sum(), x)
    assert g.abs().sum() == 0
    assert loss.report() == "no face found in 2 of 3 evaluations; those steps were not face-guided"
    loss.reset()
    assert loss.report() is None
    guidance = Guidance().add(GuidanceTerm("face", loss))
    guidance(coffee((96, 96)), 0.0)
    assert guidance.reports() == ["face: no face found in 1 of 1 evaluations; those steps were not face-guided"]


@needs_facenet
def test_face_model_file_mismatch(tmp_path):
    from guidance.face import load_face_model
    path = tmp_path / "not-a-face-model.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError, match="not-a-face-model.pt.*InceptionResnetV1"):
        load_face_model(str(path))


# -------------------------------------------------------------------------------------------------- detection

def test_parse_boxes():
    t = ug_det.parse_boxes("10,20,110,220,Person; 0.5,0.5,1,1,teddy bear\n 0,0,50,50, 18", image_size=(400, 200))
    assert t.labels.tolist() == [1, 88, 18]
    assert t.names() == ["person", "teddy bear", "dog"]
    assert torch.allclose(t.boxes[0], torch.tensor([0.05, 0.05, 0.55, 0.55]))
    assert torch.allclose(t.boxes[1], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    # Boxes scale with the decoded image size.
    assert torch.allclose(t.to_pixels(800, 400)[0], torch.tensor([20.0, 40.0, 220.0, 440.0]))
    # relative=False reads small numbers as pixels.
    t = ug_det.parse_boxes("0,0,1,1,cat", image_size=(64, 64), relative=False)
    assert torch.allclose(t.boxes[0], torch.tensor([0, 0, 1 / 64, 1 / 64]))
    assert len(ug_det.COCO_CATEGORIES) == 91 and ug_det.COCO_CATEGORIES[12] == "N/A"


@pytest.mark.parametrize("text, kwargs, message", [
    ("10,10,50,50,unicorn", {"image_size": (64, 64)}, r"box 1 \('10,10,50,50,unicorn'\): unknown COCO category"),
    ("1,1,5,5,dog; 10,10,50,50,N/A", {"image_size": (64, 64)}, r"box 2 .*unknown COCO category 'N/A'"),
    ("10,10,50,50,12", {"image_size": (64, 64)}, r"box 1 .*id 12 is not a category"),
    ("10,10,50,70,dog", {"image_size": (64, 64)}, r"box 1 .*outside the 64x64 image"),
    ("-1,10,50,50,dog", {"image_size": (64, 64)}, r"box 1 .*outside"),
    ("0.2,0.2,1.5,0.9,dog", {"relative": True}, r"box 1 .*\[0, 1\]"),
    ("50,10,50,40,dog", {"image_size": (64, 64)}, r"box 1 .*empty box"),
    ("0.5,0.6,0.7,0.2,dog", {}, r"box 1 .*empty box"),
    ("10,10,50,50,dog", {}, r"box 1 .*need the image size"),
    ("10,10,50,dog", {"image_size": (64, 64)}, r"box 1 .*expected 'x0,y0,x1,y1,label'"),
    ("a,10,50,50,dog", {"image_size": (64, 64)}, r"box 1 .*must be numbers"),
    ("  ", {}, "no target boxes"),
])
def test_parse_boxes_errors(text, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ug_det.parse_boxes(text, **kwargs)


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory):
    return write_detector(str(tmp_path_factory.mktemp("det")))


def test_detection_loss(detector_file):
    # Full-size Faster R-CNN ResNet50-FPN-v2 (random init) at 64 px, fewer sampled proposals: a CPU-sized test.
    model = ug_det.load_detection_model(detector_file, "cpu", min_size=64, max_size=64,
                                        box_batch_size_per_image=32, rpn_pre_nms_top_n_train=200,
                                        rpn_post_nms_top_n_train=100)
    loss = ug_det.DetectionLoss(model, "0.1,0.2,0.6,0.9,dog; 0.5,0.1,0.95,0.5,person")
    image = smooth_image(2, (64, 64))
    rng = torch.get_rng_state()
    value, _ = check_loss_and_grad(loss, image)
    assert torch.equal(rng, torch.get_rng_state()), "the detector must not consume the global RNG"
    assert not model.training
    loss.reset()
    assert torch.equal(loss(image).detach(), value), "seeded per call: reproducible after reset()"
    before, after = descend(loss, image[:1], steps=3, lr=0.05)
    assert after < before
    # Pixel boxes given for a 128x128 image = the same relative boxes: scaled to any decoded size.
    pixels = ug_det.DetectionLoss(model, "12.8,25.6,76.8,115.2,dog; 64,12.8,121.6,64,person", image_size=(128, 128))
    assert torch.allclose(pixels.target.boxes, loss.target.boxes)
    with_reg = ug_det.DetectionLoss(model, loss.target, box_regression=True)
    assert (with_reg(image).detach() > value).all()
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        loss(torch.rand(3, 64, 64))


def test_detection_loader_reads_safetensors_and_rejects_other_nets(detector_file, tmp_path):
    from safetensors.torch import save_file
    sd = ug_dl.load_state_dict_file(detector_file)
    # torchvision's published file comes from a model whose ResNet body used FrozenBatchNorm2d (no
    # num_batches_tracked buffers); it must still load strictly into the weights=None architecture.
    sd = {k: v for k, v in sd.items() if not (k.startswith("backbone.body.") and k.endswith("num_batches_tracked"))}
    path = tmp_path / "fasterrcnn.safetensors"
    save_file(sd, str(path))
    model = ug_det.load_detection_model(str(path), min_size=64, max_size=64)
    assert model.transform.min_size == (64,) and model.transform.max_size == 64
    with pytest.raises(RuntimeError, match="fasterrcnn.safetensors.*does not fit"):
        ug_seg.load_segmentation_model("fcn_resnet50", str(path))


# ------------------------------------------------------------------------------------------------------ style

def test_style_loss_embedding_and_gram_resnet(tiny_rn_file):
    name, path = tiny_rn_file
    model = ug_clip.load_clip(name, path)
    image_calls = count_calls(model, "encode_image")
    style = smooth_image(1, (80, 64), seed=5)
    loss = ug_style.StyleLoss(model, style, gram_weight=1.0)
    assert len(image_calls) == 1
    assert loss.gram_layers == ["layer1", "layer2", "layer3", "layer4"]
    assert [g.shape[-1] for g in loss.style_grams] == [32, 64, 128, 256]
    image = smooth_image(2, (64, 64), seed=6)
    value, _ = check_loss_and_grad(loss, image)
    before, after = descend(loss, image, steps=5, lr=0.03)
    assert after < before
    assert len(image_calls) == 1 + 1 + 1 + 5 + 1, "the style embedding must be computed once"
    # The style image itself scores the minimum of the embedding term: -1.
    only_embed = ug_style.StyleLoss(model, style)
    assert abs(only_embed(style).item() + 1) < 1e-4


def test_style_loss_gram_on_vit_tokens(tiny_vit_file):
    name, path, _ = tiny_vit_file
    model = ug_clip.load_clip(name, path)
    loss = ug_style.StyleLoss(model, smooth_image(1, (32, 32), seed=2), embed_weight=0.0, gram_weight=1.0,
                              cutouts=2)
    assert loss.gram_layers == ["transformer.resblocks.0", "transformer.resblocks.1"]
    check_loss_and_grad(loss, smooth_image(2, (40, 40), seed=3))


def test_style_bad_inputs(tiny_vit_file):
    name, path, _ = tiny_vit_file
    model = ug_clip.load_clip(name, path)
    with pytest.raises(ValueError, match=r"style image must be .*\[B,3,H,W\]"):
        ug_style.StyleLoss(model, torch.rand(32, 32, 3))
    with pytest.raises(ValueError, match="not both 0"):
        ug_style.StyleLoss(model, torch.rand(1, 3, 32, 32), embed_weight=0.0)
    with pytest.raises(ValueError, match="no layer 'layer9'"):
        ug_style.StyleLoss(model, torch.rand(1, 3, 32, 32), gram_weight=1.0, gram_layers=["layer9"])


# ------------------------------------------------------------------------------------------- all five together

def test_terms_built_under_inference_mode_still_differentiate(tiny_vit_file, lraspp_file):
    # ComfyUI runs nodes under torch.inference_mode(): embeddings/targets made there must not be inference tensors.
    name, path, _ = tiny_vit_file
    with torch.inference_mode():
        model = ug_clip.load_clip(name, path)
        terms = [ug_clip.CLIPTextLoss(model, "a cat"),
                 ug_style.StyleLoss(model, torch.rand(1, 3, 32, 32), gram_weight=1.0),
                 ug_seg.SegmentationLoss(ug_seg.load_segmentation_model("lraspp_mobilenet_v3_large", lraspp_file),
                                         torch.ones(1, 16, 16, dtype=torch.long), input_size=32)]
    for term in terms:
        check_loss_and_grad(term, smooth_image(1, (32, 32)))


# --------------------------------------------------------------------------------------------------- download

def test_ensure_file_downloads_atomically(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"weights" * 1000)
    import hashlib
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    target = tmp_path / "models" / "sub" / "net.bin"
    assert ug_dl.ensure_file(str(target), source.as_uri(), progress=False, sha256=digest[:8]) == str(target)
    assert target.read_bytes() == source.read_bytes()
    # Present: returned as is, nothing fetched.
    assert ug_dl.ensure_file(str(target), "http://127.0.0.1:9/never", progress=False) == str(target)
    # Corrupt download: error, nothing left behind.
    bad = tmp_path / "models" / "bad.bin"
    with pytest.raises(RuntimeError, match="corrupt"):
        ug_dl.ensure_file(str(bad), source.as_uri(), progress=False, sha256="deadbeef")
    assert sorted(os.listdir(tmp_path / "models")) == ["sub"]


def test_ensure_file_network_failure_names_file_folder_and_url(tmp_path):
    target = tmp_path / "clip" / "ViT-B-32.pt"
    url = "http://127.0.0.1:9/clip/ViT-B-32.pt"
    with pytest.raises(RuntimeError) as info:
        ug_dl.ensure_file(str(target), url, progress=False, timeout=5)
    message = str(info.value)
    assert "'ViT-B-32.pt'" in message and str(tmp_path / "clip") in message and url in message
    assert not (tmp_path / "clip").exists(), "offline, nothing may be created"


@pytest.mark.parametrize("error, cause", [
    (lambda: __import__("urllib.error").error.URLError(TimeoutError()), "timed out"),
    (lambda: TimeoutError(), "timed out"),
    (lambda: ConnectionResetError(), "ConnectionResetError"),
    (lambda: __import__("http.client").client.RemoteDisconnected(), "RemoteDisconnected"),
    (lambda: __import__("urllib.error").error.URLError(OSError(-2, "Name or service not known")),
     "Name or service not known"),
    (lambda: __import__("urllib.error").error.HTTPError("u", 404, "Not Found", {}, None), "HTTP 404 Not Found"),
])
def test_download_error_keeps_its_cause_and_names_the_url_once(tmp_path, monkeypatch, error, cause):
    """An exception without text (a bare timeout, a dropped connection) is still explained, never as '()', and
    the URL appears once, in the instruction to fetch it by hand."""
    import urllib.request
    url = "https://example.invalid/models/net.pth"

    def offline(*args, **kwargs):
        raise error()

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError) as info:
        ug_dl.ensure_file(str(tmp_path / "net.pth"), url, progress=False)
    message = str(info.value)
    assert cause in message and "()" not in message and ": ;" not in message, message
    assert message.count(url) == 1 and "by hand" in message, message


def test_weight_file_table_matches_the_installed_libraries():
    import open_clip
    from torchvision.models import detection, segmentation
    table = ug_dl.WEIGHT_FILES
    expected = {
        segmentation.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.url,
        segmentation.DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1.url,
        segmentation.FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.url,
        segmentation.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1.url,
        detection.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1.url,
    } | {open_clip.get_pretrained_url(a, "openai") for a in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50")}
    urls = {e.url for e in table.values()}
    assert expected <= urls
    assert len(urls - expected) == 1  # + the VGGFace2 InceptionResnetV1
    for name, entry in table.items():
        assert name == os.path.basename(entry.url) and entry.url.startswith("https://")
        if entry.kind in ("clip", "segmentation", "detection"):
            assert len(entry.sha256_prefix) >= 8
    assert "20180402-114759-vggface2.pt" in table
    if HAVE_FACENET:
        import inspect

        from facenet_pytorch.models import inception_resnet_v1
        assert table["20180402-114759-vggface2.pt"].url in inspect.getsource(inception_resnet_v1)
    with pytest.raises(ValueError, match="unknown weight file"):
        ug_dl.ensure_weight_file("nope.pt", "/tmp")


def test_load_state_dict_file_rejects_non_state_dicts(tmp_path):
    path = tmp_path / "opt.pt"
    torch.save({"lr": 0.1, "steps": [1, 2]}, path)
    with pytest.raises(RuntimeError, match="opt.pt.*state dict"):
        ug_dl.load_state_dict_file(str(path))
    arr = tmp_path / "numpy.pt"
    torch.save({"w": np.zeros(3)}, arr)
    with pytest.raises(RuntimeError, match="numpy.pt"):
        ug_dl.load_state_dict_file(str(arr))
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        ug_dl.load_state_dict_file(str(tmp_path / "absent.pt"))
