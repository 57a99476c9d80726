"""What a GPU changes, forced on the CPU: tensors on another device than the CPU, and autocast.

* Another device: self-guidance's maps live where the denoiser runs. ``meta`` tensors stand in for CUDA: any tensor
  the engine makes on the CPU and combines with them raises ``Tensor on device cpu is not on the expected device``.
* Autocast: on CUDA every image term's loss runs under ``torch.autocast`` (bf16 where the GPU has it, else fp16;
  ``nodes/guided_calls.py``). CPU autocast in the same dtypes runs the same region: each guidance network's loss
  must give a finite loss and gradient there, close to its fp32 value, and MTCNN's face detection stays in fp32.

The networks are the random-weight architectures of ``random_networks`` (MTCNN with its real shipped weights).
"""
from __future__ import annotations

import pytest
import torch

from guidance import clip as ug_clip
from guidance import detection as ug_det
from guidance import segmentation as ug_seg
from guidance import selfguidance as sg
from guidance import style as ug_style
from guidance.image import ImageLoss
import random_networks as rn  # noqa: E402
from random_networks import astronaut, smooth_image

try:
    import facenet_pytorch  # noqa: F401
    HAVE_FACENET = True
except ImportError:
    HAVE_FACENET = False

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny tensors: one intra-op thread is faster on a small shared CPU. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------- self-guidance devices

def meta_internals(batch=2, side=8, tokens=77):
    maps = {name: torch.empty(batch, side, side, tokens, device="meta") for name in ("down.0", "up.1", "up.2")}
    return sg.Internals(maps, torch.empty(batch, 4, side, side, device="meta"))


@pytest.mark.parametrize("layers", [None, ["down.0", "up.2"], sg.AUTO])
def test_heat_map_on_the_maps_device(layers):
    heat = sg.heat_map(meta_internals(), [1, 2], layers, (16, 16))
    assert heat.device.type == "meta" and heat.shape == (2, 16, 16) and heat.dtype == torch.float32


@pytest.mark.parametrize("layers", [None, sg.AUTO])
@pytest.mark.parametrize("make", [
    lambda: sg.MoveLoss([1, 2], target=(0.2, 0.7)),
    lambda: sg.MoveLoss([1], shift=(0.1, -0.1), reference=sg.ORIGINAL),
    lambda: sg.ResizeLoss([1], factor=1.5),
    lambda: sg.ResizeLoss([1], target=0.3),
    lambda: sg.KeepShapeLoss([1]),
    lambda: sg.AppearanceLoss([1], reference_tokens=[3, 4]),
], ids=["move-to", "move-by", "resize-by", "resize-to", "keep-shape", "appearance"])
def test_self_guidance_losses_on_the_maps_device(make, layers):
    loss = make().bound(layers=layers) if layers else make()
    internals = meta_internals()
    value = loss(internals, internals)
    assert value.device.type == "meta" and value.shape == (2,)


# ------------------------------------------------------------------------------- guidance networks, autocast

def under_autocast(loss_fn, image, dtype):
    """``loss_fn(image)`` under CPU autocast in ``dtype`` as the CUDA path runs it (loss back in fp32), with the
    gradient w.r.t. the image; both checked finite, the gradient non-zero."""
    if hasattr(loss_fn, "reset"):
        loss_fn.reset()
    x = image.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        value = loss_fn(x).float()
    assert value.shape == (image.shape[0],)
    assert torch.isfinite(value).all(), value
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert grad.dtype == image.dtype and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    return value.detach()


def fp32_value(loss_fn, image):
    if hasattr(loss_fn, "reset"):
        loss_fn.reset()
    with torch.no_grad():
        return loss_fn(image).float()


def assert_close_to_fp32(value, reference):
    """Half-precision networks give the fp32 loss within a few per cent (measured: within 2 %)."""
    assert torch.allclose(value, reference, rtol=0.05, atol=1e-3), (value, reference)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    name, path = rn.write_tiny_clip(str(tmp_path_factory.mktemp("clip")))
    return ug_clip.load_clip(name, path)


@pytest.fixture(scope="module")
def face_loss(tmp_path_factory):
    if not HAVE_FACENET:
        pytest.skip("facenet-pytorch not installed (pip install --no-deps facenet-pytorch==2.6.0)")
    from guidance.face import FaceLoss, build_face_detector, load_face_model
    model = load_face_model(rn.write_face_net(str(tmp_path_factory.mktemp("face"))))
    return FaceLoss(model, astronaut(256).flip(-1), detector=build_face_detector())


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_face_loss_under_autocast(face_loss, dtype):
    """facenet-pytorch turns MTCNN's outputs into NumPy arrays: under bf16 autocast that raised ``TypeError: Got
    unsupported ScalarType BFloat16``. Detection runs in fp32, so it finds the same box as without autocast."""
    from guidance.face import detect_faces
    image = astronaut(160)
    reference = fp32_value(face_loss, image)
    value = under_autocast(face_loss, image, dtype)
    assert face_loss.report() is None, "the face must be found under autocast as in fp32"
    assert_close_to_fp32(value, reference)
    boxes = detect_faces(face_loss.detector, image)
    with torch.autocast("cpu", dtype=dtype):
        assert detect_faces(face_loss.detector, image) == boxes
        assert torch.is_autocast_enabled("cpu")  # switched off for the detection only


@pytest.fixture(scope="module")
def segmentation_model(tmp_path_factory):
    path = rn.write_lraspp(str(tmp_path_factory.mktemp("seg")))
    return ug_seg.load_segmentation_model("lraspp_mobilenet_v3_large", path, "cpu")


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_segmentation_loss_under_autocast(segmentation_model, dtype):
    model = segmentation_model
    target = torch.zeros(1, 32, 32, dtype=torch.long)
    target[:, 8:28, 6:20] = ug_seg.voc_class_index("dog")
    loss = ug_seg.SegmentationLoss(model, target, input_size=64)
    image = smooth_image(1, (32, 32))
    assert_close_to_fp32(under_autocast(loss, image, dtype), fp32_value(loss, image))


@pytest.fixture(scope="module")
def detection_model(tmp_path_factory):
    return ug_det.load_detection_model(rn.write_detector(str(tmp_path_factory.mktemp("det"))), "cpu",
                                       min_size=64, max_size=64, box_batch_size_per_image=32,
                                       rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_detection_loss_under_autocast(detection_model, dtype):
    """Faster R-CNN's training losses: anchors, box coding, proposal sampling, NMS and RoIAlign under autocast."""
    for box_regression in (False, True):
        loss = ug_det.DetectionLoss(detection_model, "0.1,0.2,0.6,0.9,dog; 0.5,0.1,0.95,0.5,person",
                                    box_regression=box_regression)
        image = smooth_image(1, (64, 64))
        assert_close_to_fp32(under_autocast(loss, image, dtype), fp32_value(loss, image))


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_clip_style_and_image_losses_under_autocast(tiny_clip, dtype):
    image = smooth_image(1, (32, 32))
    losses = [ug_clip.CLIPTextLoss(tiny_clip, "a cat"),
              ug_style.StyleLoss(tiny_clip, smooth_image(1, (32, 32), seed=2), gram_weight=1.0),
              ImageLoss(smooth_image(1, (32, 32), seed=3))]
    for loss in losses:
        assert_close_to_fp32(under_autocast(loss, image, dtype), fp32_value(loss, image))
