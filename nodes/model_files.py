"""Model files of the guidance networks: folders registered with ComfyUI's ``folder_paths``, lookup, download.

Folders (under ``ComfyUI/models/``, extendable with ``extra_model_paths.yaml`` using the same keys):

=================== ===================================== ==========================================
key                 default folder                        what goes there
=================== ===================================== ==========================================
``ug_clip``         ``models/universal_guidance/clip``    open_clip / OpenAI CLIP checkpoints
``ug_segmentation`` ``models/universal_guidance/segmentation``  torchvision segmentation weights
``ug_face``         ``models/universal_guidance/face``    InceptionResnetV1 (VGGFace2) weights
``ug_detection``    ``models/universal_guidance/detection``  torchvision Faster R-CNN v2 weights
=================== ===================================== ==========================================

A standard file (see ``guidance.download.WEIGHT_FILES``) that is missing is downloaded into the first folder of
its key on first use — never at import — and an offline machine gets an error naming the file and the folder.
"""
from __future__ import annotations

import os

import folder_paths

from ..guidance.download import WEIGHT_FILES, ensure_weight_file, weight_files
from .comfy_bridge import GuidanceInputError

EXTENSIONS = {".safetensors", ".pt", ".pth", ".bin", ".ckpt"}
FOLDERS = {
    "ug_clip": ("clip", os.path.join("universal_guidance", "clip")),
    "ug_segmentation": ("segmentation", os.path.join("universal_guidance", "segmentation")),
    "ug_face": ("face", os.path.join("universal_guidance", "face")),
    "ug_detection": ("detection", os.path.join("universal_guidance", "detection")),
}


def register_folders() -> None:
    """Add our folder keys to ``folder_paths`` (idempotent; keeps paths added by extra_model_paths.yaml)."""
    for key, (_, sub) in FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, sub)
        entry = folder_paths.folder_names_and_paths.get(key)
        if entry is None:
            folder_paths.folder_names_and_paths[key] = ([default], set(EXTENSIONS))
        else:
            paths, extensions = entry[0], entry[1]
            if default not in paths:
                paths.append(default)
            extensions.update(EXTENSIONS)


def choices(key: str) -> list:
    """Standard files of this kind (downloaded on first use) plus every file found in the key's folders."""
    kind = FOLDERS[key][0]
    names = [e.name for e in weight_files(kind)]
    try:
        local = folder_paths.get_filename_list(key)
    except Exception:
        local = []
    return names + sorted(n for n in local if n not in names)


def folder_of(key: str) -> str:
    return folder_paths.get_folder_paths(key)[0]


def resolve(key: str, name: str, node: str, input_name: str) -> str:
    """Full path of ``name``; downloads a standard file that is missing. Errors name node, input, file, folder."""
    path = folder_paths.get_full_path(key, name)
    if path:
        return path
    folders = folder_paths.get_folder_paths(key)
    if name in WEIGHT_FILES:
        try:
            return ensure_weight_file(name, folders[0])
        except RuntimeError as e:
            raise GuidanceInputError(f"{node}: input '{input_name}': {e}") from None
    raise GuidanceInputError(
        f"{node}: input '{input_name}': the file {name!r} is not in {' or '.join(map(repr, folders))}; "
        f"put it there (or choose another file) and refresh the page")


register_folders()
