"""Training RadFinder: the loop, checkpoints and the progress bar (see ``loop`` for why the
gradient accumulation, data parallelism and resume work the way they do)."""

from engines.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from engines.training.loop import (
    DepthPrior,
    TrainResult,
    WarmupCosine,
    plot_loss_curves,
    step_loss_config,
    train,
    train_step,
)
from engines.training.progress import Progress

__all__ = [
    "CheckpointError",
    "DepthPrior",
    "Progress",
    "TrainResult",
    "WarmupCosine",
    "load_checkpoint",
    "load_model",
    "plot_loss_curves",
    "save_checkpoint",
    "step_loss_config",
    "train",
    "train_step",
]
