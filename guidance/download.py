"""Weight files of the guidance networks: where to get them, fetching them, and reading them.

Nothing here runs at import time and nothing downloads unless ``ensure_file`` is called.

``WEIGHT_FILES`` lists the standard published files (name → URL). Every URL is copied from the installed library
that publishes it, not guessed:

- open_clip ``pretrained.py`` (``_pcfg(url=...)`` of the ``openai`` tag): OpenAI's CLIP checkpoints. These are
  TorchScript archives, and loading a TorchScript archive runs code stored in it (e.g. a class's ``__setstate__``):
  ``load_state_dict_file`` reads such a file into memory once, hashes those bytes and hands the same bytes to
  ``torch.jit.load`` only when their SHA-256 equals the full hash OpenAI publishes in the URL (so a file swapped
  on disk after the check is never what gets loaded), and refuses every other archive. The CLIP loader switches on
  QuickGELU for them, as open_clip does for the ``openai`` tag.
- torchvision ``models/segmentation/*.py`` (``COCO_WITH_VOC_LABELS_V1``) and ``models/detection/faster_rcnn.py``
  (``FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1``).
- facenet-pytorch ``models/inception_resnet_v1.py`` (``load_weights('vggface2')``): the GitHub release v2.2.9
  file ``20180402-114759-vggface2.pt``.

File names are the URLs' own base names, so a file fetched by hand needs no renaming.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import os
import pickle
import pickletools
import re
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class WeightFile:
    """One published weight file. ``kind``: clip / segmentation / detection / face; ``arch``: the architecture name
    the loaders of this package take for it; ``sha256_prefix``: the hash prefix the publisher embeds in the URL
    (empty when the publisher gives none)."""

    name: str
    url: str
    kind: str
    arch: str
    sha256_prefix: str = ""
    note: str = ""


def _hash_from_url(url: str) -> str:
    """The SHA-256 (prefix) a publisher embeds in its URL: OpenAI's folder name, torch hub's ``name-<hash>.pth``."""
    if "openaipublic" in url:
        return url.rstrip("/").split("/")[-2]
    if "download.pytorch.org" in url:
        stem = os.path.splitext(os.path.basename(url))[0]
        tail = stem.rsplit("-", 1)[-1]
        if len(tail) >= 6 and all(c in "0123456789abcdef" for c in tail):
            return tail
    return ""


def _entry(url: str, kind: str, arch: str, note: str = "") -> WeightFile:
    return WeightFile(os.path.basename(url), url, kind, arch, _hash_from_url(url), note)


WEIGHT_FILES = {e.name: e for e in (
    # open_clip pretrained.py, tag "openai" (quick_gelu=True)
    _entry("https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",  # noqa: E501
           "clip", "ViT-B-32", "OpenAI CLIP ViT-B/32 (TorchScript archive; QuickGELU)"),
    _entry("https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",  # noqa: E501
           "clip", "ViT-B-16", "OpenAI CLIP ViT-B/16 (TorchScript archive; QuickGELU)"),
    _entry("https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",  # noqa: E501
           "clip", "ViT-L-14", "OpenAI CLIP ViT-L/14 (TorchScript archive; QuickGELU)"),
    _entry("https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",  # noqa: E501
           "clip", "RN50", "OpenAI CLIP RN50 (TorchScript archive; QuickGELU); the paper's style network"),
    # torchvision segmentation, COCO_WITH_VOC_LABELS_V1 (21 VOC classes)
    _entry("https://download.pytorch.org/models/deeplabv3_resnet50_coco-cd0a2569.pth",
           "segmentation", "deeplabv3_resnet50"),
    _entry("https://download.pytorch.org/models/deeplabv3_resnet101_coco-586e9e4e.pth",
           "segmentation", "deeplabv3_resnet101"),
    _entry("https://download.pytorch.org/models/fcn_resnet50_coco-1167a1af.pth",
           "segmentation", "fcn_resnet50"),
    _entry("https://download.pytorch.org/models/lraspp_mobilenet_v3_large-d234d4ea.pth",
           "segmentation", "lraspp_mobilenet_v3_large", "the paper's segmentation network"),
    # torchvision detection, FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1
    _entry("https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth",
           "detection", "fasterrcnn_resnet50_fpn_v2", "the paper's detection network"),
    # facenet-pytorch inception_resnet_v1.py, load_weights('vggface2')
    _entry("https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",
           "face", "inception_resnet_v1_vggface2", "InceptionResnetV1 trained on VGGFace2 (the paper's face network)"),
)}


def weight_files(kind: Optional[str] = None) -> list:
    """The entries of ``WEIGHT_FILES`` (of one ``kind`` when given), in table order."""
    return [e for e in WEIGHT_FILES.values() if kind is None or e.kind == kind]


def _manual_hint(path: str, url: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    return (f"download it by hand from {url} and save it as {os.path.basename(path)!r} "
            f"in the folder {folder!r}")


def _cause(e: BaseException) -> str:
    """Why a download failed, in words: the reason inside a ``URLError``, the exception's own text, or (for
    exceptions without text, such as a bare timeout or a dropped connection) what its type means."""
    while isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        if not isinstance(e.reason, BaseException):
            return str(e.reason).strip() or "the URL could not be opened"
        e = e.reason
    if isinstance(e, urllib.error.HTTPError):
        return f"the server answered HTTP {e.code} {e.reason or ''}".strip()
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror
    else:
        text = str(e).strip()
    if text:
        return text
    if isinstance(e, TimeoutError):
        return "the connection timed out"
    if isinstance(e, (ConnectionError, http.client.HTTPException)):
        return f"the connection failed ({type(e).__name__})"
    return type(e).__name__


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_file(path: str, url: str, *, progress: bool = True, sha256: Optional[str] = None,
                timeout: float = 60.0) -> str:
    """Return ``path``, downloading ``url`` to it first if it does not exist.

    The download goes to a temporary file in the same folder and is renamed into place only once complete (and,
    when ``sha256`` — a full hash or a prefix — is given, verified), so an interrupted download never leaves a
    truncated file under the final name. ``progress`` shows a tqdm bar. On any network failure a ``RuntimeError``
    names the exact file name, the folder it must be put in, and the URL to fetch it from by hand.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if os.path.exists(path):
        raise RuntimeError(f"{path!r} exists but is not a regular file; remove it or {_manual_hint(path, url)}")
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)

    def failed(e: Exception) -> RuntimeError:
        return RuntimeError(f"could not download {name!r}: {_cause(e)}; {_manual_hint(path, url)}")

    try:  # connect first: offline, nothing is created on disk
        request = urllib.request.Request(url, headers={"User-Agent": "comfyui-universal-guidance"})
        response = urllib.request.urlopen(request, timeout=timeout)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        raise failed(e) from e
    fd = tmp = None
    try:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise RuntimeError(f"cannot create the folder {folder!r} for {name!r} ({e}); "
                               f"{_manual_hint(path, url)}") from e
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
        try:
            with response, os.fdopen(fd, "wb") as out:
                fd = None
                total = response.headers.get("Content-Length")
                total = int(total) if total and total.isdigit() else None
                bar = None
                if progress:
                    try:
                        from tqdm.auto import tqdm
                        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name)
                    except ImportError:  # tqdm is optional
                        bar = None
                try:
                    while True:
                        chunk = response.read(1 << 20)
                        if not chunk:
                            break
                        out.write(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                finally:
                    if bar is not None:
                        bar.close()
            if total is not None and os.path.getsize(tmp) != total:
                raise OSError(f"incomplete download: got {os.path.getsize(tmp)} of {total} bytes")
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            raise failed(e) from e
        if sha256:
            digest = _sha256(tmp)
            if not digest.startswith(sha256.lower()):
                raise RuntimeError(
                    f"the download of {name!r} from {url} is corrupt (SHA-256 {digest[:16]}… does not start with "
                    f"{sha256[:16]}); try again or {_manual_hint(path, url)}")
        os.replace(tmp, path)
        tmp = None
    finally:
        response.close()
        if fd is not None:
            os.close(fd)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


def ensure_weight_file(name: str, folder: str, *, progress: bool = True) -> str:
    """``ensure_file`` for an entry of ``WEIGHT_FILES``: ``folder/name``, hash-checked when the URL carries one."""
    if name not in WEIGHT_FILES:
        raise ValueError(f"unknown weight file {name!r}; known: {', '.join(WEIGHT_FILES)}")
    entry = WEIGHT_FILES[name]
    return ensure_file(os.path.join(folder, name), entry.url, progress=progress, sha256=entry.sha256_prefix or None)


# ----------------------------------------------------------------------------------------------- reading files

def is_torchscript_archive(path: str) -> bool:
    """True for a TorchScript archive (e.g. OpenAI's CLIP ``.pt`` files), which ``torch.load`` cannot read safely."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


# Extra trusted TorchScript files, full SHA-256 → name. Empty in use; tests add the hash of an archive they wrote.
EXTRA_TRUSTED_TORCHSCRIPT: dict = {}


def trusted_torchscript() -> dict:
    """Full SHA-256 → file name of the TorchScript archives that may be loaded (OpenAI's CLIP files)."""
    table = {e.sha256_prefix: e.name for e in WEIGHT_FILES.values()
             if e.url.endswith(".pt") and e.kind == "clip" and len(e.sha256_prefix) == 64}
    table.update(EXTRA_TRUSTED_TORCHSCRIPT)
    return table


def file_sha256(path: str) -> str:
    """SHA-256 of a file's current content (hashed afresh on every call: nothing is remembered)."""
    return _sha256(path)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _one_line(text, limit: int = 200) -> str:
    """A library's error text made fit for one line of a UI message: ANSI escapes removed, the first non-empty
    line only, sentences advising ``weights_only`` dropped (this package never loads with it off), shortened."""
    text = _ANSI.sub("", str(text))
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    sentences = [x for x in re.split(r"(?<=[.!?])\s+", line) if x and "weights_only" not in x]
    line = " ".join(sentences) or "unreadable file"
    return line if len(line) <= limit else line[:limit - 1].rstrip() + "…"


def _replace_hint(name: str, folder: str) -> str:
    """What to do with a file under a standard name that is not the published file."""
    entry = WEIGHT_FILES[name]
    return (f"Delete it from {folder!r} and download the published file again from {entry.url} (the nodes "
            f"download a missing standard file by themselves)")


def _untrusted_torchscript(path: str, digest: str) -> RuntimeError:
    name = os.path.basename(path)
    folder = os.path.dirname(os.path.abspath(path))
    trusted = trusted_torchscript()
    expected = next((h for h, n in trusted.items() if n == name and len(h) == 64), None)
    if expected is not None and name in WEIGHT_FILES:
        return RuntimeError(
            f"{name!r} is not OpenAI's {name}: SHA-256 mismatch (expected {expected[:16]}…, found {digest[:16]}…). "
            f"It is a TorchScript archive, and loading one runs code stored in the file, so it is refused. "
            f"{_replace_hint(name, folder)}")
    standard = ", ".join(sorted(set(trusted.values())))
    return RuntimeError(
        f"{name!r} is a TorchScript archive, and loading one runs code stored in the file, so it is refused. Only "
        f"the standard OpenAI CLIP files ({standard}) are read as TorchScript, after their SHA-256 is checked; this "
        f"file's SHA-256 ({digest[:16]}…) matches none of them. Convert the file to safetensors on a machine where "
        f"you trust it, e.g. python -c \"import torch; from safetensors.torch import save_file; "
        f"sd = torch.jit.load('{name}', map_location='cpu').state_dict(); "
        f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{os.path.splitext(name)[0]}.safetensors')\", "
        f"and select the .safetensors file instead")


def _pickle_globals(path: str, limit: int = 1 << 20) -> list:
    """The Python objects (``module.name``) a pickle file refers to, outside torch's own and ``collections``,
    read by disassembling it (``pickletools``: nothing is executed); best effort, ``[]`` when unreadable."""
    found = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                inner = [n for n in z.namelist() if n.endswith("data.pkl")]
                data = z.read(inner[0])[:limit] if inner else b""
        else:
            with open(path, "rb") as f:
                data = f.read(limit)
        stream = io.BytesIO(data)
        for _ in range(8):  # the legacy torch.save format is several pickles in a row
            if stream.tell() >= len(data):
                break
            strings = []
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 — a damaged or truncated stream: keep what was read
        pass
    return [g for g in found if not g.startswith(("torch.", "collections."))]


def _code_refusal(path: str, error: Exception) -> str:
    """One short line for a ``torch.load`` file that ``weights_only=True`` refused: the file holds more than
    tensors (Python objects, i.e. code run while unpickling) or is not a PyTorch file at all."""
    name = os.path.basename(path)
    found = re.search(r"GLOBAL\s+([\w.]+)", _ANSI.sub("", str(error)))
    what = found.group(1) if found else next(iter(_pickle_globals(path)), None)
    if what:
        what = what if len(what) <= 60 else what[:59] + "…"
        head = (f"{name!r} holds code, not only tensors (loading it would run the Python object {what}), so "
                f"it is refused.")
    else:
        head = f"{name!r} is not a file of tensors only (or it is damaged), so it is refused."
    if name in WEIGHT_FILES:
        return f"{head} It is not the published {name}. {_replace_hint(name, os.path.dirname(os.path.abspath(path)))}"
    return (f"{head} Use a .safetensors file instead: download the .safetensors release of these weights, or "
            f"convert this file on a machine where you trust it (torch.load, then safetensors.torch.save_file)")


def _load_trusted_torchscript(path: str, map_location) -> dict:
    """Read the archive once, hash exactly those bytes, and load exactly those bytes: nothing is read from the
    disk again after the check, so a file swapped in meanwhile (same size, same time stamp or not) is never
    loaded."""
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest not in trusted_torchscript():
        raise _untrusted_torchscript(path, digest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = torch.jit.load(io.BytesIO(data), map_location=map_location)
        except Exception as e:
            raise RuntimeError(f"cannot read the TorchScript archive {path!r}: {_one_line(e)}") from None
    del data
    return {k: v for k, v in module.state_dict().items()}


def load_state_dict_file(path: str, *, map_location="cpu") -> dict:
    """Read a state dict from ``.safetensors``, a ``torch.save`` file (``weights_only=True``: tensors only, no
    arbitrary pickles) or one of the standard OpenAI CLIP TorchScript archives (read once, checked by the SHA-256
    of the bytes read, loaded from those bytes; any other TorchScript archive is refused, since loading one runs
    its code). ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and a ``module.`` prefix (DataParallel) are
    removed. Errors name the file and fit one line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path!r}")
    name = os.path.basename(path)
    with torch.inference_mode(False):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            try:
                sd = load_file(path, device=str(map_location))
            except Exception as e:
                raise RuntimeError(f"cannot read the safetensors file {path!r}: {_one_line(e)}") from None
        elif is_torchscript_archive(path):
            sd = _load_trusted_torchscript(path, map_location)
        else:
            try:
                sd = torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                raise RuntimeError(_code_refusal(path, e)) from None
            except Exception as e:
                if "TorchScript" in str(e):  # became an archive after it was looked at: never load it here
                    raise _untrusted_torchscript(path, file_sha256(path)) from None
                raise RuntimeError(f"cannot read {name!r} as a PyTorch weight file ({_one_line(e, 120)}): it is "
                                   f"damaged or in another format; download it again, or use a .safetensors "
                                   f"file") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RuntimeError(f"{path!r} does not hold a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_into(model: torch.nn.Module, state_dict: dict, path: str, arch: str) -> None:
    """``model.load_state_dict(state_dict)`` strictly, with an error naming the file and the architecture."""
    name = os.path.basename(os.fspath(path)) if path else "state dict"
    with torch.inference_mode(False):
        try:
            result = model.load_state_dict(state_dict, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise RuntimeError(f"{name!r} does not fit the {arch} architecture: {e}") from e
    missing = list(result.missing_keys)
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise RuntimeError(
            f"{name!r} does not fit the {arch} architecture: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
