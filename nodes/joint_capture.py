"""Capture of text→image attention in joint-attention transformers (SD3's MMDiT, Flux) for self-guidance.

These models have no cross-attention: each block attends over the concatenation of the text tokens and the image
tokens, text first (SD3 joint blocks, Flux double blocks over the two streams' q, k, v; Flux single blocks over
the one stream). A word's map is the image queries' row of the softmax over *all* keys, sliced to the word's text
keys: ``P[:, :, L_txt:, :L_txt]`` — not renormalised over the text keys, as on the UNets (softmax over the whole
context). Flash/SDPA kernels never form P, so the map is computed explicitly beside the block's own attention:

    P[i, j] = exp(q_i·k_j/√d − logsumexp_all(q_i·K/√d))

for the image queries i and only the text keys j of the words being guided, in fp32, for the conditional rows
(``cond_or_uncond``), heads averaged, differentiable. The log-sum-exp over all keys runs in chunks of query rows
with a backward pass that recomputes its probabilities chunk by chunk (``_JointLogSumExp``): the full
``[heads, L, L]`` matrix never exists, neither in the forward nor saved for the backward.

Hooks, both placed in the run's ``model_options`` copy only (the cached model is untouched):

* ``patches_replace["dit"][("double_block" | "single_block", i)]`` for each captured block: it tags the block's
  ``transformer_options`` with the capture and the block's name (the attention call itself carries no block id),
  runs the block through whatever replace was there before (wrapped, never overwritten) or the stock block, and
  reads Ψ from the block's image-token output when it is the feature block;
* ``transformer_options["optimized_attention_override"]`` (ComfyUI ≥ 0.3.60): the block's attention output comes
  from the override that was there before or from the stock attention function — unchanged bit for bit — and, when
  the call is tagged, the map is computed from the same q, k (after RoPE and QK-norm).

A block's attention is recomputed when a checkpointed block runs its backward (ComfyUI checkpoints SD3 joint
blocks called through a block replace, and low-memory mode checkpoints every block): the map's computation
runs again then too (the recomputation must save the same tensors), but only maps of the forward call are kept.
"""
from __future__ import annotations

import math

import torch

from ..guidance.selfguidance import Internals

COND = 0
TAG = "ug_joint_capture"          # key in a block's transformer_options: (JointCapture, block name, call layout)
OVERRIDE = "optimized_attention_override"
CHUNK_ELEMENTS = 1 << 24          # scores per chunk of the log-sum-exp (64 MB in fp32)


def kind_of(net) -> str | None:
    """``"flux"`` (Flux: double and single blocks), ``"sd3"`` (SD3's MMDiT: joint blocks) or None for other
    networks (UNets; other transformers with blocks of the same names — HunyuanVideo, Chroma, AuraFlow — whose
    token layouts differ and are not supported)."""
    if net is None:
        return None
    names = {c.__module__ + "." + c.__name__ for c in type(net).__mro__}
    if "comfy.ldm.flux.model.Flux" in names:
        return "flux"
    if "comfy.ldm.modules.diffusionmodules.mmdit.MMDiT" in names:
        return "sd3"
    return None


def host_supports_joint_capture() -> bool:
    """This ComfyUI routes DiT attention through ``optimized_attention_override`` (v0.3.60 and later)."""
    import inspect

    import comfy.ldm.modules.attention as attention
    return hasattr(attention, "wrap_attn") and OVERRIDE in inspect.getsource(attention.wrap_attn)


def joint_layers(net) -> dict:
    """``{name: dit replace key}`` of every joint-attention block, in forward order: ``double0`` … and
    ``single0`` … (Flux); ``joint0`` … (SD3)."""
    if kind_of(net) == "flux":
        layers = {f"double{i}": ("double_block", i) for i in range(len(net.double_blocks))}
        layers.update({f"single{i}": ("single_block", i) for i in range(len(net.single_blocks))})
        return layers
    return {f"joint{i}": ("double_block", i) for i in range(len(net.joint_blocks))}


