"""The self-guidance benchmark's edits on the shapes models: what each edit is (``Edit``), the engine guidance it
builds from the pack's own loss terms (``build_guidance``), and sampling the scenes through ``guidance.sample_universal``
with and without it (``run_edit``, the unguided twin ``run_unguided``). See ``selfguidance.py`` for the rows."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import guidance as ug
from guidance import selfguidance as sg
from guidance.objective import Guidance, GuidanceTerm

from . import adapter, data, mmdit, models, models2

SCENE_SEED = 2024                    # the probe's scenes (data.sample_scenes(n, 2024))
TARGETS = ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75))
OTHER_CLEARANCE = 0.3                # a move target keeps this distance from the other object
DECODER = ("up8", "up16")
WORDS = ("colour", "shape")
# Relative weights of the paper's isolated move (appendix of Epstein et al.: centroid 4, shape 6–15,
# appearance 12), normalised to the move term; on this model they hold the object in place (move_keep_paper row),
# so the move + keep row uses keep terms at half the move's weight.
PAPER_KEEP_WEIGHTS = {"move": 1.0, "keep_appearance": 3.0, "other_shape": 2.5, "other_appearance": 3.0}
KEEP_WEIGHTS = {"move": 1.0, "keep_appearance": 0.5, "other_shape": 0.5, "other_appearance": 0.5}
BOUND_STATS = ("bound_checked", "bound_acted", "bound_x0_acted")   # the sampler's schedule-safe bound, counted
# Loaders by model name: ``MODELS[name](folder=models.WEIGHTS)``; ``FILES[name]`` is the weights file in that folder.
MODELS = {"shipped": models.load_unet, "cosine": models2.load_unet, "mmdit": mmdit.load}
FILES = {"shipped": models.FILES["diffusion"], "cosine": models2.FILE, "mmdit": mmdit.FILE}
DECODERS = {"shipped": DECODER, "cosine": models2.DECODER, "mmdit": mmdit.LATE}



# ---------------------------------------------------------------------------------------------- edits
@dataclass(frozen=True)
class Edit:
    """One guided configuration: ``kind`` (move / resize / appearance / move_keep), strength and its mode,
    ``layers`` (``"auto"``, ``"oracle"``, ``"decoder"`` or a list of names), the resize ``factor``, the relative
    ``weights`` of move + keep."""

    name: str
    kind: str
    strength: float
    mode: str = "normalized"
    layers: object = "auto"
    factor: float = 2.0
    weights: tuple = tuple(KEEP_WEIGHTS.items())
    words: tuple = WORDS
    end: float | None = None
    start: float = 0.0
    prompt: str = "caption"     # "shape": the edited object is named by its shape word only ("circle left of …")
    step_bound: float | None = None   # the sampler's schedule-safe bound κ (None: ``Settings``' default)

    @property
    def colourless(self) -> tuple:
        """Indices of the objects the prompt names without a colour."""
        return (0,) if self.prompt == "shape" else ()

    def settings(self, end: float) -> ug.Settings:
        bound = {} if self.step_bound is None else {"step_bound": self.step_bound}
        return ug.Settings(forward_strength=self.strength, strength_mode=self.mode, start_percent=self.start,
                           end_percent=self.end if self.end is not None else end, **bound)


class BatchMoveLoss(sg.MoveLoss):
    """``MoveLoss`` with one target per image: ``targets`` ``[B, 2]`` (x, y) in [0, 1]² (the engine's takes one
    (x, y) for the batch; its goal ``target.expand_as(centroid)`` broadcasts a ``[B, 1, 2]`` target)."""

    def __init__(self, tokens, layers, targets, label=""):
        super().__init__(tokens, layers, target=(0.5, 0.5), label=label)
        self.target = torch.as_tensor(np.asarray(targets, dtype=np.float32)).reshape(-1, 1, 2)


def layer_choice(layers, word: str, oracle: dict):
    """The ``layers`` argument of a term on ``word``'s token for an edit's layer setting."""
    if layers == "oracle":
        return list(oracle[word])
    if layers == "decoder":
        return list(oracle.get("decoder", DECODER))
    return layers


def word_terms(cls, name: str, positions: dict, layers, oracle: dict, weight: float, words=WORDS, **kw) -> list:
    """Terms of one object's ``words``: one term on them all (``"auto"``, a list, None), or with ``"oracle"`` one
    term per word on its own layers, the weight shared."""
    if layers == "oracle":
        return [GuidanceTerm(f"{name}.{w}", cls([positions[w]], layer_choice(layers, w, oracle), **kw),
                             weight / len(words)) for w in words]
    return [GuidanceTerm(name, cls([positions[w] for w in words], layer_choice(layers, "colour", oracle), **kw),
                         weight)]


def build_guidance(edit: Edit, scenes, ctx: dict, idx: list) -> Guidance:
    """The guidance of ``edit`` for the scenes ``idx`` (one caption layout: same token positions)."""
    pos = data.object_positions(scenes[idx[0]], edit.colourless)
    oracle = ctx["oracle"]
    # What keep terms compare with: the unguided twin, or (real-image edits) the scenes' own inversion trajectory.
    keep_ref = ctx["keep_reference"](idx) if "keep_reference" in ctx else sg.ORIGINAL
    w = dict(edit.weights)
    terms = []
    if edit.kind in ("move", "move_keep"):
        targets = [ctx["targets"][i] for i in idx]
        terms += word_terms(BatchMoveLoss, "move", pos[0], edit.layers, oracle, w["move"] if edit.kind ==
                            "move_keep" else 1.0, targets=targets)
    if edit.kind == "move_keep":
        if w["keep_appearance"]:
            terms += word_terms(sg.AppearanceLoss, "keep_appearance", pos[0], edit.layers, oracle,
                                w["keep_appearance"], reference=keep_ref)
        if len(pos) > 1:
            terms += word_terms(sg.KeepShapeLoss, "other_shape", pos[1], edit.layers, oracle, w["other_shape"],
                                reference=keep_ref)
            terms += word_terms(sg.AppearanceLoss, "other_appearance", pos[1], edit.layers, oracle,
                                w["other_appearance"], reference=keep_ref)
    if edit.kind == "resize":
        rw = {k: w[k] for k in ("shape_weight", "size_weight") if k in w}
        terms += word_terms(sg.ResizeLoss, "resize", pos[0], edit.layers, oracle, 1.0, factor=edit.factor, **rw)
    if edit.kind in ("appearance", "appearance_keep"):
        ref = ctx["reference_latents"][idx]
        # The reference is read with this image's caption: its object is named by the shape word (the reference
        # has the object's shape, not its colour), so its appearance is taken under the shape word's map.
        terms += word_terms(sg.AppearanceLoss, "appearance", pos[0], edit.layers, oracle, 1.0, edit.words,
                            reference=ref, reference_tokens=[pos[0]["shape"]],
                            mask_threshold=w.get("mask_threshold", 0.5), core=w.get("core", 0.0))
    if edit.kind == "appearance_keep":   # the paper's transfer: appearance from the reference, layout kept
        keep_words = ("shape",) if w.get("keep_words", 1.0) == 1.0 else WORDS
        terms += word_terms(sg.KeepShapeLoss, "keep_shape", pos[0], edit.layers, oracle,
                            w.get("keep_shape", 1.0), keep_words, reference=sg.ORIGINAL)
        if w.get("keep_size", 0.0):
            terms += word_terms(sg.ResizeLoss, "keep_size", pos[0], edit.layers, oracle, w["keep_size"],
                                keep_words, factor=1.0)
    if not terms:
        raise ValueError(f"unknown edit kind {edit.kind!r}")
    return Guidance(tuple(terms))


# ---------------------------------------------------------------------------------------------- sampling
def layout_groups(scenes, colourless=()) -> dict:
    """``{token layout: [scene indices]}``: scenes whose objects' words sit at the same positions."""
    groups = {}
    for i, s in enumerate(scenes):
        key = tuple((p["colour"], p["shape"]) for p in data.object_positions(s, colourless))
        groups.setdefault(key, []).append(i)
    return groups


