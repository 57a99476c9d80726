"""Face guidance (Bansal et al. 2023): the identity embedding of the face in the decoded image is pulled towards the
embedding of the face in a reference image.

Pipeline per call: MTCNN (facenet-pytorch, its P/R/O-net weights ship inside the wheel) finds one face per image
*without gradient*, on an 8-bit copy of the decoded image; the face box (plus ``margin``, clamped to the image, as
facenet-pytorch's ``extract_face``) is cropped *differentiably* from the decoded image with
``torchvision.ops.roi_align`` to 160×160; the crop is standardised ``(x·255 − 127.5)/128`` and embedded by
InceptionResnetV1 (VGGFace2). Loss: L1 between embeddings (mean over the 512 dimensions; the paper's loss) or
``1 − cos``.

facenet-pytorch 2.6.0 pins torch<2.3, numpy<2 and Pillow<10.3, which it does not actually need: install it with
``pip install --no-deps facenet-pytorch==2.6.0`` (its import also needs ``requests``). It is imported lazily, so
this module imports without it.

The published InceptionResnetV1 weights are ``20180402-114759-vggface2.pt`` (facenet-pytorch GitHub release
v2.2.9; see ``guidance.download.WEIGHT_FILES``); their 8631-class ``logits`` layer is not needed and is dropped.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .download import load_into, load_state_dict_file
from .objective import NetworkLoss
from .preprocess import rgb_uint8_hwc

FACE_CROP_SIZE = 160
FACENET_INSTALL_HINT = ("face guidance needs facenet-pytorch; install it with "
                        "`pip install --no-deps facenet-pytorch==2.6.0` (plus `pip install requests`); --no-deps "
                        "because its pins (torch<2.3, numpy<2, Pillow<10.3) are not real requirements")


def _facenet():
    try:
        import facenet_pytorch
    except ImportError as e:
        raise ImportError(f"{FACENET_INSTALL_HINT} ({e})") from e
    return facenet_pytorch


def build_face_model() -> torch.nn.Module:
    """A randomly initialised InceptionResnetV1 (embedding mode, 512-d, L2-normalised output)."""
    with torch.inference_mode(False):
        return _facenet().InceptionResnetV1(pretrained=None, classify=False)


def load_face_model(weights_path: Optional[str] = None, device="cpu") -> torch.nn.Module:
    """InceptionResnetV1 with weights from ``weights_path`` (e.g. ``20180402-114759-vggface2.pt``; ``None``: random
    init, for tests), frozen (``eval()``, no parameter grads) on ``device``. A classifier head (``logits.*``) in the
    file is dropped."""
    model = build_face_model()
    if weights_path is not None:
        sd = load_state_dict_file(weights_path)
        sd = {k: v for k, v in sd.items() if not k.startswith("logits.")}
        load_into(model, sd, weights_path, "InceptionResnetV1")
    model.eval().requires_grad_(False)
    with torch.inference_mode(False):
        return model.to(device)


def build_face_detector(device="cpu", **kwargs) -> torch.nn.Module:
    """facenet-pytorch's MTCNN with its shipped weights (one face per image: ``keep_all=False``; the largest face
    first unless ``select_largest=False``). ``kwargs`` go to ``MTCNN`` (e.g. ``min_face_size``, ``thresholds``)."""
    kwargs.setdefault("keep_all", False)
    with torch.inference_mode(False):
        det = _facenet().MTCNN(device=torch.device(device), **kwargs)
    det.eval().requires_grad_(False)
    return det


def autocast_off(device):
    """A context without autocast on ``device``'s type (nothing to switch off where that type has no autocast)."""
    kind = torch.device(device).type
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is not None and not is_available(kind):
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False)


def detect_faces(detector, image: torch.Tensor) -> list:
    """One box ``(x0, y0, x1, y1)`` in pixels (or ``None``) per image of ``image [B,3,H,W]`` in [0, 1].

    Runs without gradient on a rounded 0–255 fp32 copy (what MTCNN was made for), in fp32 even inside an autocast
    region: facenet-pytorch turns the networks' outputs into NumPy arrays (no bf16 there) and picks boxes by
    thresholds and NMS that half precision would shift. Images are detected one at a time (facenet-pytorch's
    batched path stacks ragged NumPy arrays, which newer NumPy rejects).
    """
    pixels = rgb_uint8_hwc(image).to(getattr(detector, "device", image.device)).float()
    boxes = []
    with torch.no_grad(), autocast_off(pixels.device):
        for b in range(pixels.shape[0]):
            found, _ = detector.detect(pixels[b:b + 1])
            box = found[0] if found is not None and len(found) else None
            if box is None or len(box) == 0 or box[0] is None:
                boxes.append(None)
            else:
                boxes.append(tuple(float(v) for v in box[0][:4]))
    return boxes


