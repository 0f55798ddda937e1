"""Can the tiny preset's vision backbone learn the 18 labels at all, and how fast?

The contrastive model gets label signal only through the text side; when it learns nothing it
is not clear whether the losses or the image features are at fault. This trains the tiny
backbone with a plain linear head on the labels (BCE, unknown labels masked) — the easiest
possible supervision for the same volumes, model space and augmentation — and reports the
held-out per-label AUC as it goes. If this curve is flat too, the backbone (or its resolution)
is the bottleneck, not the objectives.

    .venv/bin/python bench/backbone_probe.py --train DIR --test DIR [--pool mean|max]
        [--steps 200] [--eval-every 50] [--n-eval 200] [--volume-cache DIR]
        [--set KEY=VALUE ...] [--time-budget S]

``--set`` changes the tiny preset as ``bench/ablation.py`` variants do (``norm=batch``,
``windows=[(-1000,-400),(-160,240)]``, ``model.backbone.channels=(8,16,32,64)``), so a backbone
can be compared here, in minutes, before it costs a training run. ``--time-budget`` stops at a
wall-clock limit (evaluation time not counted) so that designs of different cost are compared
at equal CPU time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--test", type=Path, required=True)
    ap.add_argument("--pool", choices=["mean", "max"], default="mean")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--volume-cache", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--time-budget", type=float, default=0.0)
    args = ap.parse_args()
    import numpy as np
    import torch
    from ablation import variant_preset

    from engines.data.labels import LABELS
    from engines.datasets import collate, open_dataset
    from engines.model.vision import build_backbone
    from engines.training.diagnostics import rank_auc

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    _, p = variant_preset(":".join(["full", *args.set]))
    train = open_dataset(args.train, p.space, split="train", augment=p.augment, seed=0,
                         volume_cache=args.volume_cache)
    test = open_dataset(args.test, p.space, split="valid", volume_cache=args.volume_cache)
    backbone = build_backbone(p.model.backbone, p.space)
    head = torch.nn.Linear(backbone.out_dim, len(LABELS))
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=p.optim.weight_decay,
                            betas=p.optim.betas)

    def logits(x: torch.Tensor) -> torch.Tensor:
        f = backbone(x)  # [B, D, Gy, Gx, C]
        pooled = f.mean(dim=(1, 2, 3)) if args.pool == "mean" else f.amax(dim=(1, 2, 3))
        return head(pooled)  # type: ignore[no-any-return]

    eval_idx = list(range(min(args.n_eval, len(test))))
    ev = [test[i] for i in eval_idx]
    ex, ey = torch.stack([s.image for s in ev]), torch.stack([s.labels for s in ev])

    def evaluate() -> dict[str, float]:
        backbone.eval()
        with torch.no_grad():
            z = torch.cat([logits(ex[i : i + 16]) for i in range(0, len(ex), 16)])
        backbone.train()
        aucs = {LABELS[j]: rank_auc(z[:, j], ey[:, j]) for j in range(len(LABELS))}
        return {k: v for k, v in aucs.items() if v is not None}

    rng = np.random.default_rng(0)
    curve = []
    t0 = time.perf_counter()
    t_eval = 0.0
    for step in range(1, args.steps + 1):
        idx = rng.choice(len(train), args.batch, replace=False)
        train.set_epoch(step)
        b = collate([train[int(i)] for i in idx])
        y = b.labels.float()
        known = b.labels >= 0
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits(b.image)[known], y[known]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_s = time.perf_counter() - t0 - t_eval
        last = step == args.steps or bool(args.time_budget and train_s >= args.time_budget)
        if step % args.eval_every == 0 or last:
            te = time.perf_counter()
            aucs = evaluate()
            t_eval += time.perf_counter() - te
            macro = float(np.mean(list(aucs.values())))
            row = {"step": step, "loss": float(loss), "macro_auc": macro,
                   "seconds": train_s, "auc": aucs}
            curve.append(row)
            top = sorted(aucs.items(), key=lambda kv: -kv[1])[:4]
            print(f"step {step} loss {row['loss']:.3f} held-out macro AUC {row['macro_auc']:.3f} "
                  f"({row['seconds']:.0f} s); best: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in top), flush=True)
        if last:
            break
    if args.json:
        args.json.write_text(
            json.dumps({"pool": args.pool, "set": args.set, "curve": curve}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
