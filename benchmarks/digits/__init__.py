"""Quality benchmark and demo of Universal Guidance on 8×8 digits (sklearn ``load_digits``, no download).

``data``: the fixed train/test split and the latent ↔ image maps. ``models``: the ε-prediction diffusion model
(exposed as a VE denoiser ``D(x, σ)``), the guidance classifier and the evaluator. ``train``: retrains all three
deterministically. ``quality``: the benchmark. ``demo``: a picture grid and a validity table.
"""
