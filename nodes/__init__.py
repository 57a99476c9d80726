"""ComfyUI adapters of the Universal Guidance pack (node classes and the ComfyUI bridge)."""
from .guidance_nodes import UniversalGuidanceImage
from .sampler_nodes import UniversalGuidanceKSampler, UniversalGuidanceSampler

_NODES = (UniversalGuidanceKSampler, UniversalGuidanceSampler, UniversalGuidanceImage)

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in _NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: cls.NAME for cls in _NODES}
