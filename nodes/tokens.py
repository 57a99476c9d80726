"""Words of a prompt → their token positions in the conditioning, with the model's own tokenizers.

``clip.tokenize(text, return_word_ids=True)`` gives, per text encoder (``l``; ``h``; ``g`` and ``l`` for SDXL),
chunks of 77 ``(token, weight, word id)``: SOT, the words' tokens, EOT and padding (word id 0). Chunk i covers
context positions 77·i … 77·i + 76. A word (or a phrase of several words) is tokenized the same way and found
as a subsequence of the prompt's token ids: every sub-token of every occurrence is kept, prompt weights such as
``(dog:1.3)`` change nothing, long prompts count their chunks, and every text encoder must agree on the positions.

SD3 and Flux attend to other tokens (``attended_layout``): Flux to T5's (sentencepiece: no start token, one
sequence padded to 256, a word often split into several pieces, each kept); SD3 to CLIP-L/G's 77 per chunk
followed by T5's, so a word's T5 positions come after the CLIP part.
"""
from __future__ import annotations

import re

from .errors import GuidanceInputError


# The CLIP encoders' keys in ComfyUI's tokenizer output (SD1: l; SD2: h; SDXL/SD3: g and l). Other encoders of a
# model (T5 of SD3/Flux) have their own token layout (``attended_layout``).
CLIP_KEYS = ("l", "g", "h")
T5_KEY = "t5xxl"


def _has_class(obj, name: str) -> bool:
    return any(c.__name__ == name for c in type(obj).__mro__)


def attended_layout(clip) -> list:
    """``[(encoder keys, offset rule)]``: which encoders' tokens the diffusion model attends to, in context order.

    * Flux (``FluxClipModel``): the T5 tokens only (CLIP-L gives the pooled vector);
    * SD3 (``SD3ClipModel``): the CLIP-L/G tokens (77 per chunk; the encoders loaded), then the T5 tokens (when T5
      is loaded) — the T5 positions follow the CLIP part;
    * every other model: its CLIP encoders' tokens (``CLIP_KEYS``; all must agree), or whatever it has."""
    model = getattr(clip, "cond_stage_model", None)
    if _has_class(model, "FluxClipModel"):
        return [((T5_KEY,), "start")]
    if _has_class(model, "SD3ClipModel"):
        layout = []
        clip_keys = tuple(k for k, attr in (("l", "clip_l"), ("g", "clip_g")) if getattr(model, attr, None) is not None)
        if clip_keys:
            layout.append((clip_keys, "start"))
        if getattr(model, "t5xxl", None) is not None:
            layout.append(((T5_KEY,), "after"))
        return layout or [(("l", "g"), "start")]  # SD3 encodes zeros of 77 tokens without encoders
    return [(CLIP_KEYS, "start")]


def _streams(clip, text: str, tokenize=None) -> dict:
    """``{encoder key: [(position, token id or None, word id)]}`` over all chunks."""
    tokens = (tokenize or clip.tokenize)(text, return_word_ids=True)
    streams = {}
    for key, chunks in tokens.items():
        stream, pos = [], 0
        for chunk in chunks:
            for entry in chunk:
                token, word_id = entry[0], entry[2] if len(entry) > 2 else 0
                stream.append((pos, token if isinstance(token, int) else None, word_id))
                pos += 1
        streams[key] = stream
    return streams


def prompt_words(text: str) -> list:
    """The prompt's words as a person reads them (weights syntax and punctuation dropped)."""
    return re.findall(r"[A-Za-z0-9][\w'-]*", text.replace("embedding:", " "))


def split_words(words: str) -> list:
    """``"dog, red ball"`` → ``["dog", "red ball"]``."""
    return [w.strip() for w in re.split(r"[,\n;]", words or "") if w.strip()]


def token_positions(clip, prompt: str, words: str, node: str, input_name: str = "words") -> tuple:
    """``(sorted positions, context length)`` of every sub-token of every occurrence of each of ``words``, in the
    text-token sequence the diffusion model attends to (``attended_layout``)."""
    if clip is None or not hasattr(clip, "tokenize"):
        raise GuidanceInputError(f"{node}: input 'clip' is missing; connect the CLIP of the checkpoint")
    return positions_in(clip.tokenize, attended_layout(clip), prompt, words, node, input_name)


def positions_in(tokenize, layout: list, prompt: str, words: str, node: str, input_name: str = "words") -> tuple:
    """``token_positions`` for a tokenizer function (``tokenize(text, return_word_ids=True)``, ComfyUI's) and a
    layout of ``attended_layout``."""
    queries = split_words(words)
    if not queries:
        raise GuidanceInputError(f"{node}: input '{input_name}' is empty; name a word of the prompt, e.g. 'dog'")
    if not (prompt or "").strip():
        raise GuidanceInputError(f"{node}: input 'prompt' is empty; give the positive prompt, word for word")
    all_streams = _streams(None, prompt, tokenize)
    query_streams = {q: _streams(None, q, tokenize) for q in queries}
    positions, offset = set(), 0
    for keys, rule in layout:
        streams = {k: all_streams[k] for k in keys if k in all_streams}
        if not streams:
            if rule == "start" and keys == CLIP_KEYS:   # a tokenizer of other encoders only: whatever it has
                streams = all_streams
            else:
                continue
        found = {key: _find(stream, {q: s.get(key, []) for q, s in query_streams.items()}, prompt, node,
                            input_name) for key, stream in streams.items()}
        values = list(found.values())
        if any(v != values[0] for v in values[1:]):
            raise GuidanceInputError(f"{node}: the text encoders of this CLIP place {words!r} at different positions "
                                     f"({found}); self-guidance cannot tell which to use")
        positions.update(offset + p for p in values[0])
        offset += max(len(s) for s in streams.values())
    return sorted(positions), offset