def feature_block(net) -> str:
    """The block whose image-token output is Ψ (appearance features).

    Flux: the last double block — the last point where the image tokens have a stream of their own, after which
    the single blocks mix them with the text stream; SD3: the second-to-last joint block (the last one's text
    stream is not updated: ``pre_only``). Both are the latest image-only activations before the output projection,
    as the UNet path reads Ψ from a late decoder block: late activations carry the colour and texture the decoder
    turns into pixels, early ones mostly layout."""
    if kind_of(net) == "flux":
        return f"double{len(net.double_blocks) - 1}"
    return f"joint{max(len(net.joint_blocks) - 2, 0)}"


_RANGE = r"(double|single|joint)\s*(\d+)\s*(?:-\s*(\d+))?$"


def parse_blocks(text: str, net) -> list:
    """``"double 15-18, single 0-3"`` → block names of ``net``; ``ValueError`` naming what is wrong. On SD3
    ``double`` means ``joint`` (ComfyUI keys SD3's joint blocks as double blocks)."""
    import re
    layers = joint_layers(net)
    names = []
    for part in [p.strip() for p in re.split(r"[,;\n]", text or "") if p.strip()]:
        m = re.match(_RANGE, part.lower())
        if not m:
            raise ValueError(f"{part!r} is not a block range; write e.g. 'double 15-18' or 'single 0-3' (Flux) or "
                             f"'joint 10-14' (SD3)")
        kind, lo = m.group(1), int(m.group(2))
        hi = int(m.group(3)) if m.group(3) is not None else lo
        if kind_of(net) == "sd3" and kind == "double":
            kind = "joint"
        if hi < lo:
            raise ValueError(f"{part!r}: the range runs backwards")
        wanted = [f"{kind}{i}" for i in range(lo, hi + 1)]
        missing = [w for w in wanted if w not in layers]
        if missing:
            counts = {}
            for name in layers:
                k = name.rstrip("0123456789")
                counts[k] = counts.get(k, 0) + 1
            have = ", ".join(f"{k} 0-{n - 1}" for k, n in counts.items())
            raise ValueError(f"{part!r}: this model has no block {missing[0]}; it has {have}")
        names += [w for w in wanted if w not in names]
    if not names:
        raise ValueError("no blocks named")
    return names


# --------------------------------------------------------------------------------------------- the maths

