"""Does a trained model's image representation carry a label its prompts do not read?

Per label, a 5-fold cross-validated L2 logistic regression on the model's own features of a
held-out set (after the BatchNorm neck: CLS, local CLS, the mean over depths; and the two
projected image embeddings), beside the model's zero-shot AUC on the same volumes. A label at
chance zero-shot but high here is a prompt-path failure (the text side or the alignment); a
label at chance in both was never represented by the image tower. A model trained with the
supervised label head (``loss.label_head_weight``) also gets that head's AUC.

    python bench/feature_probe.py --bundle engines/bundles/demo-tiny --data data/ct/test
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from torch.utils.data import DataLoader, Subset

from engines.data.labels import LABELS
from engines.datasets import Batch, TextEncoder, collate, open_dataset
from engines.evaluation.run import resolve_checkpoint
from engines.model.radfinder import score_labels
from engines.training.checkpoint import load_model

FEATURES = ("cls", "local_cls", "mean_depth", "image_local", "image")


@torch.no_grad()
def collect(
    bundle: Path, data: Path, batch: int, split: str = "valid", limit: int | None = None
) -> tuple[
    dict[str, npt.NDArray[np.float64]],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64] | None,
]:
    """``(features by name [N, F], labels [N, L], zero-shot probabilities [N, L], the label
    head's logits [N, L] or None)``."""
    ckpt, _ = resolve_checkpoint(bundle)
    model, preset, _ = load_model(ckpt, device="cpu")
    model.eval()
    ds: Any = open_dataset(data, preset.space, split=split, augment=None, seed=1)
    if limit is not None:
        ds = Subset(ds, range(min(limit, len(ds))))
    classify, locate = TextEncoder(model, cache=False).prompt_features()
    prompts = model.encode_prompts(classify, locate)
    classify_ens, locate_ens = prompts.ensemble()
    # One tower pass per batch: the combiner's outputs are caught on their way to the heads.
    caught: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    model.vision.combiner.register_forward_hook(lambda _m, _i, out: caught.append(out))
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in FEATURES}
    labels, probs, head = [], [], []
    for b in DataLoader(ds, batch_size=batch, collate_fn=collate):
        assert isinstance(b, Batch)
        caught.clear()
        img = model.encode_image(b.image, b.depth_valid)
        cls, local_cls, per_depth = caught[0]
        if model.feature_norm is not None:  # as encode_image applies it (eval: fixed affine)
            bn_cls, bn_local, bn_depth = model.feature_norm
            cls, local_cls = bn_cls(cls), bn_local(local_cls)
            per_depth = bn_depth(per_depth.flatten(0, 1)).reshape(per_depth.shape)
        w = b.depth_valid.float()[..., None]
        for name, f in zip(
            FEATURES,
            (cls, local_cls, (per_depth * w).sum(1) / w.sum(1),
             F.normalize(img.image_embedding_local, dim=-1),
             F.normalize(img.image_embedding, dim=-1)),
            strict=True,
        ):
            feats[name].append(f)
        prob, _ = score_labels(
            img.image_embedding_local, img.depth_embeddings, b.depth_valid, classify_ens,
            locate_ens, model.logit_scale, model.localization_tau,
        )
        probs.append(prob)
        labels.append(b.labels)
        logits = model.label_logits(img.label_input)
        if logits is not None:
            head.append(logits)
    return (
        {k: torch.cat(v).double().numpy() for k, v in feats.items()},
        torch.cat(labels).numpy().astype(np.int64),
        torch.cat(probs).double().numpy(),
        torch.cat(head).double().numpy() if head else None,
    )


def probe_auc(x: npt.NDArray[np.float64], y: npt.NDArray[np.int64], c: float) -> float:
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    scores = np.zeros(len(y))
    for tr, te in StratifiedKFold(5, shuffle=True, random_state=0).split(x, y):
        clf = LogisticRegression(C=c, max_iter=2000).fit(x[tr], y[tr])
        scores[te] = clf.decision_function(x[te])
    return float(roc_auc_score(y, scores))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="bundle, run or checkpoint")
    ap.add_argument("--data", type=Path, required=True, help="held-out CT-RATE-layout folder")
    ap.add_argument("--split", default="valid", help="the CT-RATE split --data holds")
    ap.add_argument("--limit", type=int, help="only the first N volumes (e.g. of a train split)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--C", type=float, default=0.1, help="inverse L2 strength")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    feats, labels, probs, head = collect(
        args.bundle, args.data, args.batch, args.split, args.limit
    )
    print(f"{len(labels)} volumes; AUC of 5-fold logistic probes (C {args.C}) on each feature")
    extra = " label head |" if head is not None else ""
    print("| label | prevalence | zero-shot |" + extra + " " + " | ".join(FEATURES) + " |")
    print("|---" * (3 + len(FEATURES) + (head is not None)) + "|")
    for j, label in enumerate(LABELS):
        known = labels[:, j] >= 0
        y = labels[known, j]
        zero_shot = roc_auc_score(y, probs[known, j])
        row = [probe_auc(feats[k][known], y, args.C) for k in FEATURES]
        if head is not None:
            row.insert(0, float(roc_auc_score(y, head[known, j])))
        print(f"| {label} | {y.mean():.2f} | {zero_shot:.3f} | "
              + " | ".join(f"{a:.3f}" for a in row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
