"""Train the shapes networks deterministically and rewrite ``weights/*.safetensors``.

    python -m benchmarks.shapes.train [--only diffusion|classifier] [--out DIR] [--threads 1] [--iters N]

Everything is seeded (``torch.manual_seed`` per network; every batch is rendered from its own seed
``seed·1_000_003 + iteration``; noise, timesteps and the null-caption drop come from a private
``torch.Generator``) and runs with a fixed number of CPU threads, so the same machine and thread count rewrite
bit-identical files (wall and CPU times are printed, not stored). Default: 1 thread — on a shared 2-core machine
two threads lose badly whenever another job holds a core.

Diffusion: ε-prediction loss with min-SNR-5 weighting (Hang et al. 2023: ``w = min(SNR, 5)/SNR``), uniform
t ∈ {0…999} on SD's scaled-linear schedule (``adapter``), 10 % null captions (classifier-free guidance), bf16
autocast on the CPU, AdamW with warm-up and cosine decay, EMA of the weights (the EMA is what is saved).
Fresh scenes every batch (60 % of them two-object), so there is no fixed training set to over-fit.

Shape classifier: crops of clean rendered single shapes (the same detector pipeline as ``metrics``), with light
blur / noise / contrast augmentation, independent of the diffusion model.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import adapter, data, metrics, models

DIFFUSION = dict(seed=1, ch=24, emb=128, context_dim=64, heads=4, iters=4500, batch=64, lr=1.5e-3, warmup=200,
                 lr_floor=0.1, ema=0.998, null_p=0.1, min_snr=5.0, two_fraction=0.6, weight_decay=0.0)
CLASSIFIER = dict(seed=2, iters=800, batch=128, lr=2e-3, radius=(2.5, 10.0), blur=0.6, noise=0.06)


def _lr_lambda(cfg: dict):
    def f(i: int) -> float:
        warm = min(1.0, (i + 1) / cfg["warmup"])
        cos = 0.5 * (1 + np.cos(np.pi * min(i / cfg["iters"], 1.0)))
        return warm * (cfg["lr_floor"] + (1 - cfg["lr_floor"]) * cos)
    return f


def _ema_update(ema, net, decay: float) -> None:
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), net.parameters()):
            pe.lerp_(p.detach(), 1 - decay)


def drop_colour_words(scenes, tokens: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """The batch's tokens with each object's colour word left out with probability ``p`` (``"circle left of blue
    square"``: the model picks that object's colour and must read its shape word). ``p`` 0: ``tokens`` unchanged,
    nothing drawn from ``gen``."""
    if not p:
        return tokens
    drop = (torch.rand(len(scenes), 2, generator=gen) < p).tolist()
    return data.tokens([data.caption(s, {i for i in range(len(s)) if drop[j][i]}) for j, s in enumerate(scenes)])


def run_training(cfg: dict, make_net, batch_loss, name: str, log=print, snapshot=None, log_every: int = 250,
                 snapshot_every: int = 500, log_first: int = 0):
    """The training loop every shapes diffusion model shares (``train``, ``train2``, ``train_mmdit``).

    Seeded from ``cfg["seed"]`` (the network's initialisation after ``torch.manual_seed``, and a private generator
    that ``batch_loss(net, it, gen, null_tokens)`` draws noise, times and caption drops from); AdamW with warm-up
    and cosine decay (``_lr_lambda``), gradient clipping at 1, EMA (``_ema_update``); ``snapshot(it, ema)`` every
    ``snapshot_every`` iterations. Returns ``(ema in eval mode, {final_loss, parameters, train_seconds,
    cpu_seconds})``."""
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    net = make_net()
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], betas=(0.9, 0.99), weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    null = torch.tensor(data.tokenize(""))
    wall, cpu, running = time.time(), time.process_time(), None
    for it in range(cfg["iters"]):
        loss = batch_loss(net, it, gen, null)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, net, min(cfg["ema"], (1 + it) / (10 + it)))
        lv = float(loss.detach())
        running = lv if running is None else 0.98 * running + 0.02 * lv
        if (it + 1) % log_every == 0 or it + 1 == cfg["iters"] or it < log_first:
            log(f"  {name} it {it + 1}/{cfg['iters']} loss {running:.4f} (last {lv:.4f}) "
                f"({time.time() - wall:.0f}s wall, {time.process_time() - cpu:.0f} CPU-s)")
        if snapshot is not None and (it + 1) % snapshot_every == 0:
            snapshot(it + 1, ema)
    return ema.eval(), dict(final_loss=round(running, 5), parameters=models.parameter_count(net),
                            train_seconds=round(time.time() - wall, 1),
                            cpu_seconds=round(time.process_time() - cpu, 1))


def train_diffusion(cfg: dict = DIFFUSION, log=print, snapshot=None) -> tuple[models.ShapesUNet, dict]:
    """Train the ε-UNet; ``snapshot(it, ema)`` (optional) is called every 500 iterations."""
    abar = adapter.SCHEDULE.alphas_cumprod.float()

    def batch_loss(net, it, gen, null):
        x0, tokens, _ = data.batch(cfg["batch"], cfg["seed"] * 1_000_003 + it, cfg["two_fraction"])
        b = x0.shape[0]
        t = torch.randint(0, adapter.T_STEPS, (b,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        drop = torch.rand(b, generator=gen) < cfg["null_p"]
        tokens = torch.where(drop[:, None], null, tokens)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        snr = abar[t] / (1 - abar[t])
        weight = snr.clamp(max=cfg["min_snr"]) / snr
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = net(zt, t.float(), tokens)
        return (weight * (pred.float() - eps).pow(2).mean(dim=(1, 2, 3))).mean()

    ema, stats = run_training(cfg, lambda: models.ShapesUNet(cfg["ch"], cfg["emb"], cfg["context_dim"], cfg["heads"]),
                              batch_loss, "diffusion", log, snapshot)
    meta = dict(cfg, schedule=f"scaled linear beta {adapter.BETA_START}..{adapter.BETA_END}, T={adapter.T_STEPS}",
                **stats)
    return ema, meta


# ---------------------------------------------------------------------------------------------- classifier
def _single_shapes(n: int, rng: np.random.Generator, radius: tuple) -> list:
    """``n`` one-object scenes with a uniformly random shape, colour, position and radius in ``radius``."""
    scenes = []
    for _ in range(n):
        colour, shape = data.COLOURS[rng.integers(3)], data.SHAPES[rng.integers(3)]
        scenes.append((data._place(rng, colour, shape, float(rng.uniform(*radius))),))
    return scenes


def classifier_batch(n: int, seed: int, cfg: dict = CLASSIFIER, augment: bool = True):
    """``(crops [n,1,16,16], labels [n])`` of rendered single shapes through the detector's crop; with ``augment``:
    a random Gaussian blur (σ ≤ ``blur`` px), contrast 0.7–1 and pixel noise (std ≤ ``noise``) on the image."""
    rng = np.random.default_rng(seed)
    scenes = _single_shapes(n, rng, cfg["radius"])
    img = data.render(scenes)
    if augment:
        img = _augment(img, rng, cfg)
    crops, labels = [], []
    for scene, det in zip(scenes, metrics.detect(img)):
        d = det[scene[0].colour]
        if d.crop is not None:
            crops.append(d.crop)
            labels.append(data.SHAPES.index(scene[0].shape))
    return torch.stack(crops), torch.tensor(labels)


def _augment(img: torch.Tensor, rng: np.random.Generator, cfg: dict) -> torch.Tensor:
    out = []
    for im in img:
        s = rng.uniform(0, cfg["blur"])
        if s > 0.05:
            k = torch.arange(-2, 3, dtype=torch.float32)
            g = torch.exp(-k ** 2 / (2 * s * s))
            g = g / g.sum()
            im = F.conv2d(F.pad(im[:, None], (2, 2, 0, 0), mode="replicate"), g.view(1, 1, 1, 5))
            im = F.conv2d(F.pad(im, (0, 0, 2, 2), mode="replicate"), g.view(1, 1, 5, 1))[:, 0]
        c = rng.uniform(0.7, 1.0)
        im = data.BACKGROUND + c * (im - data.BACKGROUND)
        im = im + float(rng.uniform(0, cfg["noise"])) * torch.from_numpy(rng.standard_normal(im.shape).astype(np.float32))
        out.append(im.clamp(0, 1))
    return torch.stack(out)


def clean_accuracy(classifier: models.ShapeClassifier, n: int = 2000, seed: int = 12345) -> dict:
    """Accuracy on clean (un-augmented) renders: single shapes of ``RADIUS_ONE``, and the full ``metrics.judge``
    pipeline on benchmark scenes (half two-object)."""
    rng = np.random.default_rng(seed)
    single = _single_shapes(n, rng, data.RADIUS_ONE)
    judged_single = metrics.judge(classifier, data.render(single), single)
    scenes = data.sample_scenes(n, seed + 1)
    judged = metrics.judge(classifier, data.render(scenes), scenes)
    return {"single_shapes": metrics.summary(judged_single), "scenes": metrics.summary(judged),
            "detector_vs_truth": detector_errors(scenes, judged)}


def detector_errors(scenes, judged) -> dict:
    """Detector vs ground truth on clean renders: max / mean |centroid error| (image fraction) and area ratio."""
    err, ratio = [], []
    for scene, j in zip(scenes, judged):
        for gt, det in zip(data.truth(scene), j["objects"]):
            err.append(max(abs(a - b) for a, b in zip(gt["centroid"], det["centroid"])))
            ratio.append(det["area"] / gt["area"])
    err, ratio = np.asarray(err), np.asarray(ratio)
    return {"objects": len(err), "centroid_err_max": float(err.max()), "centroid_err_mean": float(err.mean()),
            "area_ratio_min": float(ratio.min()), "area_ratio_max": float(ratio.max())}


def train_classifier(cfg: dict = CLASSIFIER, log=print) -> tuple[models.ShapeClassifier, dict]:
    torch.manual_seed(cfg["seed"])
    net = models.ShapeClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["iters"])
    wall, cpu = time.time(), time.process_time()
    for it in range(cfg["iters"]):
        x, y = classifier_batch(cfg["batch"], cfg["seed"] * 1_000_003 + it, cfg)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (it + 1) % 500 == 0:
            log(f"  classifier it {it + 1}/{cfg['iters']} loss {float(loss.detach()):.4f} ({time.time() - wall:.0f}s)")
    net.eval().requires_grad_(False)
    acc = clean_accuracy(net)
    log(f"  classifier clean accuracy: {json.dumps(acc)}")
    meta = dict(cfg, clean_accuracy=acc, train_seconds=round(time.time() - wall, 1),
                cpu_seconds=round(time.process_time() - cpu, 1))
    return net, meta


# ---------------------------------------------------------------------------------------------- main
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(models.FILES), action="append",
                    help="retrain only this network (repeatable); default: both")
    ap.add_argument("--out", type=Path, default=models.WEIGHTS, help="weights folder (default: the shipped one)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (fixed for reproducibility)")
    ap.add_argument("--iters", type=int, default=None, help="override the diffusion iteration count")
    ap.add_argument("--snapshots", type=Path, default=None, help="also save the EMA every 500 iterations here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    report = {}
    for name in args.only or ["classifier", "diffusion"]:
        print(f"training {name} ...", flush=True)
        if name == "diffusion":
            cfg = dict(DIFFUSION, iters=args.iters or DIFFUSION["iters"])
            snap = None
            if args.snapshots:
                snap = lambda it, ema: models.save(ema, "diffusion", dict(cfg, iters_done=it), args.snapshots / f"it{it}")
            net, meta = train_diffusion(cfg, log=lambda m: print(m, flush=True), snapshot=snap)
        else:
            net, meta = train_classifier(log=lambda m: print(m, flush=True))
        meta["threads"] = args.threads
        meta["torch"] = torch.__version__
        # Times vary from run to run: kept out of the file so that a rerun rewrites identical bytes.
        stored = {k: v for k, v in meta.items() if k not in ("train_seconds", "cpu_seconds")}
        path = models.save(net, name, stored, args.out)
        meta["sha256"] = sha256(path)
        report[name] = meta
        print(f"  wrote {path} ({path.stat().st_size / 1e6:.2f} MB, sha256 {meta['sha256']})", flush=True)
    print(json.dumps({k: {kk: v[kk] for kk in ("train_seconds", "cpu_seconds", "sha256")} for k, v in report.items()}))
    return report


if __name__ == "__main__":
    main()
