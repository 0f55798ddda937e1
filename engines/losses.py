"""The three RadFinder losses, as small functions over embeddings (open_clip's model/loss split).

From the paper code (losses/siglip_loss.py, losses/prompt_rate_loss.py,
losses/localization_loss.py, trainer_siglip.py):

* SigLIP: ``L = -(1/B) sum_ij log sigmoid(z_ij (e^t' x_i . y_j + b))`` with ``z`` = +1 on the
  diagonal and -1 elsewhere, embeddings L2-normalised, ``t'`` from log 10 and ``b`` from -10.
  Text embeddings from other ranks or earlier micro-batches only add negative columns.
* Disease prompts: per label a positive and a negative prompt, ``logit = e^t' cos + b`` with
  the SigLIP ``t'``, ``b``; BCE-with-logits of ``logit_pos - logit_neg`` against the label,
  unknown labels (-1) masked, ``pos_weight = min(n_neg / n_pos, 20)`` per label.
* Localization: ``cos(snippet, depth embedding) / tau`` (tau 0.1) over the valid depths, soft
  cross-entropy against a Gaussian (sigma 2 positions, truncated at ``round(3 sigma)``) around
  the cited depth.

One deliberate difference: the paper leaves the Gaussian target un-renormalised after zeroing
padded depths (it then sums to less than 1 near a scan's end, which merely shrinks those
snippets' loss); here it is renormalised over the valid depths so that it is a distribution.
Each loss returns a zero that is still attached to the graph when it has nothing to score, so a
training step can always sum and backpropagate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engines.presets import LossConfig

if TYPE_CHECKING:
    from engines.model.radfinder import PromptEmbeddings, RadFinderOutput

__all__ = [
    "RadFinderLoss",
    "clip_loss",
    "gather_negatives",
    "gaussian_depth_target",
    "localization_error_mm",
    "localization_loss",
    "localization_predict",
    "masked_bce",
    "positive_weights",
    "prompt_loss",
    "sample_prompt_pairs",
    "siglip_loss",
]


# ---------------------------------------------------------------------------------------------
# SigLIP


def siglip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sigmoid image-text loss. ``image``, ``text``: ``[B, P]`` (row i of each is a pair);
    ``negatives``: ``[M, P]`` extra text embeddings (other ranks, other micro-batches) that are
    negatives for every image. Normalised by the local B, as in the paper; with DDP averaging
    gradients over ranks this equals the paper's sum over ranks divided by the global batch.
    To reproduce the paper's gradient accumulation (every cached image as a row too), call it on
    the concatenated images and texts of all micro-batches, the current one with gradients."""
    if image.shape != text.shape:
        raise ValueError(f"image and text must be paired [B, P], got {image.shape}, {text.shape}")
    b = image.shape[0]
    x = F.normalize(image, dim=-1)
    y = F.normalize(text, dim=-1)
    if negatives is not None and negatives.shape[0] > 0:
        y = torch.cat([y, F.normalize(negatives.to(y.dtype), dim=-1)], dim=0)
    logits = x @ y.T * logit_scale.exp() + logit_bias  # [B, B + M]
    z = -torch.ones_like(logits)
    z[:, :b] += 2 * torch.eye(b, dtype=logits.dtype, device=logits.device)
    return -F.logsigmoid(z * logits).sum() / b


def clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax (InfoNCE) image-text loss, CLIP's symmetric form, for the SigLIP ablation:
    ``(CE(image -> texts) + CE(text -> images)) / 2`` with logits ``e^t' x̂ᵢ·ŷⱼ``. Extra text
    ``negatives`` widen only the image -> text direction (they have no image of their own)."""
    if image.shape != text.shape:
        raise ValueError(f"image and text must be paired [B, P], got {image.shape}, {text.shape}")
    b = image.shape[0]
    x = F.normalize(image, dim=-1)
    y = F.normalize(text, dim=-1)
    scale = logit_scale.exp()
    targets = torch.arange(b, device=image.device)
    texts = y
    if negatives is not None and negatives.shape[0] > 0:
        texts = torch.cat([y, F.normalize(negatives.to(y.dtype), dim=-1)], dim=0)
    i2t = F.cross_entropy(x @ texts.T * scale, targets)
    t2i = F.cross_entropy(y @ x.T * scale, targets)
    return (i2t + t2i) / 2


def gather_negatives(text: torch.Tensor) -> torch.Tensor:
    """Text embeddings of every other rank, ``[sum of their B, P]``, without gradient (the
    paper broadcasts them the same way). Empty when not running distributed. All ranks must
    call it with the same batch size."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return text.new_zeros((0, text.shape[-1]))
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(text) for _ in range(world)]
    dist.all_gather(parts, text.detach().contiguous())
    return torch.cat([p for r, p in enumerate(parts) if r != rank], dim=0)


