"""What one image-guided iteration needs in GPU memory, for full-size SD1.5, SDXL, SD3.5 and Flux-dev, counted
without the hardware.

The denoisers and decoders are ComfyUI's own model classes (``comfy.supported_models`` → ``model_base``, with the
``unet_config`` ComfyUI detects in the released checkpoints; ``comfy.ldm.modules.diffusionmodules.model`` VAE;
``comfy.taesd`` TAESD / TAESD3 / TAEF1), built with their weights on the ``meta`` device (shapes and dtypes, no
storage, no compute) in the dtypes ComfyUI picks on a current NVIDIA GPU: fp16 UNets (SD1.5, SDXL), bf16 DiTs
(SD3.5, Flux), Flux also with fp8 (e4m3fn) weights cast to bf16 layer by layer (``comfy.ops.manual_cast``, as
``weight_dtype fp8_e4m3fn`` loads it), bf16 VAEs. Attention is the memory-efficient kind ComfyUI uses on GPUs
(PyTorch SDPA; counted with the flash kernel, which keeps the output and the log-sum-exp, not the N×N matrix).

One guided iteration = the denoiser's forward on the CFG batch (2 for SD1.5/SDXL/SD3.5; 1 for the
guidance-distilled Flux), x̂0, the decoder's forward on x̂0 (the full VAE or the tiny one), a pixel loss, and the
backward pass to the input latent (never to the weights). ``low_memory`` = activation checkpointing (non-reentrant
``torch.utils.checkpoint``, as ``nodes/guided_calls.low_memory`` applies it) of the UNet's ResBlocks and
SpatialTransformers, SD3's joint blocks, Flux's double and single blocks, the VAE decoder's ResnetBlocks/attention
and TAESD's blocks. Flux's blocks add a residual in place to an input autograd saved: that input is copied at the
block's entry (inside the checkpoint when on). Counted per row:

* ``weights_gb``: the denoiser's and the decoder's parameters and buffers, once (no copy of any weight; text
  encoders and the guidance network are not resident during the iteration and are left out);
* ``saved_gb``: bytes of the distinct storages autograd keeps for the backward pass (``saved_tensors_hooks``),
  weights excluded; per-layer cast weights (fp8 → bf16) are not weights and are counted here;
* ``peak_gb`` = ``weights_gb`` + inputs + the highest sum of live bytes of every storage created during the forward
  and the backward (a ``TorchDispatchMode`` sees every operator output; a storage is live from its first appearance
  until a weakref finalizer sees it freed). It is what PyTorch's caching allocator must hold at least; the
  allocator's rounding and fragmentation, the CUDA context (~0.3-0.5 GB) and ComfyUI's reserve come on top.

The method is checked against real tensors: the full-size SD1.5 UNet and VAE at 256² with random fp32 weights on
the CPU, counted on the meta device and then run for real under the same accounting and under
``torch.profiler``'s allocator record (an independent peak of the CPU allocator).

    python -m benchmarks.memory --out out/bench     # ComfyUI v0.3.64 (COMFYUI_PATH): memory.json + the table

The modules: ``counter`` (the counter, ``count``, ``profiler_peak``, ``wrapped_blocks``), ``families`` (the models
and one iteration on them, ``count_row``), ``real`` (the checks on real tensors), ``cli`` (the command, the table).
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # the pack's ``headless`` package, when the command is run from elsewhere
    sys.path.insert(0, _ROOT)
