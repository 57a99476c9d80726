"""Universal Guidance for ComfyUI: training-free guidance of diffusion models with off-the-shelf networks.

ComfyUI loads this folder as a custom-node package; only the node mappings are exported here.
"""
NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
# The frontend extension that opens workflows saved before the samplers' expert knobs moved to UG Sampler Options.
WEB_DIRECTORY = "./web"
# Imported as a package (ComfyUI's loader, or pytest in a folder named like an identifier): load the nodes.
# Imported as a plain module (pytest in a folder named e.g. ComfyUI-UniversalGuidance): there is no package to
# import the nodes from, and nothing to export.
if __package__:
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
    except ModuleNotFoundError as error:  # imported outside ComfyUI (pytest collects this folder as a package)
        if error.name not in ("comfy", "folder_paths"):  # ComfyUI's own modules: absent outside ComfyUI
            raise

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