class _JointLogSumExp(torch.autograd.Function):
    """``logsumexp(q·kᵀ·scale, -1)`` for ``q`` ``[N, H, Lq, d]``, ``k`` ``[N, H, Lk, d]`` in chunks of query rows;
    the backward recomputes each chunk's probabilities instead of saving them."""

    @staticmethod
    def forward(ctx, q, k, scale):
        rows = max(1, CHUNK_ELEMENTS // max(1, q.shape[0] * q.shape[1] * k.shape[2]))
        out = torch.cat([torch.logsumexp(q[:, :, i:i + rows] @ k.transpose(-1, -2) * scale, dim=-1)
                         for i in range(0, q.shape[2], rows)], dim=2)
        ctx.save_for_backward(q, k, out)
        ctx.scale, ctx.rows = scale, rows
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, lse = ctx.saved_tensors
        scale, rows = ctx.scale, ctx.rows
        dq = torch.zeros_like(q) if ctx.needs_input_grad[0] else None
        dk = torch.zeros_like(k) if ctx.needs_input_grad[1] else None
        for i in range(0, q.shape[2], rows):
            qc = q[:, :, i:i + rows]
            p = torch.exp(qc @ k.transpose(-1, -2) * scale - lse[:, :, i:i + rows, None])
            gp = grad[:, :, i:i + rows, None] * p * scale                   # [N, H, rows, Lk]
            if dq is not None:
                dq[:, :, i:i + rows] = gp @ k
            if dk is not None:
                dk += gp.transpose(-1, -2) @ qc
        return dq, dk, None


def joint_text_probs(q, k, img_rows: slice, txt_keys: slice, columns=None):
    """``[N, H, n_img, K]``: softmax over *all* keys of the image queries ``q[:, :, img_rows]``, at the text keys
    ``txt_keys`` (those of ``columns`` within them, or all), in fp32. ``q``, ``k``: ``[N, H, L, d]``."""
    q, k = q.float(), k.float()
    scale = q.shape[-1] ** -0.5
    qi = q[:, :, img_rows]
    kt = k[:, :, txt_keys]
    if columns is not None:
        kt = kt[:, :, columns]
    lse = _JointLogSumExp.apply(qi, k, scale)                                  # [N, H, n_img]
    return torch.exp(qi @ kt.transpose(-1, -2) * scale - lse[..., None])


# ------------------------------------------------------------------------------------------------ capture

def _heads_first(t, heads: int, skip_reshape: bool):
    """``[B, H, L, d]`` from the layout ``optimized_attention`` was called with."""
    if skip_reshape:
        return t
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


def _override_chain(previous):
    def call(func, *args, **kwargs):
        return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
    return call


class JointCapture:
    """Records the chosen blocks' text→image maps (and Ψ) during one denoiser call; ``internals()`` assembles them.

    ``context_length``: tokens the token positions refer to (the conditioning's text tokens); ``tokens``: the
    positions to compute (None: all of them; the maps keep zeros elsewhere)."""

    def __init__(self, net, layers: dict, context_length: int, features: bool, tokens=None):
        self.net, self.layers, self.context_length = net, dict(layers), context_length
        self.kind = kind_of(net)
        self.feature_name = feature_block(net) if features else None
        self.tokens = None if tokens is None else sorted({int(t) for t in tokens})
        self.maps, self.feats = {}, None
        self.open = False
        self._call = None        # (rows, chunks, txt tokens, (h, w)) of the network call running now
        self.patch = getattr(net, "patch_size", 2)

    # ------------------------------------------------------------------------------------------ patching
    def model_options(self, model_options: dict) -> dict:
        options = dict(model_options or {})
        to = dict(options.get("transformer_options", {}))
        replaces = {k: dict(v) for k, v in to.get("patches_replace", {}).items()}
        dit = replaces.setdefault("dit", {})
        names = dict(self.layers)
        if self.feature_name is not None:
            names[self.feature_name] = joint_layers(self.net)[self.feature_name]
        for name, key in names.items():
            dit[key] = self._block(name, dit.get(key))
        to["patches_replace"] = replaces
        previous = _override_chain(to.get(OVERRIDE))

        def override(func, *args, **kwargs):
            out = previous(func, *args, **kwargs)
            tag = (kwargs.get("transformer_options") or {}).get(TAG)
            if tag is not None and tag[0] is self:
                self._record(tag[1], tag[2], args, kwargs)
            return out

        to[OVERRIDE] = override
        options["transformer_options"] = to
        return options

    def _block(self, name: str, previous):
        capture_map = name in self.layers

        def replace(args, extra):
            args = dict(args)
            to = dict(args.get("transformer_options") or {})
            if capture_map:  # with the call's layout: a checkpointed block's recomputation sees the same
                to[TAG] = (self, name, self._call)
            else:
                to.pop(TAG, None)
            args["transformer_options"] = to
            out = previous(args, extra) if previous is not None else extra["original_block"](args)
            if name == self.feature_name:
                self._record_feats(out["img"], name)
            return out
        return replace

    def start_call(self, module, args, kwargs):
        """A network call starts: its batch chunks, text tokens and image grid."""
        x = args[0] if args else kwargs.get("x")
        context = kwargs.get("context", args[2] if len(args) > 2 else None)
        options = kwargs.get("transformer_options") or {}
        chunks = list(options.get("cond_or_uncond") or [COND])
        txt = int(context.shape[1]) if isinstance(context, torch.Tensor) else 0
        txt += int(getattr(module, "register_length", 0) or 0) if self.kind == "sd3" else 0
        h, w = (int(math.ceil(x.shape[-2] / self.patch)), int(math.ceil(x.shape[-1] / self.patch)))
        self._call = (int(x.shape[0]), chunks, txt, (h, w))

    # ------------------------------------------------------------------------------------------ recording
    def _cond_rows(self, total: int, chunks) -> list:
        size = total // len(chunks)
        return [slice(i * size, (i + 1) * size) for i, c in enumerate(chunks) if c == COND]

    def _record(self, name, layout, args, kwargs):
        if layout is None:
            return
        q, k = args[0], args[1]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        skip = kwargs.get("skip_reshape", False)
        q, k = _heads_first(q, heads, skip), _heads_first(k, heads, skip)
        total, chunks, n_txt, (h, w) = layout
        n_img = h * w
        if k.shape[2] < n_txt + n_img:  # an image-only attention inside the block (SD3.5's second attention)
            return
        rows = self._cond_rows(q.shape[0], chunks)
        if not rows:
            return
        qc = torch.cat([q[r] for r in rows])
        kc = torch.cat([k[r] for r in rows])
        reg = int(getattr(self.net, "register_length", 0) or 0) if self.kind == "sd3" else 0
        block = None
        if name.startswith("double"):
            block = self.net.double_blocks[int(name[6:])]
        if getattr(block, "flipped_img_txt", False):   # image tokens first
            img_rows, txt_keys = slice(0, n_img), slice(n_img + reg, n_img + n_txt)
        else:
            img_rows, txt_keys = slice(n_txt, n_txt + n_img), slice(reg, n_txt)
        L, T = n_txt - reg, self.context_length
        if L % T:
            raise RuntimeError(f"the conditioning has {L} text tokens, the self-guidance prompt {T}: use the same "
                               f"prompt in the self-guidance node as in the positive conditioning")
        repeats = L // T
        wanted = self.tokens if self.tokens is not None else list(range(T))
        columns = [t + m * T for m in range(repeats) for t in wanted]
        probs = joint_text_probs(qc, kc, img_rows, txt_keys, columns)           # [N, H, n_img, K·repeats]
        b = probs.shape[0] // len(rows)
        probs = probs.view(len(rows), b, *probs.shape[1:]).mean(dim=(0, 2))    # cond chunks, heads → [B, n, K·r]
        probs = probs.view(b, n_img, repeats, len(wanted)).sum(dim=2)          # the repeats of a shorter context
        if self.tokens is not None:
            full = probs.new_zeros(b, n_img, T)
            full[..., wanted] = probs
            probs = full
        if self.open:  # not in a checkpointed block's recomputation (backward pass): computed the same, not kept
            self.maps[name] = probs.view(b, h, w, T)

    def _record_feats(self, img, name):
        if not self.open or self._call is None:
            return
        total, chunks, n_txt, (h, w) = self._call
        if img.shape[0] != total:
            return
        rows = self._cond_rows(total, chunks)
        if not rows:
            return
        start = n_txt if name.startswith("single") else 0
        feats = torch.stack([img[r, start:start + h * w] for r in rows]).float().mean(dim=0)   # [B, n, C]
        self.feats = feats.transpose(1, 2).reshape(feats.shape[0], feats.shape[2], h, w)

    def internals(self) -> Internals:
        if not self.maps:
            raise RuntimeError("self-guidance captured no attention maps in this denoiser call")
        return Internals(dict(self.maps), self.feats)


def captured_call(model, x, sigma, extra_args: dict, net, layers: dict, context_length: int, features: bool,
                  tokens=None):
    """One denoiser call with capture on a joint-attention model: ``(x̂0, Internals)``."""
    capture = JointCapture(net, layers, context_length, features, tokens)
    args = dict(extra_args)
    args["model_options"] = capture.model_options(extra_args.get("model_options", {}))
    handle = net.register_forward_pre_hook(capture.start_call, with_kwargs=True)
    capture.open = True
    try:
        x0 = model(x, sigma, **args)
    finally:
        capture.open = False
        handle.remove()
    return x0, capture.internals()
