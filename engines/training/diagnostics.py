"""Per-step indicators of whether the model is learning, logged beside the losses.

Loss values alone hide the failure this model is prone to: the image embedding collapsing to
one vector for every volume. SigLIP then sits at its constant-solution value and the prompt loss
at the label prevalence, both of which look like a plateau rather than a fault. These numbers
name it directly and cost one small matrix product per step:

* ``img_cos``: mean cosine between the image embeddings of different volumes in the step (1.0 is
  a collapsed tower);
* ``batch_r1``: image -> report top-1 accuracy within the step (chance is 1 / batch);
* ``prompt_auc``: AUC of the prompt scores against the labels, over the step's samples, averaged
  over labels that have both classes in the step (0.5 is chance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["batch_diagnostics", "rank_auc"]


def rank_auc(score: torch.Tensor, label: torch.Tensor) -> float | None:
    """Mann-Whitney AUC of ``score`` for ``label`` in {0, 1} (ties count one half); None when
    one class is absent."""
    pos, neg = score[label == 1], score[label == 0]
    if pos.numel() == 0 or neg.numel() == 0:
        return None
    diff = pos[:, None] - neg[None, :]
    wins = (diff > 0).to(torch.float64).sum() + 0.5 * (diff == 0).to(torch.float64).sum()
    return float(wins / (pos.numel() * neg.numel()))


@torch.no_grad()
def batch_diagnostics(
    image: torch.Tensor,
    image_local: torch.Tensor,
    report: torch.Tensor | None,
    classify: torch.Tensor | None,
    labels: torch.Tensor | None,
) -> dict[str, float]:
    """``image``, ``image_local``: ``[B, P]``; ``report``: ``[B, P]``; ``classify``: prompt
    embeddings ``[L, V, 2, P]``; ``labels``: ``[B, L]`` in {-1, 0, 1}."""
    out: dict[str, float] = {}
    b = image.shape[0]
    x = F.normalize(image.float(), dim=-1)
    if b > 1:
        sim = x @ x.T
        off = sim[~torch.eye(b, dtype=torch.bool, device=sim.device)]
        out["img_cos"] = float(off.mean())
    if report is not None and b > 1:
        y = F.normalize(report.float(), dim=-1)
        hit = (x @ y.T).argmax(dim=1) == torch.arange(b, device=x.device)
        out["batch_r1"] = float(hit.float().mean())
    if classify is not None and labels is not None:
        pe = F.normalize(classify.float(), dim=-1).mean(dim=1)  # [L, 2, P]
        xl = F.normalize(image_local.float(), dim=-1)
        score = torch.einsum("bp,lp->bl", xl, pe[:, 0] - pe[:, 1])
        aucs = [rank_auc(score[:, j].cpu(), labels[:, j].cpu()) for j in range(labels.shape[1])]
        known = [a for a in aucs if a is not None]
        if known:
            out["prompt_auc"] = sum(known) / len(known)
    return out
