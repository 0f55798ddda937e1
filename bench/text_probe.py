"""How much of a report's labels the frozen text tower's pooled feature carries, by length.

The tiny preset's text tower is frozen all-MiniLM-L6-v2 with mean pooling; its report features
are what SigLIP aligns the image with. Synthetic CT-RATE reports run 270-380 word pieces, and
they list findings in a fixed anatomical order. This script embeds the training reports at
several ``max_length`` values and fits a ridge probe (features standardised, then labels
regressed on them) on the first 75 % of volumes, scoring per-label AUC on the rest: the labels
a truncated report still carries. It also prints the length distribution in word pieces.

    .venv/bin/python bench/text_probe.py --data DIR [--lengths 128,256,512] [--n 400]

``DIR`` is a CT-RATE-layout folder (``synthesize_ctrate``'s output).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--lengths", default="128,256,512")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--ridge", type=float, default=10.0)
    args = ap.parse_args()

    import numpy as np
    import torch

    from engines.data.labels import LABELS
    from engines.manifest import read_ctrate
    from engines.model.text import TextTower
    from engines.training.diagnostics import rank_auc

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = list(read_ctrate(args.data, args.split))[: args.n]
    y = np.array([r.labels for r in rows])
    cut = int(0.75 * len(rows))
    tower = TextTower.from_pretrained(None, max_length=512, freeze=True)
    pieces = [len(tower.tokenizer(r.report)["input_ids"]) for r in rows]
    p10, p50, p90 = np.percentile(pieces, [10, 50, 90])
    print(f"{len(rows)} reports; word pieces p10 {p10:.0f}, p50 {p50:.0f}, p90 {p90:.0f}")
    print("| max_length | reports truncated | probe AUC mean | probe AUC min | weakest label |")
    print("|---|---|---|---|---|")
    for length in (int(v) for v in args.lengths.split(",")):
        tower = TextTower.from_pretrained(None, max_length=length, freeze=True)
        with torch.no_grad():
            f = torch.cat(
                [tower.embed([r.report for r in rows[i : i + 32]]) for i in range(0, len(rows), 32)]
            ).numpy()
        mu, sd = f[:cut].mean(0), f[:cut].std(0) + 1e-4
        x = np.c_[(f - mu) / sd, np.ones(len(f))]
        gram = x[:cut].T @ x[:cut] + args.ridge * np.eye(x.shape[1])
        w = np.linalg.solve(gram, x[:cut].T @ y[:cut])
        pred = x[cut:] @ w
        aucs = {
            LABELS[j]: a
            for j in range(y.shape[1])
            if (a := rank_auc(torch.tensor(pred[:, j]), torch.tensor(y[cut:, j]))) is not None
        }
        weakest = min(aucs, key=lambda k: aucs[k])
        truncated = sum(p > length for p in pieces) / len(pieces)
        print(f"| {length} | {truncated:.0%} | {np.mean(list(aucs.values())):.3f} | "
              f"{aucs[weakest]:.3f} | {weakest} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