def sample_rows(model, captions, noise, seed: int, steps: int, cfg: float, guidance=None, settings=None,
                stats=None, denoise_wrap=None) -> torch.Tensor:
    """Samples ``[n, 3, 32, 32]`` in [0, 1] from the given starting ``noise`` (already scaled to σ_max)."""
    denoise = adapter.make_denoiser(model, data.tokens(captions), data.tokens([""]), cfg)
    if denoise_wrap is not None:
        denoise = denoise_wrap(denoise)
    sigmas = adapter.schedule_of(model).ddim_sigmas(steps)
    with torch.no_grad():
        out = ug.sample_universal(denoise, noise.clone(), sigmas, guidance=guidance, decode=data.decode,
                                  settings=settings or ug.Settings(),
                                  parameterization=adapter.parameterization_of(model),
                                  generator=torch.Generator().manual_seed(seed + 1), stats=stats)
    return data.decode(out.clamp(-1.0, 1.0))


def run_edit(model, edit: Edit, scenes, noise, seed: int, ctx: dict, steps: int, cfg: float, end: float):
    """Every scene under ``edit`` (grouped by caption layout); returns (images [N,3,32,32] in [0,1], stats dict)."""
    images = torch.zeros(len(scenes), 3, data.SIZE, data.SIZE)
    total = ug.Stats()
    for idx in layout_groups(scenes, edit.colourless).values():
        stats = ug.Stats()
        g = build_guidance(edit, scenes, ctx, idx)
        images[idx] = sample_rows(model, [data.caption(scenes[i], edit.colourless) for i in idx], noise[idx], seed, steps, cfg,
                                  guidance=g, settings=edit.settings(end), stats=stats)
        for k in ("steps", "iterations", "denoiser_calls", "denoiser_grad_calls", "reference_calls",
                  "decoder_calls", "capped_updates", "nonfinite_skips") + BOUND_STATS:
            setattr(total, k, getattr(total, k, 0) + getattr(stats, k, 0))
        total.bound_min_scale = min(getattr(total, "bound_min_scale", 1.0), getattr(stats, "bound_min_scale", 1.0))
    return images, {k: getattr(total, k, 0) for k in ("denoiser_calls", "denoiser_grad_calls", "reference_calls",
                                                      "decoder_calls", "capped_updates", "nonfinite_skips")
                    + BOUND_STATS + ("bound_min_scale",)}


