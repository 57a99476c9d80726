"""CLIP text guidance (Bansal et al. 2023): ``loss = −cos(E_img(x), E_txt(prompt))`` on the decoded image.

Models come from open_clip: ``load_clip(arch, weights_path, device)`` builds the architecture without pretrained
weights (``open_clip.create_model(arch, pretrained=None)``: no download) and loads a state dict from a file —
``.safetensors``, a ``torch.save`` file read with ``weights_only=True`` (open_clip checkpoints, also wrapped in
``{"state_dict": ...}``) or one of OpenAI's TorchScript ``.pt`` archives (``guidance.download.WEIGHT_FILES``).
Only architectures built entirely from the file are accepted (``local_clip_archs``): open_clip configs naming a
Hugging Face tokenizer or text tower (``hf_tokenizer_name`` / ``hf_model_name``: RoBERTa, XLM-R, mT5, NLLB,
SigLIP, …) would fetch it from the Hub while the model is built, so they are refused with a message saying so.

Preprocessing is the CLIP one, made differentiable: shorter side bilinearly resized (anti-aliased) to the model's
input size, central crop, CLIP mean/std. Optional "cutouts": ``N`` random square crops of the decoded image (their
geometry from a seeded ``torch.Generator``, so a run is reproducible), each resized to the input size; the loss
is the mean over the crops.

``ClipImageEncoder`` (the differentiable image side) is shared with ``guidance.style``.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional, Sequence, Union

import torch

from .download import is_torchscript_archive, load_into, load_state_dict_file
from .objective import NetworkLoss
from .preprocess import CLIP_MEAN, CLIP_STD, normalize, random_cutouts, resize_center_crop, resize_to

# Keys OpenAI's TorchScript archives carry besides the weights (open_clip drops them the same way).
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def hub_dependencies(arch: str) -> dict:
    """What the open_clip config of ``arch`` takes from the Hugging Face Hub instead of the weight file:
    ``{"tokenizer": name, "text tower": name}`` (each only when the config names it; empty for the architectures
    whose tokenizer is open_clip's bundled BPE and whose towers are all built from the config)."""
    import open_clip

    text_cfg = (open_clip.get_model_config(arch) or {}).get("text_cfg") or {}
    needs = {}
    if text_cfg.get("hf_tokenizer_name"):
        needs["tokenizer"] = str(text_cfg["hf_tokenizer_name"])
    if text_cfg.get("hf_model_name"):
        needs["text tower"] = str(text_cfg["hf_model_name"])
    return needs


def local_clip_archs() -> list:
    """The open_clip architectures (registered ones included) that build from the weight file alone, sorted."""
    import open_clip

    return sorted(a for a in open_clip.list_models() if not hub_dependencies(a))


def _hf_cache_folder() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(home, "hub")


def clip_arch_problem(arch: str) -> Optional[str]:
    """``None`` when ``load_clip`` can build ``arch`` from a weight file alone; else why not and what to pick."""
    import open_clip

    examples = "e.g. ViT-B-32, ViT-B-16, ViT-L-14, RN50 or ViT-H-14"
    if arch not in open_clip.list_models():
        return f"unknown open_clip architecture {arch!r}; choose one of the list ({examples})"
    needs = hub_dependencies(arch)
    if not needs:
        return None
    names = sorted(set(needs.values()))
    parts = " and ".join(sorted(needs, reverse=True))
    return (f"the open_clip architecture {arch!r} takes its {parts} from the Hugging Face model "
            f"{' and '.join(map(repr, names))}, which is not in the weight file: open_clip downloads it into the "
            f"Hugging Face cache ({_hf_cache_folder()}) while building the model, and offline that fails inside "
            f"transformers. CLIP models are built here from the weight file alone, so this architecture is not "
            f"offered; choose one whose tokenizer and text tower come with the file ({examples})")


def load_clip(arch: str, weights_path: Optional[str] = None, device="cpu", *,
              quick_gelu: Optional[bool] = None, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """Build the open_clip architecture ``arch`` (e.g. ``"ViT-B-32"``, ``"RN50"``) and load ``weights_path``.

    ``weights_path=None`` keeps the random initialisation (tests only). ``quick_gelu=None`` decides by the file:
    OpenAI's weights (a TorchScript archive, or a file name containing "openai") were trained with QuickGELU and
    need it, as open_clip's ``openai`` tag sets; other files use the architecture config as it is (an ``arch``
    ending in ``-quickgelu`` already has it). The model is returned frozen (``eval()``, no parameter grads) on
    ``device``; ``model.ug_arch`` records ``arch`` (the tokenizer is looked up by it).
    """
    import open_clip

    problem = clip_arch_problem(arch)
    if problem:
        raise ValueError(problem)
    if weights_path is not None and not os.path.isfile(weights_path):
        raise FileNotFoundError(f"CLIP weight file not found: {weights_path!r}")
    if quick_gelu is None:
        quick_gelu = bool(weights_path) and (
            is_torchscript_archive(weights_path) or "openai" in os.path.basename(weights_path).lower())
    with torch.inference_mode(False), _quiet_open_clip():
        model = open_clip.create_model(arch, pretrained=None, device="cpu", force_quick_gelu=bool(quick_gelu))
        if weights_path is not None:
            sd = load_state_dict_file(weights_path)
            # TorchScript archives also carry OpenAI's ints and non-persistent buffers (e.g. attn_mask).
            transient = set(dict(model.named_buffers())) - set(model.state_dict())
            for key in (*_OPENAI_EXTRA_KEYS, *transient):
                sd.pop(key, None)
            sd = _adapt_open_clip_state_dict(model, sd)
            load_into(model, sd, weights_path, f"open_clip {arch}")
    model.ug_arch = arch
    _freeze(model)
    with torch.inference_mode(False):
        return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_open_clip():
    """Silence open_clip's "initialized randomly" warning: we load the weights ourselves right after."""
    root = logging.getLogger()
    flt = _DropRandomInitWarning()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _adapt_open_clip_state_dict(model, sd: dict) -> dict:
    """The state-dict fix-ups open_clip's own ``load_checkpoint`` applies (format conversions, resizing of
    positional embeddings, scalar/1-d ``logit_scale``), without its file reading."""
    from open_clip import factory as ocf

    try:
        sd = ocf.convert_state_dict(model, sd)
    except Exception:  # noqa: BLE001 — only third-party formats need it
        pass
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = ocf.convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        param = getattr(model, key, None)
        if key in sd and param is not None and param.ndim != sd[key].ndim:
            sd[key] = sd[key].reshape(param.shape)
    if "logit_bias" in sd and getattr(model, "logit_bias", None) is None:
        sd.pop("logit_bias")
    try:
        ocf.resize_pos_embed(sd, model)
        ocf.resize_text_pos_embed(sd, model)
    except Exception:  # noqa: BLE001 — shapes are checked by the strict load anyway
        pass
    return sd


def clip_tokenizer(arch: str):
    """open_clip's tokenizer for ``arch`` (the bundled BPE vocabulary for OpenAI-style models: offline)."""
    import open_clip

    problem = clip_arch_problem(arch)
    if problem:
        raise ValueError(problem)
    return open_clip.get_tokenizer(arch)


def _model_input_size(model) -> tuple:
    size = getattr(model.visual, "image_size", 224)
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def _model_mean_std(model):
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    return tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))


