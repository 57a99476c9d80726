"""Randomly initialised guidance networks of the real architectures, written in the real file formats.

Shared by the network unit tests and the ComfyUI integration tests. BatchNorm statistics are calibrated on a few
real images (weights stay random): without that a random deep net maps every input to almost the same output.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import torch
import torch.nn.functional as F


def smooth_image(batch, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 8, 8, generator=g)
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def perturb_(model, scale=0.2, seed=0):
    """Give a freshly initialised network non-trivial weights (e.g. zero-initialised residual BNs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            spread = float(p.std()) if p.numel() > 1 else 0.0
            p.add_(torch.randn(p.shape, generator=g) * scale * (spread if spread > 0 else 1.0))
    return model


def astronaut(size=None):
    from skimage import data
    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    return img if size is None else F.interpolate(img, size=size, mode="bilinear", antialias=True)


def coffee(size=None):
    from skimage import data
    img = torch.from_numpy(data.coffee()).permute(2, 0, 1)[None].float() / 255
    return img if size is None else F.interpolate(img, size=size, mode="bilinear", antialias=True)


def calibrate_bn_(model, forward, images):
    """Data-dependent BatchNorm statistics for a randomly initialised net (weights stay random): without them a
    random deep net maps every input to almost the same output, and descent tests measure rounding noise."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        forward(images)
    model.eval()
    return model


def calibration_images(size):
    return torch.cat([smooth_image(4, size, seed=9), coffee(size), astronaut(size)])


TINY_VIT = "UG-tiny-ViT"
TINY_RN = "UG-tiny-RN"

_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
_TINY_CONFIGS = {
    "vit": {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": _TEXT_CFG},
    "resnet": {"embed_dim": 32,
               "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16,
                              "patch_size": None},
               "text_cfg": _TEXT_CFG},
}
_config_dir: Optional[str] = None


def register_tiny_clip_config(name: Optional[str] = None, *, vision: str = "vit") -> str:
    """Register a tiny open_clip architecture and return its name (idempotent).

    ``vision="vit"`` → ``"UG-tiny-ViT"``: ViT, width 32, 2 layers, 32×32 images, patch 8. ``vision="resnet"`` →
    ``"UG-tiny-RN"``: open_clip's ModifiedResNet (the RN50 family) with one block per stage, width 8, 64×64
    images. Both share a 2-layer, width-32 text tower with the standard vocabulary (49408) and context (77), so
    ``open_clip.get_tokenizer(name)`` is the usual offline BPE tokenizer. The config is written as JSON to a
    temporary folder and registered with ``open_clip.add_model_config``; afterwards
    ``open_clip.create_model(name)`` and ``guidance.clip.load_clip(name, ...)`` work in this process.
    """
    global _config_dir
    import open_clip

    if vision not in _TINY_CONFIGS:
        raise ValueError(f"vision must be 'vit' or 'resnet', got {vision!r}")
    name = name or (TINY_VIT if vision == "vit" else TINY_RN)
    cfg = _TINY_CONFIGS[vision]
    if name in open_clip.list_models():
        if open_clip.get_model_config(name) == cfg:
            return name
    if _config_dir is None:
        _config_dir = tempfile.mkdtemp(prefix="ug_open_clip_configs_")
    path = os.path.join(_config_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    open_clip.add_model_config(path)
    return name


def write_tiny_clip(folder: str, vision: str = "vit", seed: int = 0) -> tuple:
    """A tiny open_clip model (registered config) saved as ``<arch>-random.safetensors``: ``(arch, path)``."""
    import open_clip
    from safetensors.torch import save_file

    name = register_tiny_clip_config(vision=vision)
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    if vision != "vit":
        from guidance.preprocess import CLIP_MEAN, CLIP_STD, normalize
        perturb_(model, scale=0.5)
        calibrate_bn_(model, lambda x: model.encode_image(normalize(x, CLIP_MEAN, CLIP_STD)),
                      calibration_images((64, 64)))
    path = os.path.join(folder, f"{name}-random.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return name, path


def write_lraspp(folder: str, seed: int = 0) -> str:
    from guidance import segmentation as ug_seg
    from guidance.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize
    torch.manual_seed(seed)
    model = ug_seg.build_segmentation_model("lraspp_mobilenet_v3_large")
    calibrate_bn_(model, lambda x: model(normalize(x, IMAGENET_MEAN, IMAGENET_STD)), calibration_images((96, 96)))
    path = os.path.join(folder, "lraspp_mobilenet_v3_large-random.pth")
    torch.save(model.state_dict(), path)
    return path


def write_face_net(folder: str, seed: int = 0, name: str = "20180402-114759-vggface2.pt") -> str:
    """InceptionResnetV1 with the published file's layout (incl. the 8631-class classifier)."""
    from guidance.face import build_face_model, standardize
    torch.manual_seed(seed)
    model = build_face_model()
    crops = torch.cat([astronaut(200)[..., i:i + 160, j:j + 160] for i in (0, 40) for j in (0, 40)])
    calibrate_bn_(model, lambda x: model(standardize(x)), torch.cat([crops, calibration_images((160, 160))]))
    sd = dict(model.state_dict())
    sd["logits.weight"] = torch.randn(8631, 512) * 0.01
    sd["logits.bias"] = torch.zeros(8631)
    path = os.path.join(folder, name)
    torch.save(sd, path)
    return path


def write_detector(folder: str, seed: int = 0) -> str:
    from guidance import detection as ug_det
    torch.manual_seed(seed)
    model = ug_det.build_detection_model()
    path = os.path.join(folder, "fasterrcnn_resnet50_fpn_v2-random.pth")
    torch.save(model.state_dict(), path)
    return path


class _MarkerOnLoad(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` — run by ``torch.jit.load`` — writes a file (8 bytes 'A')."""

    def __init__(self, marker: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))
        self.marker = marker

    def forward(self, x):
        return x + self.weight

    @torch.jit.export
    def __getstate__(self):
        return (self.weight, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]):
        written = torch.from_file(state[1], True, 8, dtype=torch.uint8)
        written.fill_(65)
        self.weight = state[0] + written.sum() * 0
        self.marker = state[1]
        self.training = state[2]


def write_code_running_archive(path: str, marker: str) -> str:
    """A crafted TorchScript archive: loading it with ``torch.jit.load`` creates ``marker``."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_MarkerOnLoad(marker)), path)
    return path


def write_taesd(folder: str, name: str = "taesd", latent_channels: int = 4, seed: int = 0) -> tuple:
    """Random-weight TAESD encoder and decoder (ComfyUI's own ``comfy.taesd`` modules, full size) saved as
    ``<name>_encoder.safetensors`` / ``<name>_decoder.safetensors``, the files the stock VAELoader pairs up."""
    import inspect

    from safetensors.torch import save_file

    from comfy.taesd import taesd
    torch.manual_seed(seed)
    kw = {"latent_channels": latent_channels} if "latent_channels" in inspect.signature(taesd.Encoder).parameters \
        else {}
    os.makedirs(folder, exist_ok=True)
    paths = []
    for part, build in (("encoder", taesd.Encoder), ("decoder", taesd.Decoder)):
        with torch.inference_mode(False):
            net = build(**kw)  # ComfyUI's ops leave the weights uninitialised: He-initialise them here
        g = torch.Generator().manual_seed(seed * 2 + (part == "decoder"))
        sd = {}
        for k, v in net.state_dict().items():
            if v.dim() > 1:
                fan_in = v[0].numel()
                sd[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
            else:
                sd[k] = torch.zeros(v.shape)
        if part == "decoder":  # a small output layer around mid-grey keeps the random image inside [0, 1]
            last = list(sd)[-2:]
            sd[last[0]] = sd[last[0]] * 0.008
            sd[last[1]] = torch.full_like(sd[last[1]], 0.4)
        path = os.path.join(folder, f"{name}_{part}.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
        paths.append(path)
    return tuple(paths)