def _find(stream: list, queries: dict, prompt: str, node: str, input_name: str) -> list:
    """Positions in ``stream`` of every sub-token of every occurrence of each query's token ids."""
    content = [(pos, tok) for pos, tok, wid in stream if wid and tok is not None]
    positions = set()
    for query, q_stream in queries.items():
        q_ids = [tok for _, tok, wid in q_stream if wid and tok is not None]
        hits = [content[i:i + len(q_ids)] for i in range(len(content) - len(q_ids) + 1)
                if q_ids and [t for _, t in content[i:i + len(q_ids)]] == q_ids]
        if not hits:
            raise GuidanceInputError(
                f"{node}: input '{input_name}': {query!r} is not in the prompt; the words of input 'prompt' "
                f"are {', '.join(repr(w) for w in prompt_words(prompt))}")
        positions.update(pos for hit in hits for pos, _ in hit)
    return sorted(positions)


# ------------------------------------------------------------------------ the prompt the positions refer to

PROMPT_KEY = "ug_prompt"  # the key under which UG Prompt's conditioning carries its text and tokenizer


class PromptTokens:
    """What a UG Prompt attaches to each entry of its conditioning: the text it encoded and the CLIP whose
    tokenizer encoded it, so that self-guidance nodes find their words in the very text the model is conditioned
    on. Copying a conditioning (ComfyUI copies its dicts) keeps the same object."""

    def __init__(self, text: str, clip):
        self.text, self.clip = text, clip

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return f"PromptTokens({self.text!r})"


class PromptCheck:
    """The conditioning a self-guidance term's token positions were counted in: its text, the cross-attention
    context it encodes to (``[L, D]``) and where the text came from (``source``: the node input that gave it)."""

    def __init__(self, text: str, context, source: str, node: str):
        self.text, self.source, self.node = text, source, node
        self.context = context.detach().reshape(-1, *context.shape[-2:])[0].float().cpu().clone()


def prompt_of_conditioning(conditioning, node: str, input_name: str = "conditioning"):
    """``(PromptTokens, context tensor)`` of a CONDITIONING made by UG Prompt; a clear error otherwise."""
    found = [(c[1][PROMPT_KEY], c[0]) for c in conditioning or []
             if isinstance(c, (list, tuple)) and len(c) > 1 and isinstance(c[1], dict) and PROMPT_KEY in c[1]]
    if not found:
        raise GuidanceInputError(
            f"{node}: input '{input_name}' carries no prompt text (it was not made by a UG Prompt node); encode the "
            f"positive prompt with UG Prompt (a drop-in for CLIP Text Encode) and connect its output both here and "
            f"to the sampler's positive input, or leave '{input_name}' unconnected and type the positive prompt in "
            f"'prompt' with the checkpoint's CLIP connected to 'clip'")
    texts = {p.text for p, _ in found}
    if len(texts) > 1:
        raise GuidanceInputError(
            f"{node}: input '{input_name}' combines several UG Prompt texts ({', '.join(repr(t) for t in texts)}); "
            f"connect the one UG Prompt whose words this node edits")
    return found[0]


def encode_text(clip, text: str):
    """The cross-attention context ``[1, L, D]`` CLIP Text Encode gives ``text`` (and its pooled output)."""
    tokens = clip.tokenize(text)
    if hasattr(clip, "encode_from_tokens_scheduled"):
        out = clip.encode_from_tokens_scheduled(tokens)
        return out[0][0], out
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, [[cond, {"pooled_output": pooled}]]


def _same_context(a, b) -> bool:
    b = b.detach().reshape(-1, *b.shape[-2:])[0].float().cpu()
    if tuple(a.shape) != tuple(b.shape):
        return False
    scale = float(a.abs().max().clamp_min(1.0))
    return bool(((a - b).abs().max() <= 1e-3 * scale).item())


def conditioning_mismatch(check: PromptCheck, term_name: str, positive) -> str | None:
    """Why the sampler's positive conditioning (``positive``: ComfyUI's processed cond dicts, each with
    ``cross_attn``) is not the one ``check`` describes, or None when one of its entries is."""
    contexts = [c.get("cross_attn") for c in positive if isinstance(c, dict) and c.get("cross_attn") is not None]
    if not contexts or any(_same_context(check.context, c) for c in contexts):
        return None
    texts = sorted({c[PROMPT_KEY].text for c in positive if isinstance(c, dict) and PROMPT_KEY in c})
    given = (f"the sampler's positive conditioning encodes {', '.join(repr(t) for t in texts)}" if texts else
             "the sampler's positive conditioning encodes a different text (or was made with another CLIP)")
    if check.source == "prompt":
        fix = ("encode the positive prompt with a UG Prompt node and connect it both to the sampler's positive "
               "input and to this node's 'conditioning' input (then 'prompt' may stay empty), or type the "
               "sampler's positive prompt here word for word, with the same CLIP")
    else:
        fix = "connect the same UG Prompt to this node's 'conditioning' input and to the sampler's positive input"
    return (f"self-guidance term {term_name!r} ({check.node}): its words were looked up in input '{check.source}' "
            f"= {check.text!r}, but {given}, so its token positions would point at other words; {fix}")
