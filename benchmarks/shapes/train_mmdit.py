"""Train the transformer shapes model (``mmdit.ShapesMMDiT``, rectified flow) and write ``weights/mmdit_flow.safetensors``.

    python -m benchmarks.shapes.train_mmdit [--out DIR] [--threads 1] [--iters N] [--snapshots DIR]

Seeded as ``train``: every batch is rendered from ``seed·1_000_003 + iteration`` (seed 11: scenes that neither UNet
saw in that order), noise, times and the null-caption drop come from a private generator, fixed thread count,
deterministic algorithms. Loss: rectified flow, ``x_t = (1 − t)·x0 + t·n``, MSE of the predicted velocity against
``n − x0``, t uniform in [0, 1] (as rectified flow on CIFAR-10; see below); 10 % null captions; bf16
autocast; AdamW with warm-up and cosine decay (``train._lr_lambda``), EMA (``train._ema_update``) saved as fp16.

Why uniform t: a first run with SD3's logit-normal times (``t = sigmoid(N(0, 1))``, which draws t > 0.9 only 1.4 %
of the time) sampled scattered patches at 800 iterations (every sample had extra blobs, shapes 27 % correct): on a
32×32 image the layout is decided at high noise, which that density hardly trains (SD3 chose it for 256²+ latents).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import data, mmdit, models
from .train import drop_colour_words, run_training, sha256

DIFFUSION = dict(seed=11, dim=128, heads=4, depth=4, single=1, mlp=2, context_dim=64, patch=mmdit.PATCH, conv=32,
                 hourglass=24, iters=2500, batch=64, lr=1.5e-3, warmup=100, lr_floor=0.05, ema=0.995, null_p=0.1,
                 time_sampling="uniform", two_fraction=0.6, weight_decay=0.0)
ARCH = tuple(k for k in mmdit.CONFIG if k != "feature_block")   # what --set may change of the network
# Settings ``--set`` may add that the shipped configuration leaves at the model's default (kept out of DIFFUSION so
# that the shipped file's metadata, and so its bytes, stay what a rerun writes): ``local=1`` is the Mix-FFN variant,
# ``pooled=0`` drops the pooled caption from the conditioning vector, ``colour_drop=0.2`` names 20 % of the objects by
# their shape only (as ``train2``).
OPTIONAL = {"local": 0, "pooled": 1, "colour_drop": 0.0}


def train(cfg: dict = DIFFUSION, log=print, snapshot=None, every: int = 300):
    def batch_loss(net, it, gen, null):
        x0, tokens, scenes = data.batch(cfg["batch"], cfg["seed"] * 1_000_003 + it, cfg["two_fraction"])
        b = x0.shape[0]
        tokens = drop_colour_words(scenes, tokens, cfg.get("colour_drop", 0.0), gen)
        t = torch.rand(b, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        drop = torch.rand(b, generator=gen) < cfg["null_p"]
        tokens = torch.where(drop[:, None], null, tokens)
        tt = t.view(-1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * noise
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = net(xt, t, tokens)
        return (pred.float() - (noise - x0)).pow(2).mean()

    ema, stats = run_training(cfg, lambda: mmdit.ShapesMMDiT(**{k: cfg[k] for k in ARCH if k in cfg}), batch_loss,
                              "mmdit", log, snapshot, log_every=50, snapshot_every=every, log_first=3)
    return ema, dict(cfg, prediction="flow", **stats)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=models.WEIGHTS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--snapshots", type=Path, default=None, help="also save the EMA every 300 iterations here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting of DIFFUSION (an int or float), e.g. --set patch=2 --set dim=96")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    cfg = dict(DIFFUSION, iters=args.iters or DIFFUSION["iters"])
    for item in args.set:
        key, value = item.split("=", 1)
        known = cfg.get(key, OPTIONAL.get(key))
        if known is None:
            raise SystemExit(f"--set {item}: unknown setting {key!r}; settings: {sorted(cfg) + sorted(OPTIONAL)}")
        cfg[key] = type(known)(float(value)) if isinstance(known, (int, float)) else value
    snap = None
    if args.snapshots:
        snap = lambda it, ema: mmdit.save(ema, dict(cfg, iters_done=it), args.snapshots / f"it{it}")
    net, meta = train(cfg, log=lambda m: print(m, flush=True), snapshot=snap)
    meta["threads"], meta["torch"] = args.threads, torch.__version__
    stored = {k: v for k, v in meta.items() if k not in ("train_seconds", "cpu_seconds")}
    path = mmdit.save(net, stored, args.out)
    meta["sha256"] = sha256(path)
    print(f"  wrote {path} ({path.stat().st_size / 1e6:.2f} MB, sha256 {meta['sha256']})", flush=True)
    print(json.dumps({k: meta[k] for k in ("train_seconds", "cpu_seconds", "sha256", "parameters")}))
    return meta


if __name__ == "__main__":
    main()