# ---------------------------------------------------------------------------------------------
# Disease prompts


def sample_prompt_pairs(
    prompts: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One (positive, negative) template pair per sample and label (the paper's ``random_1``):
    ``[L, V, 2, P] -> [B, L, 2, P]``."""
    n_l, n_v = prompts.shape[0], prompts.shape[1]
    idx = torch.randint(0, n_v, (batch_size, n_l), generator=generator).to(prompts.device)
    return prompts[torch.arange(n_l, device=prompts.device)[None, :], idx]


def positive_weights(labels: npt.ArrayLike | torch.Tensor, cap: float = 20.0) -> torch.Tensor:
    """Per-label BCE ``pos_weight = min(n_neg / n_pos, cap)`` over known labels of the training
    set ``[N, L]``; 1 for a label that is never positive (nothing to up-weight)."""
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 2:
        raise ValueError(f"labels must be [N, L], got shape {y.shape}")
    n_pos = (y == 1).sum(axis=0).astype(np.float64)
    n_neg = (y == 0).sum(axis=0).astype(np.float64)
    w = np.ones(y.shape[1])
    has = n_pos > 0
    w[has] = np.minimum(n_neg[has] / n_pos[has], cap)
    return torch.tensor(w, dtype=torch.float32)


def prompt_loss(
    image: torch.Tensor,
    prompt_pairs: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked BCE on ``logit_pos - logit_neg``. ``image [B, P]``; ``prompt_pairs [B, L, 2, P]``
    (per-sample pairs) or ``[L, 2, P]`` (one pair for all); ``labels [B, L]`` in {-1, 0, 1};
    ``pos_weight [L]``. Mean over the known labels. (``b`` cancels in the difference; it is
    kept so the logits are the same numbers the SigLIP loss sees.)"""
    x = F.normalize(image, dim=-1)
    pe = F.normalize(prompt_pairs, dim=-1)
    if pe.ndim == 3:
        pe = pe.unsqueeze(0).expand(x.shape[0], -1, -1, -1)
    logits = torch.einsum("bp,blkp->blk", x, pe) * logit_scale.exp() + logit_bias
    diff = logits[..., 0] - logits[..., 1]  # [B, L]
    return masked_bce(diff, labels, pos_weight)


def masked_bce(
    logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """BCE-with-logits over the known entries (label >= 0) of ``[B, L]``, ``pos_weight [L]``;
    0 (with a gradient path) when nothing is known."""
    if labels.shape != logits.shape:
        raise ValueError(f"labels must be {tuple(logits.shape)}, got {tuple(labels.shape)}")
    known = labels >= 0
    if not bool(known.any()):
        return logits.sum() * 0.0
    pw = None
    if pos_weight is not None:
        pw = pos_weight.to(logits)[None, :].expand_as(logits)[known]
    return F.binary_cross_entropy_with_logits(
        logits[known], labels[known].to(logits.dtype), pos_weight=pw
    )


# ---------------------------------------------------------------------------------------------
# Localization


def gaussian_depth_target(
    target: torch.Tensor,
    valid: torch.Tensor,
    sigma: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Soft target ``[S, D]``: a Gaussian of ``sigma`` positions around ``target [S]``,
    truncated at ``max(round(3 sigma), 1)`` positions (the paper's kernel radius), zero on
    invalid depths, summing to 1. ``sigma`` 0 gives the one-hot target."""
    d = valid.shape[1]
    pos = torch.arange(d, device=valid.device, dtype=dtype)[None, :]
    t = target.to(dtype)[:, None]
    if sigma > 0:
        radius = max(int(sigma * 3 + 0.5), 1)
        w = torch.exp(-0.5 * ((pos - t) / sigma) ** 2) * ((pos - t).abs() <= radius)
    else:
        w = (pos == t).to(dtype)
    w = w * valid.to(dtype)
    return w / w.sum(dim=1, keepdim=True).clamp(min=1e-12)


def _depth_logits(
    depth: torch.Tensor, snippet: torch.Tensor, valid: torch.Tensor, tau: float
) -> torch.Tensor:
    cos = torch.einsum("sdp,sp->sd", F.normalize(depth, dim=-1), F.normalize(snippet, dim=-1))
    return (cos / tau).masked_fill(~valid.to(torch.bool), float("-inf"))


def localization_loss(
    depth: torch.Tensor,
    snippet: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    tau: float = 0.1,
    sigma: float = 2.0,
) -> torch.Tensor:
    """Soft cross-entropy over depth. ``depth [S, D, P]`` (the depth embeddings of each
    snippet's scan, e.g. ``depth_embeddings[batch_index]``), ``snippet [S, P]``,
    ``target [S]`` (cited depth token), ``valid [S, D]``. Mean over snippets."""
    if depth.shape[0] == 0:
        return depth.sum() * 0.0 + snippet.sum() * 0.0
    valid = valid.to(torch.bool)
    if not bool(valid.gather(1, target[:, None].long()).all()):
        raise ValueError("a localization target lies on a padded (invalid) depth")
    logp = F.log_softmax(_depth_logits(depth, snippet, valid, tau), dim=-1)
    soft = gaussian_depth_target(target, valid, sigma, logp.dtype)
    per = -(soft * logp.masked_fill(~valid, 0.0)).sum(dim=-1)
    return per.mean()


def localization_predict(
    depth: torch.Tensor, snippet: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Predicted depth token per snippet (argmax of the similarity over valid depths)."""
    return _depth_logits(depth, snippet, valid, 1.0).argmax(dim=-1)


def localization_error_mm(
    predicted: torch.Tensor, target: torch.Tensor, token_mm: float
) -> torch.Tensor:
    """``|predicted - cited| * token size``: the error in mm along z, per snippet."""
    return (predicted.to(torch.float32) - target.to(torch.float32)).abs() * float(token_mm)


# ---------------------------------------------------------------------------------------------
# The weighted sum


class RadFinderLoss(nn.Module):
    """``siglip_weight * SigLIP + prompt_weight * prompts + localization_weight * localization``.

    ``pos_weight`` ([L], from ``positive_weights`` over the training labels) is a buffer so it
    moves with the module. Returns every component (weighted total under ``"loss"``).
    """

    def __init__(self, config: LossConfig, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("pos_weight", pos_weight)

    def forward(
        self,
        out: RadFinderOutput,
        *,
        labels: torch.Tensor | None = None,
        snippet_batch_index: torch.Tensor | None = None,
        snippet_target: torch.Tensor | None = None,
        negatives: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Mapping[str, torch.Tensor]:
        cfg = self.config
        zero = out.image_embedding.sum() * 0.0
        parts: dict[str, torch.Tensor] = {}
        if out.report_embedding is not None and cfg.contrastive == "clip":
            # Logged under "siglip" too: it is the contrastive term whichever form it takes.
            parts["siglip"] = clip_loss(
                out.image_embedding, out.report_embedding, out.logit_scale, negatives
            )
        elif out.report_embedding is not None:
            parts["siglip"] = siglip_loss(
                out.image_embedding,
                out.report_embedding,
                out.logit_scale,
                out.logit_bias,
                negatives,
            )
        if out.prompts is not None and labels is not None and cfg.prompt_weight > 0:
            parts["prompt"] = self._prompt(out, out.prompts, labels, generator)
        if out.label_logits is not None and labels is not None and cfg.label_head_weight > 0:
            pw = self.get_buffer("pos_weight") if self.pos_weight is not None else None
            parts["labels"] = masked_bce(out.label_logits, labels, pw)
        if out.snippet_embedding is not None:
            if snippet_batch_index is None or snippet_target is None:
                raise ValueError("snippets need snippet_batch_index and snippet_target")
            parts["localization"] = localization_loss(
                out.depth_embeddings[snippet_batch_index],
                out.snippet_embedding,
                snippet_target,
                out.depth_valid[snippet_batch_index],
                tau=cfg.localization_tau,
                sigma=cfg.localization_sigma,
            )
        weights = {
            "siglip": cfg.siglip_weight,
            "prompt": cfg.prompt_weight,
            "localization": cfg.localization_weight,
            "labels": cfg.label_head_weight,
        }
        total = zero
        for name, value in parts.items():
            total = total + weights[name] * value
        return {"loss": total, **parts}

    def _prompt(
        self,
        out: RadFinderOutput,
        prompts: PromptEmbeddings,
        labels: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        classify = prompts.classify if self.config.prompt_text_grad else prompts.classify.detach()
        pairs = sample_prompt_pairs(classify, out.image_embedding.shape[0], generator)
        pw = self.get_buffer("pos_weight") if self.pos_weight is not None else None
        return prompt_loss(
            out.image_embedding_local, pairs, labels, out.logit_scale, out.logit_bias, pw
        )