def _as_bchw(image: torch.Tensor, what: str) -> torch.Tensor:
    if image.dim() == 3 and image.shape[0] == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"{what} must be an RGB tensor [B,3,H,W] with values in [0, 1], "
                         f"got shape {tuple(image.shape)}")
    return image


class ClipImageEncoder(NetworkLoss):
    """The differentiable image side of a CLIP model: views (resize/crop/cutouts) → normalized embeddings.

    ``cutouts=0`` uses one CLIP view of the whole image; ``cutouts=N`` uses ``N`` random square crops whose side is
    drawn in ``[cutout_min_fraction, 1]`` × the shorter image side (crop geometry from a ``torch.Generator``
    seeded with ``seed``, re-seeded by ``reset()``). ``resize_mode``: ``"shortest"`` (CLIP: shorter side to the
    input size, central crop) or ``"squash"`` (whole image resized to the input size).
    """

    def __init__(self, model: torch.nn.Module, *, cutouts: int = 0, cutout_min_fraction: float = 0.5,
                 seed: int = 0, resize_mode: str = "shortest"):
        if not hasattr(model, "encode_image") or not hasattr(model, "visual"):
            raise TypeError(f"expected an open_clip model (with .visual and .encode_image), got {type(model)}")
        if cutouts < 0:
            raise ValueError(f"cutouts must be >= 0, got {cutouts}")
        if not 0.0 < cutout_min_fraction <= 1.0:
            raise ValueError(f"cutout_min_fraction must lie in (0, 1], got {cutout_min_fraction}")
        if resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode must be 'shortest' or 'squash', got {resize_mode!r}")
        self.model = _freeze(model)
        self.cutouts = int(cutouts)
        self.cutout_min_fraction = float(cutout_min_fraction)
        self.seed = int(seed)
        self.resize_mode = resize_mode
        self.size = _model_input_size(model)
        self.mean, self.std = _model_mean_std(model)
        self.generator = torch.Generator().manual_seed(self.seed)

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def whole_view(self, image: torch.Tensor) -> torch.Tensor:
        """One normalized CLIP view per image: ``[B,3,h,w]``."""
        if self.resize_mode == "squash":
            view = resize_to(image, self.size)
        else:
            view = resize_center_crop(image, self.size)
        return normalize(view, self.mean, self.std)

    def views(self, image: torch.Tensor) -> torch.Tensor:
        """``[V·B,3,h,w]`` normalized views (``V = max(1, cutouts)``; view ``v`` of image ``b`` at ``v·B + b``)."""
        image = image.to(device=self.device, dtype=self.dtype)
        if self.cutouts == 0:
            return self.whole_view(image)
        crops = random_cutouts(image, self.cutouts, self.size, self.generator, self.cutout_min_fraction)
        return normalize(crops, self.mean, self.std)

    @property
    def num_views(self) -> int:
        return max(1, self.cutouts)

    def embed_views(self, views: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(views, normalize=True)

    def embed_reference(self, image: torch.Tensor) -> torch.Tensor:
        """Embedding ``[B,D]`` (float32, detached) of a reference image's whole view, without gradient."""
        with torch.inference_mode(False), torch.no_grad():
            image = image.to(device=self.device, dtype=self.dtype)
            return self.embed_views(self.whole_view(image)).float().clone()


class EncoderLoss:
    """Base of the terms that embed the decoded image with a ``ClipImageEncoder`` held in ``self.encoder``: the
    device is the encoder's, and a new run restarts the encoder's cutout draws."""

    encoder: ClipImageEncoder

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def reset(self) -> None:
        self.encoder.reset()


def _maybe_prepare(obj, image: torch.Tensor) -> None:
    if obj.device != image.device:
        obj.prepare(image.device)


class CLIPTextLoss(EncoderLoss):
    """``loss_b = −mean_v cos(E_img(view_v(x_b)), E_txt(text))`` ∈ [−1, 1]: lower is better.

    ``model``: an open_clip model (``load_clip``). ``text``: a prompt, or several whose normalized embeddings are
    averaged (and re-normalized). ``tokenizer``: default ``open_clip.get_tokenizer(model.ug_arch)``. The text
    embedding is computed once, here. Cutout options: see ``ClipImageEncoder``. Weight 100 gives the paper-style
    "×100 similarity" scale.
    """

    spatial = False  # its target does not live on the image grid: every augmentation applies
    floor = -1.0     # −cos ≥ −1 (f* of the classical Polyak step)

    def __init__(self, model: torch.nn.Module, text: Union[str, Sequence[str]], *, tokenizer=None,
                 cutouts: int = 0, cutout_min_fraction: float = 0.5, seed: int = 0, resize_mode: str = "shortest"):
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ValueError("CLIP guidance needs a non-empty text prompt")
        self.encoder = ClipImageEncoder(model, cutouts=cutouts, cutout_min_fraction=cutout_min_fraction, seed=seed,
                                        resize_mode=resize_mode)
        if tokenizer is None:
            arch = getattr(model, "ug_arch", None)
            if arch is None:
                raise ValueError("pass tokenizer=... for a CLIP model not created by load_clip()")
            tokenizer = clip_tokenizer(arch)
        self.texts = texts
        with torch.inference_mode(False), torch.no_grad():
            tokens = tokenizer(texts).to(self.encoder.device)
            emb = model.encode_text(tokens, normalize=True).float()
            emb = torch.nn.functional.normalize(emb.mean(dim=0, keepdim=True), dim=-1)
            self.text_embedding = emb.clone()  # [1, D]; a normal tensor even if built under inference_mode

    def prepare(self, device, dtype: Optional[torch.dtype] = None) -> "CLIPTextLoss":
        self.encoder.prepare(device, dtype)
        self.text_embedding = self.text_embedding.to(device)
        return self

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = _as_bchw(image, "the decoded image")
        _maybe_prepare(self, image)
        batch = image.shape[0]
        emb = self.encoder.embed_views(self.encoder.views(image)).float()  # [V·B, D]
        text = self.text_embedding.to(emb.device)
        cos = (emb * text).sum(dim=-1).view(self.encoder.num_views, batch)
        return (-cos.mean(dim=0)).to(image.device)
