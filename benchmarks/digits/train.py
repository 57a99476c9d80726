"""Retrain the three digits networks deterministically and rewrite ``weights/*.safetensors``.

    python -m benchmarks.digits.train [--only diffusion|classifier|evaluator] [--out DIR]

Everything is seeded (``torch.manual_seed`` per network, a private ``torch.Generator`` for batches, noise and
augmentation) and runs with a fixed number of CPU threads (``--threads``, default 1), so the same machine and
thread count rewrite bit-identical files (two runs give the same SHA-256: wall times are printed, not stored).
The shipped weights were made with ``--threads 1``: about 3 min of CPU in all (diffusion ~2.7 min, the two
classifiers ~20 s). Training data: the training split of ``data.load_split`` only.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import models
from .data import load_split

DIFFUSION = dict(seed=1, ch=16, emb=128, iters=6000, batch=128, lr=1e-3, warmup=200, ema=0.995)
CLASSIFIER = dict(seed=2, epochs=30, batch=64, lr=1e-3)
EVALUATOR = dict(seed=3, epochs=60, batch=64, lr=1e-3, shift=1, noise=0.15)


def _accuracy(net, x, y) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random integer translation by up to ``max_shift`` pixels (zero = background -1 fill)."""
    if max_shift <= 0:
        return x
    pad = F.pad(x, [max_shift] * 4, value=-1.0)
    out = torch.empty_like(x)
    offs = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=gen)
    for i in range(x.shape[0]):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = pad[i, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]
    return out


def train_diffusion(cfg: dict = DIFFUSION, log=print) -> tuple[models.EpsUNet, dict]:
    """ε-prediction DDPM loss on the training split (linear β schedule, uniform t), Adam + EMA of weights."""
    split = load_split()
    x = split.x_train
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    net = models.build_eps(cfg)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / cfg["warmup"]) * max(0.05, 1.0 - i / cfg["iters"]))
    abar = models.Schedule().alphas_cumprod.float()
    t0 = time.time()
    running = None
    for it in range(cfg["iters"]):
        idx = torch.randint(0, x.shape[0], (cfg["batch"],), generator=gen)
        x0 = x[idx]
        t = torch.randint(0, models.T_STEPS, (cfg["batch"],), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(net(zt, t.float()), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(cfg["ema"], (1 + it) / (10 + it))
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.mul_(d).add_(p.detach(), alpha=1 - d)
        lv = float(loss.detach())
        running = lv if running is None else 0.98 * running + 0.02 * lv
        if (it + 1) % 500 == 0 or it + 1 == cfg["iters"]:
            log(f"  diffusion it {it + 1}/{cfg['iters']} loss {running:.4f} ({time.time() - t0:.0f}s)")
    meta = dict(cfg, train_seconds=round(time.time() - t0, 1), final_loss=round(running, 5),
                schedule=f"linear beta {models.BETA_START}..{models.BETA_END}, T={models.T_STEPS}")
    return ema.eval(), meta


def _train_classifier(net, cfg: dict, augment, log, what: str):
    split = load_split()
    x, y = split.x_train, split.y_train
    gen = torch.Generator().manual_seed(cfg["seed"])
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["epochs"])
    t0 = time.time()
    for epoch in range(cfg["epochs"]):
        net.train()
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], cfg["batch"]):
            idx = perm[i:i + cfg["batch"]]
            xb = augment(x[idx], gen)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    meta = dict(cfg, train_seconds=round(time.time() - t0, 1),
                train_accuracy=round(_accuracy(net, x, y), 4),
                test_accuracy=round(_accuracy(net, split.x_test, split.y_test), 4))
    log(f"  {what}: test accuracy {meta['test_accuracy']:.4f} ({meta['train_seconds']}s)")
    return net, meta


def train_classifier(cfg: dict = CLASSIFIER, log=print):
    """The guidance network: clean training digits, no augmentation (an ordinary off-the-shelf classifier)."""
    torch.manual_seed(cfg["seed"])
    return _train_classifier(models.GuidanceClassifier(), cfg, lambda xb, gen: xb, log, "classifier")


def train_evaluator(cfg: dict = EVALUATOR, log=print):
    """The judge: different architecture and seed; ±1 px shifts and pixel noise make it harder to fool."""
    torch.manual_seed(cfg["seed"])

    def augment(xb, gen):
        xb = _shift(xb, cfg["shift"], gen)
        return xb + cfg["noise"] * torch.randn(xb.shape, generator=gen)

    return _train_classifier(models.Evaluator(), cfg, augment, log, "evaluator")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(models.FILES), action="append",
                    help="retrain only this network (repeatable); default: all three")
    ap.add_argument("--out", type=Path, default=models.WEIGHTS, help="weights folder (default: the shipped one)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (fixed for reproducibility)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    todo = args.only or ["classifier", "evaluator", "diffusion"]
    report = {}
    for name in todo:
        print(f"training {name} ...", flush=True)
        fn = {"diffusion": train_diffusion, "classifier": train_classifier, "evaluator": train_evaluator}[name]
        net, meta = fn()
        meta["threads"] = args.threads
        # Wall time varies from run to run: kept out of the file so that a rerun rewrites identical bytes.
        stored = {k: v for k, v in meta.items() if k != "train_seconds"}
        path = models.save(net, name, stored, args.out)
        meta["sha256_16"] = _sha(path)
        report[name] = meta
        print(f"  wrote {path} ({path.stat().st_size / 1e6:.2f} MB, sha256 {meta['sha256_16']})", flush=True)
    print(json.dumps({k: {kk: v[kk] for kk in ("train_seconds", "sha256_16")} for k, v in report.items()}))
    return report


if __name__ == "__main__":
    main()
