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

Every models root ComfyUI knows gets these folders: ``folder_paths.models_dir`` and the parent of every folder
registered under a standard name (``checkpoints``, ``vae``, …, or ``universal_guidance`` itself), so a root added
by ``extra_model_paths.yaml`` or the headless tools' ``--models DIR`` lists ``DIR/universal_guidance/<kind>/`` too.
The lists are refreshed whenever a node lists or resolves its files (roots may be added after the pack loads).

A standard file (see ``guidance.download.WEIGHT_FILES``) that is missing is downloaded into the folder of its
key under ``folder_paths.models_dir`` (the user's models folder) on first use — never at import — and an offline
machine gets an error naming the file and that folder, and creates nothing.
"""
from __future__ import annotations

import os

import folder_paths

from ..guidance.download import WEIGHT_FILES, ensure_weight_file, weight_files
from .errors import GuidanceInputError

EXTENSIONS = {".safetensors", ".pt", ".pth", ".bin", ".ckpt"}
FOLDERS = {
    "ug_clip": ("clip", os.path.join("universal_guidance", "clip")),
    "ug_segmentation": ("segmentation", os.path.join("universal_guidance", "segmentation")),
    "ug_face": ("face", os.path.join("universal_guidance", "face")),
    "ug_detection": ("detection", os.path.join("universal_guidance", "detection")),
}


UG_ROOT = "universal_guidance"
# Folder names whose parent is a models root (ComfyUI's layout).
_ROOT_MARKERS = {"checkpoints", "vae", "loras", "clip", "text_encoders", "unet", "diffusion_models", "embeddings",
                 "controlnet", "upscale_models", "vae_approx", "clip_vision", UG_ROOT}


def models_roots() -> list:
    """``folder_paths.models_dir`` first, then the parent of every registered folder with a standard name."""
    roots = [os.path.normpath(folder_paths.models_dir)]
    for key, entry in list(folder_paths.folder_names_and_paths.items()):
        if key in FOLDERS:
            continue
        for path in entry[0]:
            path = os.path.normpath(path)
            if os.path.basename(path) in _ROOT_MARKERS and os.path.dirname(path) not in roots:
                roots.append(os.path.dirname(path))
    return roots


def register_folders() -> None:
    """Add our folder keys to ``folder_paths`` for every models root (idempotent; keeps paths added by
    extra_model_paths.yaml)."""
    roots = models_roots()
    for key, (_, sub) in FOLDERS.items():
        wanted = [os.path.join(root, sub) for root in roots]
        entry = folder_paths.folder_names_and_paths.get(key)
        if entry is None:
            folder_paths.folder_names_and_paths[key] = (wanted, set(EXTENSIONS))
            continue
        paths, extensions = entry[0], entry[1]
        for path in wanted:
            if path not in paths:
                paths.append(path)
        extensions.update(EXTENSIONS)


def choices(key: str) -> list:
    """Standard files of this kind (downloaded on first use) plus every file found in the key's folders."""
    register_folders()
    kind = FOLDERS[key][0]
    names = [e.name for e in weight_files(kind)]
    try:
        local = folder_paths.get_filename_list(key)
    except Exception:
        local = []
    return names + sorted(n for n in local if n not in names)


def download_folder(key: str) -> str:
    """Where a missing standard file is downloaded to: the key's folder in the user's models folder."""
    return os.path.join(folder_paths.models_dir, FOLDERS[key][1])


def resolve(key: str, name: str, node: str, input_name: str) -> str:
    """Full path of ``name``; downloads a standard file that is missing. Errors name node, input, file, folder."""
    register_folders()
    path = folder_paths.get_full_path(key, name)
    if path:
        return path
    if name in WEIGHT_FILES:
        try:
            return ensure_weight_file(name, download_folder(key))
        except RuntimeError as e:
            raise GuidanceInputError(f"{node}: input '{input_name}': {e}") from None
    raise GuidanceInputError(f"{node}: input '{input_name}': {missing_file(key, name)}")


def missing_file(key: str, name) -> str:
    """What to tell a user whose file ``name`` is not in the folders of ``key``."""
    register_folders()
    folders = folder_paths.get_folder_paths(key)
    return (f"the file {name!r} is not in {' or '.join(map(repr, folders))}; put it there (or choose another "
            f"file) and refresh the page")


register_folders()
