"""The pack's one user-facing error type (no ComfyUI imports, so every node module can raise it)."""


class GuidanceInputError(ValueError):
    """A user-facing error; the message names the node and the input and says what to do."""
