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
standardisation exactly as in training).
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
    args = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    from engines.datasets import TextEncoder
    from engines.losses import RadFinderLoss
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
    torch.manual_seed(args.seed)
    model = build_model(preset)
    cached = torch.load(args.text_features, weights_only=False)["features"]
    texts = torch.stack(list(cached.values())) if isinstance(cached, dict) else cached
    model.set_text_normalization(torch.as_tensor(texts).float())
    prompt_features = TextEncoder(model, cache=True).prompt_features()
    model.vision = FeatureVision(xtr.shape[1], model.vision.out_dim, model.n_depth_tokens)
    model.text = None
    loss_fn = RadFinderLoss(preset.loss)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=preset.optim.lr,
        weight_decay=preset.optim.weight_decay,
        betas=preset.optim.betas,
    )
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    def held_out_auc() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            img = F.normalize(model.encode_image(xte).image_embedding_local, dim=-1)
            classify, _ = model.encode_prompts(*prompt_features).ensemble()
            sim = torch.einsum("bp,lkp->blk", img, classify)
            score = sim[..., 0] - sim[..., 1]
        model.train()
        aucs = [rank_auc(score[:, j], yte[:, j]) for j in range(yte.shape[1])]
        known = [a for a in aucs if a is not None]
        return float(np.mean(known)), float(np.min(known))

    for step in range(1, args.steps + 1):
        idx = torch.as_tensor(rng.choice(len(xtr), args.batch, replace=False))
        out = model(xtr[idx], prompt_features=prompt_features)
        loss = loss_fn(out, labels=ytr[idx].long(), generator=gen)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        if step % max(1, args.steps // 4) == 0 or step == args.steps:
            macro, worst = held_out_auc()
            print(f"step {step}: prompt loss {float(loss.detach()):.3f}, held-out macro AUC "
                  f"{macro:.3f} (min {worst:.2f}), features "
                  f"{'global' if args.global_ else 'regional'} {xtr.shape[1]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
