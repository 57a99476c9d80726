"""Universal Guidance for ComfyUI: training-free guidance of diffusion models with off-the-shelf networks.

ComfyUI loads this folder as a custom-node package; only the node mappings are exported here.
"""
try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ModuleNotFoundError as error:  # imported outside ComfyUI (pytest collects this folder as a package)
    if error.name != "comfy":
        raise
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
