"""The numbers of the CT-RATE protocol, in numpy: retrieval ranks and Recall@k, ROC AUC, ROC
curves, Youden thresholds, and bootstrap confidence intervals.

Every figure is a weighted mean over units (queries, volumes, snippets), so one bootstrap
replicate is one vector of multiplicities: the count of each unit in a resample with
replacement. Evaluating all replicates is then a matrix product (recall, MAE) or one pass over
the scores sorted once (AUC, with ties counted half as in Mann-Whitney), instead of re-running
the metric code 1,000 times; this is what makes 1,000-sample intervals for every figure cheap.

Ranks count ties against the query (a query whose own item ties with another is not at rank
0): with degenerate embeddings (a collapsed model gives every volume the same vector) the
optimistic convention would report perfect retrieval.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt

__all__ = [
    "Estimate",
    "bootstrap_counts",
    "estimate",
    "recall_at_k",
    "retrieval_ranks",
    "roc_auc",
    "roc_curve",
    "weighted_auc",
    "weighted_mean",
    "youden_threshold",
]

F64 = npt.NDArray[np.float64]


class Estimate(TypedDict):
    """A figure and its bootstrap 95% interval (``None`` where undefined)."""

    value: float | None
    ci95: list[float | None]


def _clean(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def estimate(value: float, replicates: npt.ArrayLike) -> Estimate:
    """``{"value", "ci95"}`` from the point value and the bootstrap replicates (percentile
    interval, undefined replicates ignored)."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0 or not math.isfinite(value):
        return {"value": _clean(value), "ci95": [None, None]}
    lo, hi = np.percentile(r, [2.5, 97.5])
    return {"value": float(value), "ci95": [float(lo), float(hi)]}


def bootstrap_counts(n: int, n_boot: int, seed: int) -> npt.NDArray[np.float64]:
    """``[n_boot, n]`` multiplicities of each unit in ``n_boot`` resamples of size ``n``."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n_boot, n), dtype=np.float64)
    if n == 0:
        return out
    for b in range(n_boot):
        out[b] = np.bincount(rng.integers(0, n, size=n), minlength=n)
    return out


def weighted_mean(values: npt.ArrayLike, counts: F64) -> F64:
    """Mean of ``values`` under each row of ``counts``: ``[n_boot]``."""
    v = np.asarray(values, dtype=np.float64)
    tot = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out: F64 = (counts @ v) / tot
    return out


# ---------------------------------------------------------------------------------------------
# Retrieval


def retrieval_ranks(similarity: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Rank (0 = first) of item ``i`` for query ``i`` in ``similarity [Q, N]`` (Q <= N), ties
    counted against the query."""
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] > s.shape[1]:
        raise ValueError(f"similarity must be [Q, N] with Q <= N, got {s.shape}")
    own = s[np.arange(s.shape[0]), np.arange(s.shape[0])]
    out: npt.NDArray[np.int64] = (s >= own[:, None]).sum(axis=1).astype(np.int64) - 1
    return out


def recall_at_k(ranks: npt.ArrayLike, k: int) -> float:
    r = np.asarray(ranks)
    return float(np.mean(r < k)) if r.size else float("nan")


# ---------------------------------------------------------------------------------------------
# ROC


def weighted_auc(scores: npt.ArrayLike, labels: npt.ArrayLike, counts: F64 | None = None) -> F64:
    """ROC AUC under each row of ``counts`` (``[n_boot, n]``; None: once, unweighted).

    Units with a label other than 0/1 are ignored. Mann-Whitney with ties counted half; NaN
    where a resample has no positive or no negative.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    w = np.ones((1, s.size)) if counts is None else np.asarray(counts, dtype=np.float64)
    keep = (y == 0) | (y == 1)
    s, y, w = s[keep], y[keep], w[:, keep]
    if s.size == 0:
        return np.full(w.shape[0], np.nan)
    order = np.argsort(s, kind="mergesort")
    s, y, w = s[order], y[order], w[:, order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(s)) + 1])
    pos = np.add.reduceat(w * (y == 1), starts, axis=1)
    neg = np.add.reduceat(w * (y == 0), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out: F64 = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def roc_auc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (other values ignored); NaN if one class is
    missing."""
    return float(weighted_auc(scores, labels)[0])


def roc_curve(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[F64, F64, F64]:
    """``(fpr, tpr, thresholds)`` from the highest threshold down, starting at (0, 0) with
    threshold +inf; predicted positive means ``score >= threshold``."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    keep = (y == 0) | (y == 1)
    s, y = s[keep], y[keep]
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.zeros(0, int)
    tp = np.cumsum(y == 1)[last] if s.size else np.zeros(0)
    fp = np.cumsum(y == 0)[last] if s.size else np.zeros(0)
    tpr = np.r_[0.0, tp / n_pos] if n_pos else np.r_[0.0, np.full(len(last), np.nan)]
    fpr = np.r_[0.0, fp / n_neg] if n_neg else np.r_[0.0, np.full(len(last), np.nan)]
    thr = np.r_[np.inf, s[last]] if s.size else np.r_[np.inf]
    return fpr.astype(np.float64), tpr.astype(np.float64), thr.astype(np.float64)


def youden_threshold(
    scores: npt.ArrayLike, labels: npt.ArrayLike, default: float = 0.5
) -> tuple[float, dict[str, Any]]:
    """The threshold maximising sensitivity + specificity - 1 (the CheXzero protocol the paper
    uses), with its sensitivity and specificity; ``default`` when a class is missing."""
    fpr, tpr, thr = roc_curve(scores, labels)
    ok = np.isfinite(fpr) & np.isfinite(tpr) & np.isfinite(thr)
    if not ok.any():
        return default, {"method": "default", "reason": "validation data lacks a class"}
    j = np.where(ok, tpr - fpr, -np.inf)
    i = int(np.argmax(j))
    return float(thr[i]), {
        "method": "youden",
        "sensitivity": float(tpr[i]),
        "specificity": float(1.0 - fpr[i]),
        "j": float(j[i]),
    }


def replicate(
    fn: Callable[[F64 | None], F64], n: int, n_boot: int, seed: int
) -> tuple[float, F64]:
    """Point value and bootstrap replicates of a figure written as ``fn(counts)`` (``None``
    for the point value)."""
    point = float(fn(None)[0])
    reps = fn(bootstrap_counts(n, n_boot, seed)) if n_boot > 0 else np.zeros(0)
    return point, reps
