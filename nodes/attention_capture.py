"""Capture of the UNet's own cross-attention (and one block's activations) for self-guidance, inside ComfyUI.

An attn2 *replace* patch (``transformer_options["patches_replace"]["attn2"][(block, id, index)]``, called as
``patch(q, k, v, extra_options)`` after the q/k/v projections on both supported hosts) is installed for the chosen
transformer blocks, in a copy of the run's ``model_options`` passed only to the guided denoiser calls — never on
the cached model. The patch

* computes the block's output exactly as before: through the replace patch that was there already (another
  pack's, e.g. IPAdapter: it is wrapped, never overwritten) or through ComfyUI's own ``optimized_attention``
  called as the stock attention calls it — so the sampler's result is unchanged bit for bit;
* and, beside it, the probabilities ``softmax(q·kᵀ/√d)`` in fp32 for the conditional rows only
  (``cond_or_uncond``), with autograd intact: columns of the conditioning's tokens are summed over the repeats
  ComfyUI makes when it batches a shorter context with a longer one, heads are averaged, and the rows are
  reshaped to the block's H×W.

The maps of every captured block are resized to the largest captured resolution. Ψ (for appearance) is the output
of one decoder block, read with a forward hook that is removed after the call. Maps and Ψ come from the conditional
rows only, also when ComfyUI runs cond and uncond as separate UNet calls within one denoiser call (the CFG-branch
option always does; ComfyUI does when memory is short): each UNet call's batch layout is read as the call starts,
and a call without conditional rows records nothing.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math

import torch
import torch.nn.functional as F

from ..guidance.selfguidance import AUTO, Internals
from . import joint_capture

COND = 0


def unet_of(base_model):
    """The UNet (``openaimodel.UNetModel``) of a model, or None for other architectures (SD3's MMDiT, Flux)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    net = getattr(base_model, "diffusion_model", None)
    return net if isinstance(net, UNetModel) else None


def capture_network(base_model):
    """The network whose attention self-guidance reads: a UNet, or a joint-attention transformer (SD3's MMDiT,
    Flux) on a ComfyUI that routes its attention through ``optimized_attention_override``; None otherwise."""
    unet = unet_of(base_model)
    if unet is not None:
        return unet
    net = getattr(base_model, "diffusion_model", None)
    if joint_capture.kind_of(net) is not None and joint_capture.host_supports_joint_capture():
        return net
    return None


def unsupported_message(base_model) -> str:
    """Why self-guidance cannot read this model's attention on this ComfyUI (for an error naming the node)."""
    net = getattr(base_model, "diffusion_model", None)
    name = f"{type(base_model).__name__}, {type(net).__name__}"
    if joint_capture.kind_of(net) is not None and not joint_capture.host_supports_joint_capture():
        return (f"this model ({name}) attends jointly over text and image tokens, and this ComfyUI does not let a "
                f"node read that attention (it has no 'optimized_attention_override', added in ComfyUI v0.3.60): "
                f"update ComfyUI to use self-guidance on SD3 and Flux")
    return (f"self-guidance reads the text-to-image attention of a UNet (SD1.x, SD2.x, SDXL) or of SD3 / Flux; this "
            f"model ({name}) is not one of them")


def attention_layers(unet) -> dict:
    """``{name: (block, id, index)}`` of every transformer block with cross-attention, in forward order;
    names read ``input4.0``, ``middle0.0``, ``output3.1`` (block kind, block id, transformer index). For SD3 and
    Flux: ``{name: dit replace key}`` of their joint-attention blocks (``joint_capture.joint_layers``)."""
    if joint_capture.kind_of(unet) is not None:
        return joint_capture.joint_layers(unet)
    from comfy.ldm.modules.attention import SpatialTransformer
    layers = {}
    groups = [("input", list(unet.input_blocks)), ("middle", [unet.middle_block]), ("output", list(unet.output_blocks))]
    for kind, blocks in groups:
        for bid, block in enumerate(blocks):
            for layer in block or ():  # a UNet may have no middle block
                if isinstance(layer, SpatialTransformer):
                    for index, tb in enumerate(layer.transformer_blocks):
                        if getattr(tb, "attn2", None) is not None:
                            layers[f"{kind}{bid}.{index}"] = (kind, bid, index)
    return layers


def layer_scales(unet) -> dict:
    """``{name: downsampling factor of its block}`` (1 = the latent's resolution), from the UNet's structure."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample
    scales, factor = {}, 1
    names = attention_layers(unet)
    for bid, block in enumerate(unet.input_blocks):
        if any(isinstance(m, Downsample) for m in block):
            factor *= 2
        for name, (kind, b, _) in names.items():
            if kind == "input" and b == bid:
                scales[name] = factor
    for name, (kind, _, _) in names.items():
        if kind == "middle":
            scales[name] = factor
    for bid, block in enumerate(unet.output_blocks):
        for name, (kind, b, _) in names.items():
            if kind == "output" and b == bid:
                scales[name] = factor
        if any(isinstance(m, Upsample) for m in block):
            factor //= 2
    return scales


def _stock_attention():
    """ComfyUI's attention as ``CrossAttention.forward`` calls it (keyword arguments differ between hosts)."""
    import comfy.ldm.modules.attention as attention
    fn = attention.optimized_attention
    params = inspect.signature(fn).parameters
    takes_precision = "attn_precision" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    takes_options = "transformer_options" in params

    def call(q, k, v, extra_options):
        kwargs = {}
        if takes_precision and "attn_precision" in extra_options:
            kwargs["attn_precision"] = extra_options["attn_precision"]
        if takes_options:
            kwargs["transformer_options"] = extra_options
        return attention.optimized_attention(q, k, v, extra_options["n_heads"], **kwargs)

    return call


def _hw(original_shape, tokens: int) -> tuple:
    """The block's (h, w) for ``tokens`` rows, from the model input's (H, W)."""
    H, W = int(original_shape[-2]), int(original_shape[-1])
    ratio = math.sqrt(H * W / tokens)
    for f in (round(ratio), math.ceil(ratio), math.floor(ratio)):
        if f >= 1:
            for h, w in ((math.ceil(H / f), math.ceil(W / f)), (H // f, W // f)):
                if h * w == tokens:
                    return h, w
    raise RuntimeError(f"cannot tell the attention map's shape: {tokens} rows for a {H}x{W} input")


class AttentionCapture:
    """Records probabilities of the chosen layers during one denoiser call; ``internals()`` assembles them.

    ``context_length``: tokens of the conditioning the token positions refer to (77 per prompt chunk)."""

    def __init__(self, unet, layers: dict, context_length: int, features: bool):
        self.unet, self.layers, self.context_length = unet, layers, context_length
        self.features = features
        self.maps, self.feats = {}, None
        self._call_layout = None  # (rows, cond_or_uncond) of the UNet call running now
        self._stock = _stock_attention()

    # ------------------------------------------------------------------------------------------ patching
    def model_options(self, model_options: dict) -> dict:
        """A copy of ``model_options`` with our replace patches (wrapping any already there)."""
        options = dict(model_options or {})
        to = dict(options.get("transformer_options", {}))
        replaces = {k: dict(v) for k, v in to.get("patches_replace", {}).items()}
        attn2 = replaces.setdefault("attn2", {})
        for name, (kind, bid, index) in self.layers.items():
            previous = attn2.get((kind, bid, index), attn2.get((kind, bid)))
            attn2[(kind, bid, index)] = self._patch(name, previous)
        to["patches_replace"] = replaces
        options["transformer_options"] = to
        return options

    def _patch(self, name: str, previous):
        def patch(q, k, v, extra_options):
            out = previous(q, k, v, extra_options) if previous is not None else self._stock(q, k, v, extra_options)
            self._record(name, q, k, extra_options)
            return out
        return patch

    @contextlib.contextmanager
    def hooks(self):
        """The hooks, removed on exit: each UNet call's batch layout (a pre-hook on the UNet) and Ψ (output of the
        second-to-last decoder block)."""
        handles = [self.unet.register_forward_pre_hook(self._start_call, with_kwargs=True)]
        try:
            if self.features:
                # ComfyUI's UNet runs a block's layers one by one (forward_timestep_embed), never the block's own
                # forward: the block's output is its last layer's
                handles.append(self.unet.output_blocks[-2][-1].register_forward_hook(self._record_feats))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------------------------------ recording
    def _cond_rows(self, total: int, cond_or_uncond) -> list:
        """Row slices of the conditional chunks of a batch of ``total`` rows."""
        chunks = list(cond_or_uncond or [COND])
        size = total // len(chunks)
        return [slice(i * size, (i + 1) * size) for i, c in enumerate(chunks) if c == COND]

    def _start_call(self, module, args, kwargs):
        """A UNet call starts: its rows and chunks (``transformer_options["cond_or_uncond"]``)."""
        x = args[0] if args else kwargs.get("x")
        options = kwargs.get("transformer_options") or (args[5] if len(args) > 5 else None) or {}
        chunks = list(options.get("cond_or_uncond") or [COND]) if isinstance(options, dict) else [COND]
        self._call_layout = (int(x.shape[0]), chunks) if isinstance(x, torch.Tensor) else None

    def _record(self, name, q, k, extra_options):
        chunks = list(extra_options.get("cond_or_uncond") or [COND])
        self._call_layout = (q.shape[0], chunks)
        rows = self._cond_rows(q.shape[0], chunks)
        if not rows:  # an unconditional-only call (cond and uncond run separately): nothing to record
            return
        heads = extra_options["n_heads"]
        d = q.shape[-1] // heads
        qc = torch.stack([q[r] for r in rows]).float()             # [n, B, HW, heads·d]
        kc = torch.stack([k[r] for r in rows]).float()
        n, b, hw, _ = qc.shape
        qc = qc.view(n, b, hw, heads, d).transpose(2, 3)           # [n, B, heads, HW, d]
        kc = kc.view(n, b, kc.shape[2], heads, d).transpose(2, 3)  # [n, B, heads, L, d]
        probs = torch.softmax(qc @ kc.transpose(-1, -2) / math.sqrt(d), dim=-1)
        probs = probs.mean(dim=(0, 2))                             # cond chunks and heads → [B, HW, L]
        L, T = probs.shape[-1], self.context_length
        if L != T:
            if L % T:
                raise RuntimeError(f"the conditioning has {L} tokens, the self-guidance prompt {T}: use the same "
                                   f"prompt in the self-guidance node as in the positive conditioning")
            probs = probs.view(b, hw, L // T, T).sum(dim=2)        # the repeats of a shorter context
        h, w = _hw(extra_options["original_shape"], hw)
        self.maps[name] = probs.view(b, h, w, T)

    def _record_feats(self, module, inputs, output):
        if self._call_layout is None:
            return
        total, chunks = self._call_layout
        if output.shape[0] != total:
            return
        rows = self._cond_rows(total, chunks)
        if not rows:  # the unconditional call: Ψ stays the conditional call's
            return
        self.feats = torch.stack([output[r] for r in rows]).float().mean(dim=0)

    def internals(self) -> Internals:
        if not self.maps:
            raise RuntimeError("self-guidance captured no attention maps in this denoiser call")
        h = max(m.shape[1] for m in self.maps.values())
        w = max(m.shape[2] for m in self.maps.values())
        maps = {}
        for name, m in self.maps.items():
            if m.shape[1:3] != (h, w):
                m = F.interpolate(m.permute(0, 3, 1, 2), size=(h, w), mode="bilinear",
                                  align_corners=False).permute(0, 2, 3, 1)
            maps[name] = m
        return Internals(maps, self.feats)


def captured_call(model, x, sigma, extra_args: dict, unet, layers: dict, context_length: int, features: bool,
                  tokens=None):
    """One denoiser call with capture: ``(x̂0, Internals)``. ``unet``: a UNet or (SD3, Flux) a joint-attention
    transformer; ``tokens``: the token positions the terms read (the transformers compute only those)."""
    if joint_capture.kind_of(unet) is not None:
        return joint_capture.captured_call(model, x, sigma, extra_args, unet, layers, context_length, features,
                                           tokens)
    capture = AttentionCapture(unet, layers, context_length, features)
    args = dict(extra_args)
    args["model_options"] = capture.model_options(copy.copy(extra_args.get("model_options", {})))
    with capture.hooks():
        x0 = model(x, sigma, **args)
    return x0, capture.internals()


# Choices of layers offered by the self-guidance nodes. The default, "auto", is the rule the shapes benchmark
# validated (benchmarks/shapes/README.md): which layer localizes an object depends on the word and the model, and
# per word the layers with the most compact maps are the ones whose centroid tracks the object
# (guidance.selfguidance.compact_layers): every layer is captured, each token uses its compact ones.
LAYER_RULES = ("auto", "coarse decoder", "mid decoder", "all decoder", "all")


def resolve_layer_rule(rule, unet):
    """Layer names for a rule of ``LAYER_RULES`` (or a comma-separated list of names) on this UNet; ``"auto"``
    stays ``"auto"`` (every layer captured, chosen per token by the engine). On SD3 / Flux: ``auto``, ``all`` or
    block ranges such as ``"double 15-18, single 0-3"`` (``ValueError`` for anything else)."""
    layers = attention_layers(unet)
    rule = (rule or LAYER_RULES[0]).strip()
    if rule == "auto":
        return AUTO
    if rule == "all":
        return list(layers)
    if joint_capture.kind_of(unet) is not None:
        if rule in LAYER_RULES:
            raise ValueError(f"layers {rule!r} names UNet decoder levels; SD3 and Flux have none: use 'auto' or "
                             f"'all', or name blocks in 'blocks' (e.g. 'double 15-18, single 0-3')")
        return joint_capture.parse_blocks(rule, unet)
    if rule in LAYER_RULES:
        scales = layer_scales(unet)
        decoder = [n for n, (kind, _, _) in layers.items() if kind == "output"]
        levels = sorted({scales[n] for n in decoder}, reverse=True)  # coarsest first
        if not decoder:  # a UNet without decoder cross-attention: the coarsest level it has
            coarsest = max(scales[n] for n in layers)
            return [n for n in layers if scales[n] == coarsest]
        if rule == "all decoder":
            return decoder
        level = levels[min(1 if rule == "mid decoder" else 0, len(levels) - 1)]
        return [n for n in decoder if scales[n] == level]
    return [n.strip() for n in rule.split(",") if n.strip()]
