"""Train the second shapes model (``models2.ShapesUNetV``: cosine schedule to σ = 316, v-prediction) and write
``weights/diffusion_cosine.safetensors``.

    python -m benchmarks.shapes.train2 [--out DIR] [--threads 1] [--iters N] [--snapshots DIR]

Seeded as ``train``: every batch is rendered from ``seed·1_000_003 + iteration`` (seed 7 here, so the scenes are
not the first model's), noise, timesteps and the null-caption drop come from a private generator, fixed thread
count, deterministic algorithms. Loss: v-MSE with min-SNR-5 weighting (``w = min(SNR, 5)/(SNR + 1)``, the v form
of Hang et al. 2023), uniform t ∈ {0…999} on the cosine schedule (so uniform in u = 2/π·atan σ), 10 % null
captions, each object's colour word left out of the caption with probability 0.2 (so "circle" means a circle of
the model's choice of colour: the prompt of an appearance transfer need not name a colour), bf16 autocast, AdamW
with warm-up and cosine decay, EMA saved as fp16.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import data, models, models2
from .train import drop_colour_words, run_training, sha256

DIFFUSION = dict(seed=7, ch=32, emb=128, context_dim=64, heads=4, iters=2000, batch=48, lr=2e-3, warmup=100,
                 lr_floor=0.05, ema=0.998, null_p=0.1, min_snr=5.0, two_fraction=0.6, weight_decay=0.0,
                 colour_drop=0.2)


def train(cfg: dict = DIFFUSION, log=print, snapshot=None):
    abar = models2.COSINE.alphas_cumprod.float()

    def batch_loss(net, it, gen, null):
        x0, tokens, scenes = data.batch(cfg["batch"], cfg["seed"] * 1_000_003 + it, cfg["two_fraction"])
        b = x0.shape[0]
        tokens = drop_colour_words(scenes, tokens, cfg.get("colour_drop", 0.0), gen)
        t = torch.randint(0, models2.COSINE.steps, (b,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        drop = torch.rand(b, generator=gen) < cfg["null_p"]
        tokens = torch.where(drop[:, None], null, tokens)
        a = abar[t].view(-1, 1, 1, 1)
        alpha, s = a.sqrt(), (1 - a).sqrt()
        zt = alpha * x0 + s * eps
        v = alpha * eps - s * x0
        snr = abar[t] / (1 - abar[t])
        weight = snr.clamp(max=cfg["min_snr"]) / (snr + 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = net(zt, t.float(), tokens)
        return (weight * (pred.float() - v).pow(2).mean(dim=(1, 2, 3))).mean()

    ema, stats = run_training(cfg, lambda: models2.ShapesUNetV(cfg["ch"], cfg["emb"], cfg["context_dim"], cfg["heads"]),
                              batch_loss, "cosine-v", log, snapshot, log_every=100)
    meta = dict(cfg, prediction="v",
                schedule=f"cosine sigma=tan(pi/2 u), sigma {models2.SIGMA_MIN}..{models2.SIGMA_MAX}, T=1000", **stats)
    return ema, meta


def save(net, meta: dict, folder: Path) -> Path:
    return models.write_weights(net, meta, Path(folder) / models2.FILE)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=models.WEIGHTS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--snapshots", type=Path, default=None, help="also save the EMA every 500 iterations here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    cfg = dict(DIFFUSION, iters=args.iters or DIFFUSION["iters"])
    snap = None
    if args.snapshots:
        snap = lambda it, ema: save(ema, dict(cfg, iters_done=it), args.snapshots / f"it{it}")
    net, meta = train(cfg, log=lambda m: print(m, flush=True), snapshot=snap)
    meta["threads"], meta["torch"] = args.threads, torch.__version__
    stored = {k: v for k, v in meta.items() if k not in ("train_seconds", "cpu_seconds")}
    path = save(net, stored, args.out)
    meta["sha256"] = sha256(path)
    print(f"  wrote {path} ({path.stat().st_size / 1e6:.2f} MB, sha256 {meta['sha256']})", flush=True)
    print(json.dumps({k: meta[k] for k in ("train_seconds", "cpu_seconds", "sha256", "parameters")}))
    return meta


if __name__ == "__main__":
    main()
