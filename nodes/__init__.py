"""ComfyUI adapters of the Universal Guidance pack (node classes and the ComfyUI bridge)."""
from .guidance_nodes import UniversalGuidanceImage
from .network_nodes import NETWORK_NODES
from .inversion_nodes import INVERSION_NODES
from .sampler_nodes import (UniversalGuidanceKSampler, UniversalGuidanceRunReport, UniversalGuidanceSampler,
                            UniversalGuidanceSamplerOptions)
from .self_guidance_nodes import SELF_GUIDANCE_NODES

_NODES = (UniversalGuidanceKSampler, UniversalGuidanceSampler, UniversalGuidanceSamplerOptions,
          UniversalGuidanceRunReport, UniversalGuidanceImage, *NETWORK_NODES, *SELF_GUIDANCE_NODES, *INVERSION_NODES)

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in _NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: cls.NAME for cls in _NODES}
