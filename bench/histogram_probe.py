"""How much of each label can be read from regional HU histograms alone, with no learning in
the image path?

The tiny preset's CNN learned the labels slowly (bench/backbone_probe.py), which leaves open
whether the synthetic findings are visible at the preset's resolution at all. This computes a
fixed feature per volume: the model-space volume re-windowed to the tiny stem's HU ramps
(``engines.presets.HU_RAMPS``), averaged over a coarse grid of regions (a soft cumulative
histogram per region), then fits one logistic regression per label on the training volumes and
reports held-out AUCs. A label this gets is visible and a model that fails it is failing to
learn; a label this misses needs finer structure than a regional histogram (or is invisible).

    .venv/bin/python bench/histogram_probe.py --train DIR --test DIR [--grid 4x4x4]
        [--global] [--cell-max] [--n-train 1500] [--n-test 300] [--C 0.05] [--volume-cache DIR]
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
    ap.add_argument("--grid", default="4x4x4", help="regions along z, y, x")
    ap.add_argument("--global", dest="global_", action="store_true",
                    help="also fit on the whole-volume histogram (regions averaged)")
    ap.add_argument("--cell-max", action="store_true",
                    help="add the per-stem-cell maximum of each ramp, averaged over the regions")
    ap.add_argument("--train-split", default="train", help="the CT-RATE split --train holds")
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--C", type=float, default=0.05, help="inverse L2 strength")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--volume-cache", type=Path)
    ap.add_argument("--features", type=Path, help="cache the features here (.npz)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]
    from sklearn.metrics import roc_auc_score  # type: ignore[import-untyped]
    from sklearn.preprocessing import StandardScaler  # type: ignore[import-untyped]

    from engines.data.labels import LABELS
    from engines.datasets import RadFinderDataset, open_dataset
    from engines.model.vision import CNNBackbone
    from engines.presets import get_preset

    torch.set_num_threads(args.threads)
    preset = get_preset("tiny")
    stem = CNNBackbone(preset.model.backbone, preset.space).eval()
    grid = tuple(int(g) for g in args.grid.split("x"))
    n_ch = stem.win_scale.shape[1]

    def features(ds: RadFinderDataset, n: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for i in range(min(n, len(ds))):
            s = ds[i]
            w = torch.addcmul(stem.win_shift, s.image[None], stem.win_scale).clamp_(0, 1)
            f = [F.adaptive_avg_pool3d(w, grid).flatten()]
            if args.cell_max:
                cells = F.max_pool3d(w, preset.model.backbone.stem_pool)
                f.append(F.adaptive_avg_pool3d(cells, grid).flatten())
            xs.append(torch.cat(f).numpy())
            ys.append(s.labels.numpy())
        return np.stack(xs), np.stack(ys)

    t0 = time.perf_counter()
    if args.features and args.features.exists():
        d = np.load(args.features)
        xtr, ytr, xte, yte = d["xtr"], d["ytr"], d["xte"], d["yte"]
    else:
        train = open_dataset(args.train, preset.space, split=args.train_split,
                             volume_cache=args.volume_cache)
        test = open_dataset(args.test, preset.space, split="valid",
                            volume_cache=args.volume_cache)
        xtr, ytr = features(train, args.n_train)
        xte, yte = features(test, args.n_test)
        if args.features:
            np.savez(args.features, xtr=xtr, ytr=ytr, xte=xte, yte=yte)
    print(f"{len(xtr)} train / {len(xte)} test volumes, {xtr.shape[1]} features "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    def fit(xa: np.ndarray, xb: np.ndarray) -> dict[str, float]:
        scaler = StandardScaler().fit(xa)
        xa, xb = scaler.transform(xa), scaler.transform(xb)
        out = {}
        for j, name in enumerate(LABELS):
            ka, kb = ytr[:, j] >= 0, yte[:, j] >= 0
            if len(set(ytr[ka, j])) < 2 or len(set(yte[kb, j])) < 2:
                continue
            m = LogisticRegression(C=args.C, max_iter=2000).fit(xa[ka], ytr[ka, j])
            out[name] = float(roc_auc_score(yte[kb, j], m.decision_function(xb[kb])))
        return out

    results = {f"regional {args.grid}": fit(xtr, xte)}
    if args.global_:
        n_f = n_ch * (2 if args.cell_max else 1)
        g_tr = xtr.reshape(len(xtr), n_f, -1).mean(-1)
        g_te = xte.reshape(len(xte), n_f, -1).mean(-1)
        results["global"] = fit(g_tr, g_te)
    names = list(results)
    print("| label | prevalence (train) | " + " | ".join(f"AUC, {n}" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for j, label in enumerate(LABELS):
        known = ytr[:, j] >= 0
        cells = " | ".join(f"{results[n].get(label, float('nan')):.3f}" for n in names)
        print(f"| {label} | {ytr[known, j].mean():.2f} | {cells} |")
    macro = {n: float(np.mean(list(r.values()))) for n, r in results.items()}
    print("| **macro** | | " + " | ".join(f"**{macro[n]:.3f}**" for n in names) + " |")
    if args.json:
        args.json.write_text(json.dumps({"auc": results, "macro": macro}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