def crop_faces(image: torch.Tensor, boxes: list, *, size: int = FACE_CROP_SIZE, margin: float = 0.0):
    """Differentiable crops of ``image [B,3,H,W]``: ``(crops [K,3,size,size], indices)`` where ``indices`` are the
    ``K`` images that had a usable box (not ``None``, at least one pixel inside the image), in order.

    ``margin`` is in pixels of the output crop, as in facenet-pytorch (``margin·box_size/(size − margin)`` image
    pixels added around the box); the box is clamped to the image, then bilinearly sampled (``roi_align``,
    adaptive sampling: anti-aliased when shrinking) to ``size × size``.
    """
    from torchvision.ops import roi_align

    h, w = image.shape[-2:]
    rows, indices = [], []
    for b, box in enumerate(boxes):
        if box is None:
            continue
        x0, y0, x1, y1 = box
        mx = margin * (x1 - x0) / (size - margin)
        my = margin * (y1 - y0) / (size - margin)
        x0, y0 = max(x0 - mx / 2, 0.0), max(y0 - my / 2, 0.0)
        x1, y1 = min(x1 + mx / 2, float(w)), min(y1 + my / 2, float(h))
        if x1 - x0 < 1 or y1 - y0 < 1:
            continue
        rows.append([float(b), x0, y0, x1, y1])
        indices.append(b)
    if not rows:
        return image.new_zeros(0, image.shape[1], size, size), indices
    rois = torch.tensor(rows, dtype=image.dtype, device=image.device)
    crops = roi_align(image, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return crops, indices


def standardize(crops: torch.Tensor) -> torch.Tensor:
    """facenet-pytorch's ``fixed_image_standardization`` for images in [0, 1]: ``(x·255 − 127.5)/128``."""
    return (crops * 255.0 - 127.5) / 128.0


class FaceLoss(NetworkLoss):
    """``loss_b = mean|E(face(x_b)) − E(face(reference))|`` (``loss="l1"``, the paper) or
    ``1 − cos(E(face(x_b)), E(face(reference)))`` (``loss="cosine"``).

    ``model``: InceptionResnetV1 (``load_face_model``). ``reference``: ``[B,3,H,W]`` or ``[3,H,W]`` in [0, 1]; a face
    is detected in every reference image (``ValueError`` if one has none) and the embeddings are averaged — once,
    here. ``detector``: an MTCNN (default ``build_face_detector()``). When no face is found in a decoded image,
    that sample's term is 0 with no gradient for that call; ``report()`` counts those evaluations.
    """

    def __init__(self, model: torch.nn.Module, reference: torch.Tensor, *, detector=None, loss: str = "l1",
                 margin: float = 0.0, crop_size: int = FACE_CROP_SIZE, crop: str = "detect"):
        if loss not in ("l1", "cosine"):
            raise ValueError(f"face loss must be 'l1' or 'cosine', got {loss!r}")
        if crop not in ("detect", "full"):
            raise ValueError(f"face crop must be 'detect' (MTCNN) or 'full' (the whole image), got {crop!r}")
        self.crop = crop
        if reference.dim() == 3 and reference.shape[0] == 3:
            reference = reference.unsqueeze(0)
        if reference.dim() != 4 or reference.shape[1] != 3:
            raise ValueError(f"reference image must be an RGB tensor [B,3,H,W] in [0, 1], "
                             f"got shape {tuple(reference.shape)}")
        if not 0 <= margin < crop_size:
            raise ValueError(f"margin must lie in [0, crop_size), got {margin}")
        self.model = model.eval().requires_grad_(False)
        if crop == "full":
            self.detector = None
        else:
            self.detector = detector if detector is not None else build_face_detector(self.device)
        self.kind = loss
        self.margin = float(margin)
        self.crop_size = int(crop_size)
        self.evaluations = 0
        self.misses = 0
        with torch.inference_mode(False), torch.no_grad():
            ref = reference.detach().float().to(self.device)
            boxes = self._boxes(ref)
            missing = [i for i, b in enumerate(boxes) if b is None]
            if missing:
                which = "the reference image" if len(boxes) == 1 else f"reference image(s) {missing}"
                raise ValueError(f"no face found in {which}: face guidance needs a reference photo with a clearly "
                                 f"visible face (MTCNN found none)")
            emb, found = self._embed(ref, boxes)
            if len(found) != len(boxes):
                raise ValueError("the face found in the reference image is too small to crop")
            emb = emb.float()
            emb = torch.nn.functional.normalize(emb.mean(dim=0, keepdim=True), dim=-1)
            self.reference_embedding = emb.clone()  # [1, 512]; a normal tensor even under inference_mode

    def prepare(self, device, dtype: Optional[torch.dtype] = None) -> "FaceLoss":
        device = torch.device(device)
        super().prepare(device, dtype)
        with torch.inference_mode(False):
            if self.detector is not None:
                self.detector.to(device)
        if self.detector is not None:
            self.detector.device = device
        self.reference_embedding = self.reference_embedding.to(device)
        return self

    def reset(self) -> None:
        self.evaluations = 0
        self.misses = 0

    def report(self) -> Optional[str]:
        if self.misses == 0:
            return None
        return (f"no face found in {self.misses} of {self.evaluations} evaluations; "
                f"those steps were not face-guided")

    def _boxes(self, image: torch.Tensor) -> list:
        """MTCNN's box per image, or the whole image in "full" mode (for close-up portraits)."""
        if self.crop == "full":
            h, w = image.shape[-2:]
            return [(0.0, 0.0, float(w), float(h))] * image.shape[0]
        return detect_faces(self.detector, image)

    def _embed(self, image: torch.Tensor, boxes: list):
        crops, found = crop_faces(image.to(self.dtype), boxes, size=self.crop_size, margin=self.margin)
        if not found:
            return None, found
        return self.model(standardize(crops)), found

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"decoded image must be [B,3,H,W], got shape {tuple(image.shape)}")
        if self.device != image.device:
            self.prepare(image.device)
        batch = image.shape[0]
        boxes = self._boxes(image)
        # Samples without a face: 0, still attached to the graph (zero gradient) so autograd never fails.
        loss = image.float().sum(dim=(1, 2, 3)) * 0.0
        emb, found = self._embed(image, boxes)
        self.evaluations += batch
        self.misses += batch - len(found)
        if not found:
            return loss
        emb = emb.float()
        ref = self.reference_embedding.to(emb.device)
        if self.kind == "l1":
            per = (emb - ref).abs().mean(dim=1)
        else:
            per = 1.0 - (emb * ref).sum(dim=1)
        index = torch.tensor(found, device=loss.device)
        return loss.index_add(0, index, per.to(loss.device))
