"""Universal Guidance engine: pure PyTorch, no ComfyUI imports anywhere below this folder."""
from .image import ImageLoss
from .objective import Guidance, GuidanceTerm
from .parameterization import FLOW, VE, Parameterization
from .sampler import Settings, Stats, sample_universal, total_iterations

# The guidance networks are imported on first use (PEP 562), so `import guidance` stays light: their modules pull
# in torchvision / open_clip / facenet-pytorch.
_LAZY = {
    "CLIPTextLoss": "clip", "load_clip": "clip",
    "SegmentationLoss": "segmentation", "load_segmentation_model": "segmentation",
    "colors_to_class_map": "segmentation", "mask_to_class_map": "segmentation",
    "FaceLoss": "face", "load_face_model": "face", "build_face_detector": "face",
    "DetectionLoss": "detection", "load_detection_model": "detection", "parse_boxes": "detection",
    "StyleLoss": "style",
    "ensure_file": "download", "WEIGHT_FILES": "download",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FLOW", "VE", "Guidance", "GuidanceTerm", "ImageLoss", "Parameterization", "Settings", "Stats",
           "sample_universal", "total_iterations", *_LAZY]
