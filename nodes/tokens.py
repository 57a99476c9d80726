"""Words of a prompt → their token positions in the conditioning, with the model's own CLIP tokenizer.

``clip.tokenize(text, return_word_ids=True)`` gives, per text encoder (``l``; ``h``; ``g`` and ``l`` for SDXL),
chunks of 77 ``(token, weight, word id)``: SOT, the words' tokens, EOT and padding (word id 0). Chunk i covers
context positions 77·i … 77·i + 76. A word (or a phrase of several words) is tokenized the same way and found
as a subsequence of the prompt's token ids: every sub-token of every occurrence is kept, prompt weights such as
``(dog:1.3)`` change nothing, long prompts count their chunks, and every text encoder must agree on the positions.
"""
from __future__ import annotations

import re

from .comfy_bridge import GuidanceInputError


# The CLIP encoders' keys in ComfyUI's tokenizer output (SD1: l; SD2: h; SDXL/SD3: g and l). Other encoders of a
# model (T5 of SD3/Flux) have their own token layout and are not what a UNet's cross-attention reads.
CLIP_KEYS = ("l", "g", "h")


def _streams(clip, text: str) -> dict:
    """``{encoder key: [(position, token id or None, word id)]}`` over all chunks."""
    tokens = clip.tokenize(text, return_word_ids=True)
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
    """``(sorted positions, context length)`` of every sub-token of every occurrence of each of ``words``."""
    if clip is None or not hasattr(clip, "tokenize"):
        raise GuidanceInputError(f"{node}: input 'clip' is missing; connect the CLIP of the checkpoint")
    queries = split_words(words)
    if not queries:
        raise GuidanceInputError(f"{node}: input '{input_name}' is empty; name a word of the prompt, e.g. 'dog'")
    if not (prompt or "").strip():
        raise GuidanceInputError(f"{node}: input 'prompt' is empty; give the positive prompt, word for word")
    streams = _streams(clip, prompt)
    clip_keys = [k for k in streams if k in CLIP_KEYS]
    streams = {k: streams[k] for k in clip_keys} if clip_keys else streams
    length = max(len(s) for s in streams.values())
    found = {}
    for key, stream in streams.items():
        content = [(pos, tok) for pos, tok, wid in stream if wid and tok is not None]
        positions = set()
        for query in queries:
            q_stream = _streams(clip, query).get(key, [])
            q_ids = [tok for _, tok, wid in q_stream if wid and tok is not None]
            hits = [content[i:i + len(q_ids)] for i in range(len(content) - len(q_ids) + 1)
                    if q_ids and [t for _, t in content[i:i + len(q_ids)]] == q_ids]
            if not hits:
                raise GuidanceInputError(
                    f"{node}: input '{input_name}': {query!r} is not in the prompt; the words of input 'prompt' "
                    f"are {', '.join(repr(w) for w in prompt_words(prompt))}")
            positions.update(pos for hit in hits for pos, _ in hit)
        found[key] = sorted(positions)
    values = list(found.values())
    if any(v != values[0] for v in values[1:]):
        raise GuidanceInputError(f"{node}: the text encoders of this CLIP place {words!r} at different positions "
                                 f"({found}); self-guidance cannot tell which to use")
    return values[0], length
