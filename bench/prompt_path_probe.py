"""Does the model's prompt path learn the labels when the image features are known to carry
them, and does it matter whether those features say *where*?

The tiny model's prompt AUC stays at chance in CPU-hour runs. ``bench/histogram_probe.py``
shows that fixed regional HU histograms carry many labels (linear macro AUC 0.69). This puts
exactly those features where the vision tower's outputs go — a linear map to the combiner's
CLS / local-CLS width, then the real BatchNorm neck, projection heads, frozen-text prompt
embeddings, learnable t and b and the real prompt loss (``RadFinderLoss``, SigLIP and
localization weights 0) — trains it with the tiny preset's optimiser, and reports the held-out
AUC of the prompt scores. ``--global`` averages the regions first, which is what the tower's
mean-pooled and (at initialisation) uniformly-attending outputs amount to.

    .venv/bin/python bench/prompt_path_probe.py --features F.npz \
        --text-features RUN/text_features.pt [--global] [--steps 600]

``F.npz`` is written by ``bench/histogram_probe.py --features``; ``text_features.pt`` by any
tiny training run (the frozen tower's features of the training texts, used for the text
standardisation exactly as in training). The prompt BCE is weighted per label as in training
(``positive_weights``, cap 20). ``--no-prompt-text-grad`` runs it with the preset's
``loss.prompt_text_grad`` off; ``--aux-weight W`` adds a supervised linear label head on the
prompt-scored image embedding. The table at the end gives per label the prompt AUC, the
cosine between the positive and negative prompt embedding (1: the pair has collapsed, the
label gets no gradient) and the auxiliary head's AUC.
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
    ap.add_argument("--features", type=Path, required=True)
    ap.add_argument("--text-features", type=Path, required=True)
    ap.add_argument("--global", dest="global_", action="store_true")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-prompt-text-grad", dest="text_grad", action="store_false")
    ap.add_argument("--aux-weight", type=float, default=0.0)
    args = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    from engines.data.labels import LABELS
    from engines.datasets import TextEncoder
    from engines.losses import RadFinderLoss, masked_bce, positive_weights
    from engines.model.radfinder import build_model
    from engines.presets import get_preset, override
    from engines.training.diagnostics import rank_auc

    torch.set_num_threads(1)
    d = np.load(args.features)
    xtr, ytr, xte, yte = (torch.tensor(d[k]).float() for k in ("xtr", "ytr", "xte", "yte"))
    if args.global_:
        n_ch = 1 + len(get_preset("tiny").model.backbone.input_windows)  # stem channels
        xtr = xtr.reshape(len(xtr), n_ch, -1).mean(-1)
        xte = xte.reshape(len(xte), n_ch, -1).mean(-1)
    mu, sd = xtr.mean(0), xtr.std(0).clamp(min=1e-4)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd

    class FeatureVision(nn.Module):
        """Stands where the vision tower does: features -> (CLS, local CLS, per-depth)."""

        def __init__(self, d_in: int, width: int, depth: int) -> None:
            super().__init__()
            self.proj = nn.Linear(d_in, 2 * width)
            self.depth = depth
            self.out_dim = width

        def forward(
            self, x: torch.Tensor, valid: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            cls, local = self.proj(x).chunk(2, dim=-1)
            return cls, local, local[:, None].expand(-1, self.depth, -1)

    preset = override(get_preset("tiny"), "loss.siglip_weight", 0.0)
    preset = override(preset, "loss.localization_weight", 0.0)
    preset = override(preset, "loss.prompt_text_grad", args.text_grad)
    torch.manual_seed(args.seed)
    model = build_model(preset)
    cached = torch.load(args.text_features, weights_only=False)["features"]
    texts = torch.stack(list(cached.values())) if isinstance(cached, dict) else cached
    model.set_text_normalization(torch.as_tensor(texts).float())
    prompt_features = TextEncoder(model, cache=True).prompt_features()
    model.vision = FeatureVision(xtr.shape[1], model.vision.out_dim, model.n_depth_tokens)
    model.text = None
    pos_weight = positive_weights(ytr.numpy(), cap=preset.loss.pos_weight_cap)
    loss_fn = RadFinderLoss(preset.loss, pos_weight)
    aux = nn.Linear(model.embed_dim, ytr.shape[1])
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad] + list(aux.parameters()),
        lr=preset.optim.lr,
        weight_decay=preset.optim.weight_decay,
        betas=preset.optim.betas,
    )
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    def held_out() -> tuple[list[float], list[float], list[float]]:
        """Per label: prompt AUC, cos(positive, negative prompt), auxiliary head AUC."""
        model.eval()
        with torch.no_grad():
            img = F.normalize(model.encode_image(xte).image_embedding_local, dim=-1)
            classify, _ = model.encode_prompts(*prompt_features).ensemble()
            sim = torch.einsum("bp,lkp->blk", img, classify)
            score = sim[..., 0] - sim[..., 1]
            aux_score = aux(img)
            pair_cos = (classify[:, 0] * classify[:, 1]).sum(-1).tolist()
        model.train()
        aucs = [rank_auc(score[:, j], yte[:, j]) or 0.5 for j in range(yte.shape[1])]
        aux_aucs = [rank_auc(aux_score[:, j], yte[:, j]) or 0.5 for j in range(yte.shape[1])]
        return aucs, pair_cos, aux_aucs

    for step in range(1, args.steps + 1):
        idx = torch.as_tensor(rng.choice(len(xtr), args.batch, replace=False))
        out = model(xtr[idx], prompt_features=prompt_features)
        loss = loss_fn(out, labels=ytr[idx].long(), generator=gen)["loss"]
        if args.aux_weight > 0:
            logit = aux(F.normalize(out.image_embedding_local, dim=-1))
            loss = loss + args.aux_weight * masked_bce(logit, ytr[idx], pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        if step % max(1, args.steps // 4) == 0 or step == args.steps:
            aucs, pair_cos, aux_aucs = held_out()
            print(f"step {step}: loss {float(loss.detach()):.3f}, held-out macro AUC "
                  f"{np.mean(aucs):.3f} (min {min(aucs):.2f}), features "
                  f"{'global' if args.global_ else 'regional'} {xtr.shape[1]}", flush=True)

    def aux_col(value: float) -> str:  # an untrained head's AUC means nothing
        return f"{value:.3f}" if args.aux_weight > 0 else "-"

    print("| label | prompt AUC | cos(pos, neg) | aux head AUC |\n|---|---|---|---|")
    for label, a, c, x in zip(LABELS, aucs, pair_cos, aux_aucs, strict=True):
        print(f"| {label} | {a:.3f} | {c:.3f} | {aux_col(x)} |")
    print(f"| **macro** | **{np.mean(aucs):.3f}** | | {aux_col(float(np.mean(aux_aucs)))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