def run_unguided(model, scenes, noise, seed: int, steps: int, cfg: float, window_steps: list):
    """The twins, and at each step of ``window_steps`` every layer's attention properties of every token:
    ``{step: {"centroid": [L,B,T,2], "size": [L,B,T], "auto": [L,B,T]}}`` (engine's ``centroid``, ``size``,
    ``compact_layers`` on the adapter's maps, all layers)."""
    sigmas = adapter.schedule_of(model).ddim_sigmas(steps)
    names = adapter.layer_names(model)
    wanted = {float(sigmas[i]): i for i in window_steps}
    found = {}

    def wrap(denoise):
        def recording(x, sigma, capture=None):
            i = wanted.get(float(sigma.reshape(-1)[0]))
            if i is None or capture is not None:
                return denoise(x, sigma, capture=capture) if capture is not None else denoise(x, sigma)
            x0, internals = denoise(x, sigma, capture=sg.CaptureRequest(None, False))
            maps = [internals.maps[n] for n in names]
            found[i] = {"centroid": torch.stack([sg.centroid(m) for m in maps]),
                        "size": torch.stack([sg.size(m) for m in maps]),
                        "auto": sg.compact_layers(maps)}
            return x0
        return recording

    stats = ug.Stats()
    images = sample_rows(model, [data.caption(s) for s in scenes], noise, seed, steps, cfg, stats=stats,
                         denoise_wrap=wrap)
    return images, found


