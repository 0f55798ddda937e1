"""Which readout of the tiny vision tower learns the labels under direct supervision?

The trained tiny models carry no trace of medical material, hiatal hernia or emphysema in
their features, not even with a supervised label head on the prompt-scored embedding
(``loss.label_head_weight``), while a linear model on fixed regional histograms of the same
stem reads medical material at 0.999. This trains, on the training pipeline's own samples
(augmented, cached stems, the labels' ``pos_weight``), one linear label layer on each of:

- ``regional``: the fixed stem averaged over 4 x 4 x 4 regions, batch-normalised (no tower);
- ``cls``: the tower's CLS after the model's BatchNorm neck (the features before any head);
- ``local``: what ``image_head_local`` reads for the prompt-scored embedding, ``[local CLS,
  mean per-depth feature]`` after the neck (the head's input, so ``local`` against
  ``embedding`` isolates the head); ``local_cls`` and ``mean_depth`` are its two halves;
  ``local_detach`` is ``local`` with no gradient into the tower through the depth mean;
- ``embedding``: the prompt-scored image embedding (neck, ``image_head_local``, L2
  normalisation), times ``--scale`` (the prompt logits carry ``e^t``, 10 at the start);

and prints the held-out AUC per label as it goes. A label that ``cls`` learns and
``embedding`` does not is lost between the tower and the shared space; ``local`` against
``embedding`` says whether in the head or in its input (it was the input: the depth mean beside
the CLS token, bench/RESULTS.md "Where the small findings are lost"). ``--set`` changes the tiny
preset (``--set model.head.skip=true``) to try a remedy.

    .venv/bin/python bench/readout_probe.py --train DIR --test DIR --readout cls \
        [--steps 600] [--eval-every 150] [--n-eval 300] [--volume-cache DIR] [--scale 10] \
        [--set model.head.skip=true ...]
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# Readouts of the tower's features after the neck (``RadFinder.head_inputs``).
NECK_READOUTS = ("cls", "local", "local_detach", "local_cls", "mean_depth")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--test", type=Path, required=True)
    ap.add_argument("--readout", required=True,
                    choices=["regional", "cls", "local", "local_detach", "local_cls",
                             "mean_depth", "embedding"])
    ap.add_argument("--scale", type=float, default=10.0, help="logit scale of 'embedding'")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--n-eval", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--volume-cache", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                    help="override a field of the tiny preset (TOML value), repeatable")
    args = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, Subset

    from engines.data.labels import LABELS
    from engines.datasets import Batch, collate, open_dataset
    from engines.losses import masked_bce, positive_weights
    from engines.model.radfinder import build_model
    from engines.model.stem import HistogramStem
    from engines.presets import get_preset, override
    from engines.training.diagnostics import rank_auc

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    p = get_preset("tiny")
    for item in args.set:
        path, _, value = item.partition("=")
        p = override(p, path, tomllib.loads(f"v = {value}")["v"])
    stem = HistogramStem.of_preset(p.model.backbone, p.space)
    assert stem is not None
    cache = args.volume_cache
    train = open_dataset(args.train, p.space, split="train", augment=p.augment,
                         seed=args.seed, volume_cache=cache, stem=stem if cache else None)
    test = open_dataset(args.test, p.space, split="valid", volume_cache=cache,
                        stem=stem if cache else None)
    n_labels = len(LABELS)
    model = build_model(p, load_text=False)
    if args.readout == "regional":
        width = stem.channels * 64
        norm: nn.Module = nn.BatchNorm1d(width)
        modules: list[nn.Module] = [norm]
    elif args.readout in NECK_READOUTS:
        width = model.vision.out_dim * (2 if args.readout in ("local", "local_detach") else 1)
        modules = [model.vision, *(model.feature_norm or [])]
    else:
        width = model.embed_dim
        modules = [model]
    head = nn.Linear(width, n_labels)
    params = [q for m in (*modules, head) for q in m.parameters()]
    opt = torch.optim.AdamW(params, lr=p.optim.lr, weight_decay=p.optim.weight_decay,
                            betas=p.optim.betas)
    pos_weight = positive_weights(train.label_matrix(), cap=p.loss.pos_weight_cap)

    def logits(image: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if args.readout == "regional":
            x = image if image.shape[1] != 1 else stem.apply(image)
            return head(norm(F.adaptive_avg_pool3d(x, 4).flatten(1)))  # type: ignore[no-any-return]
        if args.readout in NECK_READOUTS:
            cls, local_cls, _, mean_depth = model.head_inputs(image, valid)
            if args.readout in ("local", "local_detach"):
                m = mean_depth if args.readout == "local" else mean_depth.detach()
                x = torch.cat([local_cls, m], dim=1)
            else:
                x = {"cls": cls, "local_cls": local_cls, "mean_depth": mean_depth}[args.readout]
            return head(x)  # type: ignore[no-any-return]
        emb = model.encode_image(image, valid).image_embedding_local
        return head(args.scale * F.normalize(emb, dim=-1))  # type: ignore[no-any-return]

    def set_mode(training: bool) -> None:
        for m in (*modules, head):
            m.train(training)

    held_out = Subset(test, range(min(args.n_eval, len(test))))

    def evaluate() -> list[float]:
        set_mode(False)
        scores, labels = [], []
        with torch.no_grad():
            for b in DataLoader(held_out, batch_size=16, collate_fn=collate):
                assert isinstance(b, Batch)
                scores.append(logits(b.image, b.depth_valid))
                labels.append(b.labels)
        set_mode(True)
        s, y = torch.cat(scores), torch.cat(labels)
        return [rank_auc(s[:, j], y[:, j]) or 0.5 for j in range(n_labels)]

    set_mode(True)
    loader = DataLoader(train, batch_size=args.batch, shuffle=True, collate_fn=collate,
                        num_workers=1, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    t0, step, aucs = time.perf_counter(), 0, [0.5] * n_labels
    while step < args.steps:
        for b in loader:
            assert isinstance(b, Batch)
            loss = masked_bce(logits(b.image, b.depth_valid), b.labels, pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            step += 1
            if step % args.eval_every == 0 or step == args.steps:
                aucs = evaluate()
                print(f"{args.readout} step {step}: loss {float(loss.detach()):.3f}, "
                      f"held-out macro AUC {np.mean(aucs):.3f}, medical material {aucs[0]:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if step >= args.steps:
                break
    print(f"| label | {args.readout} |\n|---|---|")
    for label, a in zip(LABELS, aucs, strict=True):
        print(f"| {label} | {a:.3f} |")
    print(f"| **macro** | **{np.mean(aucs):.3f}** |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
