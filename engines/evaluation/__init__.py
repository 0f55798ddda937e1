"""Evaluation: the CT-RATE protocol (retrieval, zero-shot AUC, localization with baselines),
bootstrap intervals, and the Pillow charts shared with training."""

from engines.evaluation.metrics import (
    Estimate,
    estimate,
    recall_at_k,
    retrieval_ranks,
    roc_auc,
    roc_curve,
    youden_threshold,
)
from engines.evaluation.run import (
    EvalOutputs,
    EvalResult,
    collect_outputs,
    compute_metrics,
    evaluate,
    load_prior,
    write_report,
)

__all__ = [
    "Estimate",
    "EvalOutputs",
    "EvalResult",
    "collect_outputs",
    "compute_metrics",
    "estimate",
    "evaluate",
    "load_prior",
    "recall_at_k",
    "retrieval_ranks",
    "roc_auc",
    "roc_curve",
    "write_report",
    "youden_threshold",
]
