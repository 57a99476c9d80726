"""Where appearance lives: which block's activations, averaged under an object's mask, tell its colour (and how
much they also tell its shape), on a shapes model.

    python -m benchmarks.shapes.appearance_probe [--model shipped|cosine] [--scenes 120] [--out out/bench]

Clean rendered scenes are noised to the σ of DDIM steps 10 / 20 / 30 of 50 (fixed noise) and passed once through
the model with the caption; forward hooks record the output of every block. For each object, each block's
activations are averaged under the object's rendered mask (resized to the block's resolution, nearest), and a
leave-one-out nearest-class-mean classifier reads the colour, and separately the shape, from that vector (chance:
1/3). A block where appearance lives reads colour near 1.0; the self-guidance appearance term uses one block's
activations as Ψ (``rec.feats``: ``up16`` on ``models.ShapesUNet``, ``dec16`` on ``models2.ShapesUNetV``).
Writes ``appearance_probe[_cosine].json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import adapter, data, models

BLOCKS = {"shipped": ("t_down16", "t_down8", "t_mid8", "t_up8", "t_up16", "u32"),
          "cosine": ("t_enc16", "t_mid8", "m2", "t_dec16", "t_dec32"),
          "mmdit": ("doubles.0", "doubles.1", "doubles.2", "doubles.3", "singles.0")}
FEATS = {"shipped": "t_up16", "cosine": "t_dec16", "mmdit": "doubles.1"}


def _image_map(out, grid: int = 8) -> torch.Tensor:
    """A block's output as ``[B, C, H, W]``: a UNet block's as is; an MMDiT block's image tokens (a double block's
    image stream, or the image rows after the text of a single block) on their ``grid``×``grid`` patch grid."""
    if isinstance(out, tuple):
        out = out[1]
    elif out.dim() == 3:
        out = out[:, -grid * grid:]
    else:
        return out
    return out.transpose(1, 2).unflatten(2, (grid, grid))


def loo_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out nearest-class-mean accuracy (features standardised)."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    correct = 0
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        means = {c: x[keep & (y == c)].mean(0) for c in np.unique(y[keep])}
        pred = min(means, key=lambda c: np.linalg.norm(x[i] - means[c]))
        correct += pred == y[i]
    return round(correct / len(y), 4)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("shipped", "cosine", "mmdit"), default="shipped")
    ap.add_argument("--scenes", type=int, default=120)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--weights", type=Path, default=None, help="folder of the weights (default: the shipped ones)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from .edits import MODELS
    model = MODELS[args.model](args.weights or models.WEIGHTS)
    flow = getattr(model, "prediction", "eps") == "flow"
    sched = adapter.schedule_of(model)
    scenes = data.sample_scenes(args.scenes, 99)
    x0 = data.to_latent(data.render(scenes))
    tokens = data.tokens([data.caption(s) for s in scenes])
    masks = []   # per object: (scene index, colour, shape, [32, 32] mask)
    for b, scene in enumerate(scenes):
        for o in scene:
            one = data.render([(o,)])[0]
            m = (one - data.BACKGROUND).abs().amax(0) > 0.25
            masks.append((b, o.colour, o.shape, m.float()))
    sigmas = sched.ddim_sigmas(50)
    out = {"model": args.model, "scenes": args.scenes, "objects": len(masks), "psi_block": FEATS[args.model],
           "steps": {}}
    for step in (10, 20, 30):
        sigma = float(sigmas[step])
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(step))
        x = (1 - sigma) * x0 + sigma * noise if flow else x0 + sigma * noise
        rec = {}
        hooks = [model.get_submodule(n).register_forward_hook(
                 lambda mod, i, o, n=n: rec.__setitem__(n, _image_map(o).detach())) for n in BLOCKS[args.model]]
        with torch.no_grad():
            t = sched.sigma_to_t(torch.full((len(scenes),), sigma))
            model(x if flow else x / (1 + sigma ** 2) ** 0.5, t, tokens)
        for h in hooks:
            h.remove()
        row = {}
        for name, act in rec.items():
            vecs = []
            for b, _, _, m in masks:
                mm = F.interpolate(m[None, None], size=act.shape[-2:], mode="area")[0, 0]
                mm = (mm >= 0.5).float() if mm.sum() >= 1 else (mm > 0).float()
                vecs.append((act[b] * mm).sum((1, 2)).numpy() / max(float(mm.sum()), 1.0))
            v = np.stack(vecs)
            row[name] = {"colour": loo_accuracy(v, np.array([c for _, c, _, _ in masks])),
                         "shape": loo_accuracy(v, np.array([s for _, _, s, _ in masks])),
                         "resolution": list(act.shape[-2:])}
        out["steps"][f"{step} (sigma {sigma:.3g})"] = row
        print(step, json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "appearance_probe.json" if args.model == "shipped" else f"appearance_probe_{args.model}.json"
    (args.out / name).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
