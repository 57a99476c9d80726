"""Self-guidance benchmark on synthetic 32×32 shape scenes: a tiny text-conditioned diffusion model with real
cross-attention, trained offline and shipped with the pack.

``data``: seeded scenes, captions, tokens, ground truth. ``models``: the ε-UNet with named cross-attention layers
and the capture mechanism, and the shape classifier. ``adapter``: the engine's denoiser convention, the σ schedule
and a plain DDIM sampler. ``train``: deterministic training. ``metrics``: colour-mask detector and shape
classifier. ``probe``: quality and attention-localization report.
"""
