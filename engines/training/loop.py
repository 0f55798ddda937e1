"""The training loop: AdamW with warm-up and cosine, exact gradient accumulation, data
parallel under ``torchrun``, bf16 on GPUs, logs, curves, checkpoints and exact resume.

Gradient accumulation (why it is done this way). SigLIP wants a large global batch: every
report of the step should be a negative for every image. Accumulating per-micro-batch losses
would shrink the batch the loss sees to one micro-batch. The paper code keeps the big batch by
re-forwarding each micro-batch against the cached embeddings of all others (a full SigLIP loss
per micro-batch, backpropagated through that micro-batch only). This loop uses the equivalent
"gradient cache" form, which is exact for *all three* losses at once and needs one backward
through the towers per micro-batch instead of the paper's forward-with-grad for localization
plus re-forward for SigLIP:

1. forward every micro-batch without gradients and keep its embeddings (image, local image,
   depth, report, snippet);
2. compute the losses once on the concatenated embeddings of the whole step (so SigLIP, the
   prompt BCE and the localization loss are exactly the losses of one big batch) and
   backpropagate into the cached embeddings (plus the logit scale, bias and prompt heads, which
   the loss touches directly);
3. re-forward each micro-batch with gradients and backpropagate ``sum(embedding * cached
   gradient)``, which by the chain rule puts exactly the big-batch gradient into the towers.

The RNG state is recorded before each micro-batch's first forward and restored before the
second, so stochastic layers (dropout in a trainable text tower) draw the same masks twice and
the gradient stays exact. With one micro-batch per step the loop skips the cache and runs one
ordinary forward and backward; the tests check that both paths give the same loss and gradients.

Loss weights. ``LossConfig`` states the paper's weights in the paper's units (SigLIP per step,
prompts per 256-sample mega-batch, localization per micro-batch, each summed over the step).
This loop applies each loss once per step to the whole batch, so ``step_loss_config`` converts:
localization x the preset's accumulation steps, prompts x the preset's step size / 256 (never
below 1). For ``tiny`` (no accumulation, batch 8) both factors are 1; for ``paper`` they give
the effective weights of the paper code (about 1 and 8).

Data parallel. Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank takes its share of every
step's samples; the other ranks' report embeddings join the SigLIP loss as negatives
(``gather_negatives``), and gradients are averaged with one flat all-reduce after the
accumulation. The ``DistributedDataParallel`` wrapper is not used: its per-backward hooks
assume every parameter's gradient comes from one module forward, which the loss phase above
(gradients into the logit scale and the prompt heads outside any module forward) breaks; an
explicit all-reduce is exact and simple. Parameters are broadcast from rank 0 at the start.

Resume. A checkpoint holds the model, optimizer, scheduler, gradient scaler, step, the
global and prompt-sampling RNG states and the label-depth statistics. Data order and
augmentation are functions of ``(seed, epoch, index)``, so a resumed run replays exactly the
batches the interrupted run would have seen; on a CPU the continuation is bit-identical.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from engines.data.labels import LABELS
from engines.datasets import (
    Batch,
    DataSpec,
    ManifestDataset,
    RadFinderDataset,
    TextEncoder,
    collate,
    open_dataset,
    sample_seed,
)
from engines.evaluation.plots import Series, line_chart
from engines.losses import RadFinderLoss, gather_negatives, positive_weights
from engines.model.radfinder import PromptEmbeddings, RadFinder, RadFinderOutput, build_model
from engines.model.stem import HistogramStem
from engines.model.text import TextTower
from engines.presets import LossConfig, Preset, get_preset, preset_to_dict
from engines.training.checkpoint import (
    copy_atomic,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from engines.training.diagnostics import batch_diagnostics
from engines.training.progress import Progress

__all__ = [
    "DepthPrior",
    "TrainResult",
    "WarmupCosine",
    "plot_loss_curves",
    "step_loss_config",
    "train",
    "train_step",
]

_PROMPT_REF_BATCH: Final = 256
_SALT_ORDER: Final = 0x4F524452
_LOSS_KEYS: Final = ("loss", "siglip", "prompt", "localization", "labels")
_DIAG_KEYS: Final = ("img_cos", "batch_r1", "prompt_auc")


# ---------------------------------------------------------------------------------------------
# Schedule, loss weights, label-depth statistics


class WarmupCosine:
    """LR factor for ``LambdaLR``: linear warm-up from 0, then cosine from 1 to
    ``min_lr / lr`` at ``total`` steps (the paper's ``cosine_warmup_schedule``). A callable
    object, not a lambda, so the scheduler's state dict can be saved."""

    def __init__(self, total: int, warmup: int, min_factor: float) -> None:
        self.total = max(int(total), 1)
        self.warmup = max(int(warmup), 0)
        self.min_factor = float(min_factor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        span = max(self.total - self.warmup, 1)
        t = min(max(step - self.warmup, 0) / span, 1.0)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


ABLATIONS: Final = ("no-localization", "no-prompts", "clip")


def step_loss_config(
    preset: Preset, *, localization: bool = True, ablation: str | None = None
) -> LossConfig:
    """The preset's loss weights converted to "once per step over the whole batch" (see the
    module docstring). ``localization=False`` (or ablation ``"no-localization"``) trains
    without the localization loss (the baseline the evaluation compares against);
    ``"no-prompts"`` without the disease-prompt loss; ``"clip"`` with CLIP's softmax loss in
    place of SigLIP: the paper's ablation table."""
    if ablation is not None and ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; expected one of {ABLATIONS}")
    cfg = preset.loss
    o = preset.optim
    localization = localization and ablation != "no-localization"
    loc = cfg.localization_weight * o.accum_steps if localization else 0.0
    prompt = cfg.prompt_weight * max(1.0, o.batch_size * o.accum_steps / _PROMPT_REF_BATCH)
    if ablation == "no-prompts":
        prompt = 0.0
    contrastive = "clip" if ablation == "clip" else cfg.contrastive
    return dataclasses.replace(
        cfg, prompt_weight=prompt, localization_weight=loc, contrastive=contrastive
    )


class DepthPrior:
    """Mean relative depth (0 inferior .. 1 superior end of the scanned range) of the cited
    slices of each finding type, gathered from the training samples: the "label prior"
    baseline of the localization evaluation."""

    def __init__(self) -> None:
        self.sums = np.zeros(len(LABELS) + 1, dtype=np.float64)
        self.counts = np.zeros(len(LABELS) + 1, dtype=np.float64)

    def add(self, labels: Sequence[str | None], relative: Sequence[float]) -> None:
        for lb, r in zip(labels, relative, strict=True):
            i = LABELS.index(lb) if lb in LABELS else len(LABELS)
            self.sums[i] += r
            self.counts[i] += 1
            if i != len(LABELS):
                self.sums[-1] += r
                self.counts[-1] += 1

    def to_dict(self) -> dict[str, Any]:
        per = {
            lb: {"mean": float(self.sums[i] / self.counts[i]), "n": int(self.counts[i])}
            for i, lb in enumerate(LABELS)
            if self.counts[i] > 0
        }
        overall = float(self.sums[-1] / self.counts[-1]) if self.counts[-1] > 0 else 0.5
        return {"labels": per, "overall": {"mean": overall, "n": int(self.counts[-1])}}

    def state(self) -> dict[str, Any]:
        return {"sums": self.sums.tolist(), "counts": self.counts.tolist()}

    def load(self, state: Mapping[str, Any]) -> None:
        self.sums = np.asarray(state["sums"], dtype=np.float64)
        self.counts = np.asarray(state["counts"], dtype=np.float64)

    def reduced(self) -> DepthPrior:
        """Summed over all ranks (every rank must call it)."""
        out = DepthPrior()
        out.sums, out.counts = self.sums.copy(), self.counts.copy()
        if _world() > 1:
            t = torch.tensor(
                np.concatenate([out.sums, out.counts]), dtype=torch.float64, device=_comm_device()
            )
            dist.all_reduce(t)
            a = t.cpu().numpy()
            out.sums, out.counts = a[: len(out.sums)], a[len(out.sums) :]
        return out


# ---------------------------------------------------------------------------------------------
# Distributed helpers


def _world() -> int:
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


def _comm_device() -> torch.device:
    """Where collective buffers must live: NCCL only reduces CUDA tensors."""
    if _world() > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _init_distributed(device: str | torch.device | None) -> torch.device:
    """Join the ``torchrun`` group from the environment when ``WORLD_SIZE`` > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:  # "cuda" means this rank's GPU; set_device needs the index
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        # Static shapes: let cuDNN time its convolution algorithms once; TF32 for fp32 matmuls.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev


def _allreduce_mean(tensors: Sequence[torch.Tensor]) -> None:
    """Average tensors over ranks in place with one flat all-reduce."""
    world = _world()
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def _broadcast_parameters(model: torch.nn.Module) -> None:
    if _world() == 1:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


# ---------------------------------------------------------------------------------------------
# One step


@dataclass
class StepContext:
    """What a training step needs besides the batch."""

    model: RadFinder
    criterion: RadFinderLoss
    text: TextEncoder
    device: torch.device
    precision: str
    localization: bool
    generator: torch.Generator
    prompt_features: tuple[torch.Tensor, torch.Tensor] | None = None
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> AbstractContextManager[Any]:
        if self.device.type == "cuda" and self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(device_type="cuda", dtype=dtype)
        return nullcontext()

    def prompts(self, *, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt features: computed once for a frozen tower, every step for a trainable one."""
        if self.prompt_features is not None:
            return self.prompt_features
        return self.text.prompt_features(grad=grad)


_EMB_FIELDS: Final = (
    "image_embedding",
    "image_embedding_local",
    "depth_embeddings",
    "report_embedding",
    "snippet_embedding",
    "label_input",
)


def _text_features(
    ctx: StepContext, mb: Batch, *, grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    reports = ctx.text(mb.reports, grad=grad)
    snippets = ctx.text(mb.snippets, grad=grad) if ctx.localization else None
    return reports, snippets


def _forward(
    ctx: StepContext,
    mb: Batch,
    *,
    grad: bool,
    features: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> RadFinderOutput:
    reports, snippets = features if features is not None else _text_features(ctx, mb, grad=grad)
    with ctx.autocast():
        out: RadFinderOutput = ctx.model(
            mb.image, mb.depth_valid, report_features=reports, snippet_features=snippets
        )
    return out


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _losses(
    ctx: StepContext,
    out: RadFinderOutput,
    prompts: PromptEmbeddings,
    mb_labels: torch.Tensor,
    snippet_index: torch.Tensor,
    snippet_target: torch.Tensor,
) -> Mapping[str, torch.Tensor]:
    assert out.report_embedding is not None
    negatives = gather_negatives(out.report_embedding.detach().float())
    full = RadFinderOutput(
        image_embedding=out.image_embedding.float(),
        image_embedding_local=out.image_embedding_local.float(),
        depth_embeddings=out.depth_embeddings.float(),
        depth_valid=out.depth_valid,
        logit_scale=ctx.model.logit_scale,
        logit_bias=ctx.model.logit_bias,
        report_embedding=out.report_embedding.float(),
        snippet_embedding=_float(out.snippet_embedding) if ctx.localization else None,
        prompts=prompts,
        label_logits=ctx.model.label_logits(_float(out.label_input)),
    )
    losses: Mapping[str, torch.Tensor] = ctx.criterion(
        full,
        labels=mb_labels,
        snippet_batch_index=snippet_index if ctx.localization else None,
        snippet_target=snippet_target if ctx.localization else None,
        negatives=negatives,
        generator=ctx.generator,
    )
    return losses


def _backward(ctx: StepContext, loss: torch.Tensor) -> None:
    torch.autograd.backward([ctx.scaler.scale(loss) if ctx.scaler is not None else loss])


def _rng_snapshot(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _rng_restore(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def train_step(ctx: StepContext, batch: Batch, accum: int) -> dict[str, float]:
    """Forward and backward for one optimizer step (the optimizer is not stepped here).

    Returns the unweighted components and the weighted total. Gradients are left in ``.grad``
    (summed, not yet averaged over ranks).
    """
    model = ctx.model
    model.train()
    if accum <= 1:
        out = _forward(ctx, batch, grad=True)
        prompts = model.encode_prompts(*ctx.prompts(grad=True))
        losses = _losses(
            ctx, out, prompts, batch.labels, batch.snippet_batch_index, batch.snippet_target
        )
        _backward(ctx, losses["loss"])
        return {**_diagnostics(out, prompts, batch.labels), **_scalars(losses)}

    micro = batch.split(accum)
    cached: dict[str, list[torch.Tensor]] = {k: [] for k in _EMB_FIELDS}
    rng: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    # A frozen tower's features are the same in both passes: compute them once.
    features: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []
    with torch.no_grad():
        for mb in micro:
            rng.append(_rng_snapshot(ctx.device))
            feats = _text_features(ctx, mb, grad=False)
            features.append(None if ctx.text.trainable else feats)
            o = _forward(ctx, mb, grad=False, features=feats)
            for k in _EMB_FIELDS:
                v = getattr(o, k)
                if v is not None:
                    cached[k].append(v.detach().float())
    leaves = {
        k: torch.cat(v).requires_grad_(True) for k, v in cached.items() if len(v) == len(micro)
    }
    full = RadFinderOutput(
        image_embedding=leaves["image_embedding"],
        image_embedding_local=leaves["image_embedding_local"],
        depth_embeddings=leaves["depth_embeddings"],
        depth_valid=batch.depth_valid.to(torch.bool),
        logit_scale=model.logit_scale,
        logit_bias=model.logit_bias,
        report_embedding=leaves["report_embedding"],
        snippet_embedding=leaves.get("snippet_embedding"),
        label_input=leaves.get("label_input"),
    )
    prompts = model.encode_prompts(*ctx.prompts(grad=True))
    losses = _losses(
        ctx, full, prompts, batch.labels, batch.snippet_batch_index, batch.snippet_target
    )
    _backward(ctx, losses["loss"])

    offsets = {k: 0 for k in leaves}
    for j, mb in enumerate(micro):
        _rng_restore(rng[j], ctx.device)
        o = _forward(ctx, mb, grad=True, features=features[j])
        surrogate: torch.Tensor | None = None
        for k, leaf in leaves.items():
            v = getattr(o, k)
            n = v.shape[0]
            g = leaf.grad[offsets[k] : offsets[k] + n] if leaf.grad is not None else None
            offsets[k] += n
            if g is None or n == 0:
                continue
            term = (v.float() * g).sum()
            surrogate = term if surrogate is None else surrogate + term
        if surrogate is not None:
            torch.autograd.backward([surrogate])
    return {**_diagnostics(full, prompts, batch.labels), **_scalars(losses)}


def _scalars(losses: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in losses.items()}


def _diagnostics(
    out: RadFinderOutput, prompts: PromptEmbeddings, labels: torch.Tensor
) -> dict[str, float]:
    return batch_diagnostics(
        out.image_embedding.detach(),
        out.image_embedding_local.detach(),
        None if out.report_embedding is None else out.report_embedding.detach(),
        prompts.classify.detach(),
        labels,
    )


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass(frozen=True)
class TrainResult:
    """Where a run left its files, and its last logged metrics."""

    run_dir: Path
    checkpoint: Path
    step: int
    total_steps: int
    metrics: dict[str, float]
    first_metrics: dict[str, float]


def _epoch_batches(
    n: int, step_size: int, steps_per_epoch: int, seed: int, epoch: int, rank: int, world: int
) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded permutation cut into steps, each step's
    chunk split among the ranks; the tail that does not fill a step is dropped."""
    rng = np.random.default_rng(sample_seed(seed, epoch, 0, _SALT_ORDER))
    perm = rng.permutation(n)
    out = []
    for s in range(steps_per_epoch):
        chunk = perm[s * step_size * world : (s + 1) * step_size * world]
        out.append([int(i) for i in chunk[rank * step_size : (rank + 1) * step_size]])
    return out


def _param_groups(model: RadFinder, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, position embeddings, CLS tokens and the SigLIP
    scale/bias: decaying them only fights the parameters that set the scale of things."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "pos_" in name or "cls_token" in name or name.startswith("logit_")
        (no_decay if flat else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def plot_loss_curves(metrics_path: str | Path, png_path: str | Path) -> None:
    """Loss components against step (log scale), raw and smoothed."""
    rows = _read_metrics(Path(metrics_path))
    if not rows:
        return
    series = []
    steps = np.array([r["step"] for r in rows], dtype=np.float64)
    for key in _LOSS_KEYS:
        y = np.array([r.get(key, np.nan) for r in rows], dtype=np.float64)
        if not np.isfinite(y).any():
            continue
        alpha = 2.0 / (1.0 + max(len(y) / 20.0, 1.0))
        smooth = np.empty_like(y)
        acc = float(y[np.isfinite(y)][0])
        for i, v in enumerate(y):
            acc = acc if not math.isfinite(v) else (1 - alpha) * acc + alpha * v
            smooth[i] = acc
        series.append(Series(key, steps, smooth))
    line_chart(
        png_path, series, title="training losses (EMA)", xlabel="step", ylabel="loss", log_y=True
    )


def train(
    preset: Preset | str,
    data: DataSpec,
    out_dir: str | Path,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    batch: int | None = None,
    accum: int | None = None,
    resume: bool | str | Path = False,
    seed: int = 0,
    progress: bool = True,
    checkpoint_every: int = 500,
    log_every: int = 1,
    workers: int = 0,
    device: str | torch.device | None = None,
    localization: bool = True,
    ablation: str | None = None,
    lr: float | None = None,
    warmup_steps: int | None = None,
    samples_per_epoch: int = 1000,
    stop_after: int | None = None,
    text_tower: TextTower | None = None,
    volume_cache: str | Path | None = None,
    cache_stems: bool = True,
    time_budget_s: float | None = None,
) -> TrainResult:
    """Train RadFinder and write a run folder.

    ``data``: see ``engines.datasets.open_dataset`` (``"synthetic[:N]"``, a manifest, a CT-RATE
    folder, rows or a dataset). ``batch`` is the micro-batch per rank and ``accum`` the
    micro-batches per optimizer step (preset defaults); one step therefore sees
    ``batch * accum * WORLD_SIZE`` samples. Length: ``steps``, else ``epochs`` (preset default).
    ``resume``: True continues from ``out_dir/checkpoints/last.pt`` if there is one, a path
    continues from that checkpoint. ``stop_after`` ends this invocation at that step without
    changing the schedule (for time-boxed jobs; resume later). ``localization=False`` trains
    the ablation without the localization loss; ``ablation`` names one of ``ABLATIONS``.
    ``volume_cache``: a folder where decoded volumes are kept for later epochs
    (``engines.datasets.DecodedVolumeCache``), and with a CNN backbone's fixed stem also the
    stem of each volume (``engines.datasets.StemCache``: crop shifts become whole stem cells;
    ``cache_stems=False`` keeps voxel shifts and recomputes the stem every step).
    ``time_budget_s``: every 20 timed steps, fit the run's length (at most the planned one) to
    what still fits in that many seconds from the call's start at the recent pace, and the
    cosine schedule to that length, so a time-boxed run ends at the minimum LR instead of
    being cut off mid-schedule.

    Writes ``run.json``, ``metrics.jsonl`` (one line per logged step), ``loss_curves.png``,
    ``depth_prior.json`` and ``checkpoints/{step-NNNNNNN,last}.pt``.
    """
    t_call = time.monotonic()
    p = get_preset(preset) if isinstance(preset, str) else preset
    dev = _init_distributed(device)
    rank, world = _rank(), _world()
    main = rank == 0
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    micro = int(batch if batch is not None else p.optim.batch_size)
    n_accum = int(accum if accum is not None else p.optim.accum_steps)
    if micro < 1 or n_accum < 1:
        raise ValueError(f"batch and accum must be positive, got {micro}, {n_accum}")
    step_size = micro * n_accum
    dataset: RadFinderDataset = open_dataset(
        data,
        p.space,
        split="train",
        augment=p.augment,
        seed=seed,
        synthetic_length=max(samples_per_epoch, step_size * world),
        volume_cache=volume_cache,
        stem=HistogramStem.of_preset(p.model.backbone, p.space) if cache_stems else None,
    )
    if isinstance(dataset, ManifestDataset) and volume_cache is not None:
        # Decode (and stem) every volume now, on every core, rather than in the first
        # epoch's loader workers; counts against the time budget like everything else.
        fill_workers = max(1, os.cpu_count() or 1) if dev.type == "cpu" else max(1, workers)
        with Progress(len(dataset), "caches", enabled=progress and main, unit="vol") as bar:
            dataset.fill_caches(fill_workers, lambda done, n: bar.update(done - bar.n))
    steps_per_epoch = len(dataset) // (step_size * world)
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(dataset)} samples do not fill one step of {step_size} x {world} ranks"
        )
    total = int(steps if steps is not None else round((epochs or p.optim.epochs) * steps_per_epoch))
    if total < 1:
        raise ValueError("nothing to train: steps/epochs give 0 steps")
    warm = int(
        warmup_steps
        if warmup_steps is not None
        else min(round(p.optim.warmup_epochs * steps_per_epoch), total // 2)
    )
    base_lr = float(lr if lr is not None else p.optim.lr)

    torch.manual_seed(seed)
    model = build_model(p, text_tower=text_tower).to(dev)
    _broadcast_parameters(model)
    labels_matrix = dataset.label_matrix()
    loss_cfg = step_loss_config(p, localization=localization, ablation=ablation)
    localization = loss_cfg.localization_weight > 0
    criterion = RadFinderLoss(
        loss_cfg, positive_weights(labels_matrix, cap=loss_cfg.pos_weight_cap)
    ).to(dev)
    optimizer = torch.optim.AdamW(
        _param_groups(model, p.optim.weight_decay), lr=base_lr, betas=p.optim.betas
    )
    schedule = WarmupCosine(total, warm, p.optim.min_lr / base_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    fp16 = dev.type == "cuda" and p.optim.precision == "fp16"
    scaler = torch.amp.GradScaler("cuda") if fp16 else None
    generator = torch.Generator().manual_seed(sample_seed(seed, 0, rank, 0x50524D54))

    # Cache a frozen tower's features only for texts known ahead (a manifest); phantom reports
    # are new every step, so caching them would only grow memory.
    known_texts = dataset.texts() if p.model.text.cache_embeddings else []
    text = TextEncoder(model, cache=bool(known_texts))
    cache_path = out / "text_features.pt"
    if known_texts:
        text.load(cache_path)
        with Progress(None, "text features", enabled=progress and main, unit="batch") as bar:
            text.warm(known_texts, lambda done, n: bar.update(1, texts=f"{done}/{n}"))
        if main:
            text.save(cache_path)
        if not text.trainable:  # a resumed run loads the saved statistics over these
            # Statistics of the corpus the model trains on; saved with the weights (buffers).
            with torch.no_grad():
                feats = torch.cat(
                    [text(known_texts[i : i + 4096]) for i in range(0, len(known_texts), 4096)]
                )
            model.set_text_normalization(feats.to(dev))
    ctx = StepContext(
        model=model,
        criterion=criterion,
        text=text,
        device=dev,
        precision=p.optim.precision,
        localization=localization,
        generator=generator,
        prompt_features=None if text.trainable else text.prompt_features(),
        scaler=scaler,
    )
    prior = DepthPrior()

    start = 0
    resume_path: Path | None = None
    if resume is True and (ckpt_dir / "last.pt").exists():
        resume_path = ckpt_dir / "last.pt"
    elif isinstance(resume, str | Path):
        resume_path = Path(resume)
    if resume_path is not None:
        ck = load_checkpoint(resume_path, map_location="cpu")
        model.load_state_dict(ck["model"], strict=False)
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        # load_state_dict writes the saved schedule's fields into our schedule object; a
        # resumed run follows the schedule of *this* call (the same one unless steps, epochs
        # or lr were changed), so it gets a fresh one.
        schedule = WarmupCosine(total, warm, p.optim.min_lr / base_lr)
        scheduler.lr_lambdas = [schedule] * len(optimizer.param_groups)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * schedule(scheduler.last_epoch)
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start = int(ck["step"])
        rng_all = ck["rng"]
        states = rng_all["global"]
        set_rng_state(states[rank] if rank < len(states) else states[0])
        gens = rng_all["prompt"]
        generator.set_state(gens[rank] if rank < len(gens) else gens[0])
        if main and "depth_prior" in ck:
            prior.load(ck["depth_prior"])

    metrics_path = out / "metrics.jsonl"
    if main:
        old = [r for r in _read_metrics(metrics_path) if r["step"] <= start]
        with metrics_path.open("w", encoding="utf-8") as f:
            for r in old:
                f.write(json.dumps(r) + "\n")
        run_info = {
            "preset": preset_to_dict(p),
            "data": dataset.provenance(),
            "seed": seed,
            "batch": micro,
            "accum": n_accum,
            "world_size": world,
            "step_samples": step_size * world,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total,
            "warmup_steps": warm,
            "lr": base_lr,
            "loss_weights": dataclasses.asdict(loss_cfg),
            "localization": localization,
            "ablation": ablation,
            "device": str(dev),
            "precision": p.optim.precision if dev.type == "cuda" else "fp32",
            "torch": torch.__version__,
            "git_commit": _git_commit(),
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "resumed_from": None if resume_path is None else str(resume_path),
        }
        (out / "run.json").write_text(json.dumps(run_info, indent=2), encoding="utf-8")

    def save(step: int) -> Path:
        reduced = prior.reduced()
        rng_global = _gather_objects(get_rng_state())
        rng_prompt = _gather_objects(generator.get_state())
        path = ckpt_dir / f"step-{step:07d}.pt"
        if main:
            extra = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "rng": {"global": rng_global, "prompt": rng_prompt},
                "depth_prior": reduced.state(),
                "train": {
                    "seed": seed,
                    "batch": micro,
                    "accum": n_accum,
                    "world_size": world,
                    "total_steps": total,
                    "localization": localization,
                    "data": dataset.provenance(),
                    "loss_weights": dataclasses.asdict(loss_cfg),
                    "git_commit": _git_commit(),
                },
            }
            save_checkpoint(path, model, p, step=step, extra=extra)
            copy_atomic(path, ckpt_dir / "last.pt")
            (out / "depth_prior.json").write_text(
                json.dumps(reduced.to_dict(), indent=2), encoding="utf-8"
            )
            plot_loss_curves(metrics_path, out / "loss_curves.png")
        if world > 1:
            dist.barrier()
        return path

    params = [q for q in model.parameters() if q.requires_grad]
    end = total if stop_after is None else min(total, int(stop_after))
    planned_end = end
    timing_from = start + _BUDGET_SKIP
    t_timing = 0.0
    step = start
    last: dict[str, float] = {}
    first: dict[str, float] = {}
    t_start = t_prev = time.monotonic()
    bar = Progress(total, "train", enabled=progress and main, unit="step", initial=start)
    with bar:
        while step < end:
            epoch, k = divmod(step, steps_per_epoch)
            dataset.set_epoch(epoch)
            batches = _epoch_batches(
                len(dataset), step_size, steps_per_epoch, seed, epoch, rank, world
            )[k:]
            loader = DataLoader(
                dataset,
                batch_sampler=batches,
                collate_fn=collate,
                num_workers=workers,
                pin_memory=dev.type == "cuda",
                generator=torch.Generator().manual_seed(seed),
            )
            it: Iterator[Batch] = iter(loader)
            for b in it:
                t0 = time.monotonic()
                mb = b.to(dev, non_blocking=True)
                prior.add(b.snippet_labels, b.snippet_relative_depth)
                losses = train_step(ctx, mb, n_accum)
                _sync_gradients(params)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                gnorm = torch.nn.utils.clip_grad_norm_(
                    params, p.optim.clip_grad_norm if p.optim.clip_grad_norm > 0 else math.inf
                )
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                current_lr = float(optimizer.param_groups[0]["lr"])
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                dt_step = time.monotonic() - t0
                # Time budget: re-fit the length to the pace of the last window, every window
                # (the pace changes when the machine's other load does).
                window = step - timing_from
                if time_budget_s is not None and window >= 0 and window % _BUDGET_TIMED == 0:
                    now = time.monotonic()
                    fitted = end
                    if window > 0 and end > step:
                        fitted = _fit_to_budget(
                            step, (now - t_timing) / _BUDGET_TIMED,
                            time_budget_s - (now - t_call), planned_end, world,
                        )
                    t_timing = now
                    if fitted != end:
                        total = end = fitted
                        schedule = WarmupCosine(total, min(warm, total // 2), schedule.min_factor)
                        scheduler.lr_lambdas = [schedule] * len(optimizer.param_groups)
                        bar.total = total
                        if main:
                            info = json.loads((out / "run.json").read_text(encoding="utf-8"))
                            info.update(total_steps=total, time_budget_s=time_budget_s)
                            (out / "run.json").write_text(json.dumps(info, indent=2))
                # Diagnostics stay per rank (a key can be missing on one rank); losses average.
                diag = {k2: v for k2, v in losses.items() if k2 in _DIAG_KEYS}
                losses = {
                    **diag,
                    **_mean_over_ranks({k2: v for k2, v in losses.items() if k2 not in _DIAG_KEYS}),
                }
                row: dict[str, Any] = {
                    "step": step,
                    "epoch": epoch,
                    **{k2: losses[k2] for k2 in (*_LOSS_KEYS, *_DIAG_KEYS) if k2 in losses},
                    "lr": current_lr,
                    "t": float(model.logit_scale.detach().exp()),
                    "b": float(model.logit_bias.detach()),
                    "grad_norm": float(gnorm),
                    # wall-clock throughput (data loading included) and compute-only
                    "samples_per_s": step_size * world / max(time.monotonic() - t_prev, 1e-9),
                    "compute_samples_per_s": step_size * world / max(dt_step, 1e-9),
                    "step_time_s": dt_step,
                    "time_s": time.monotonic() - t_start,
                    "snippets": len(b.snippets),
                }
                t_prev = time.monotonic()
                last = {k2: float(v) for k2, v in row.items()}
                if not first:
                    first = dict(last)
                if main and (step % log_every == 0 or step == end):
                    with metrics_path.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")
                bar.update(1, loss=losses["loss"], lr=current_lr)
                if not math.isfinite(losses["loss"]):
                    raise FloatingPointError(f"loss became {losses['loss']} at step {step}")
                if step % checkpoint_every == 0 or step == end:
                    save(step)
                if step >= end:
                    break
    return TrainResult(
        run_dir=out,
        checkpoint=ckpt_dir / "last.pt",
        step=step,
        total_steps=total,
        metrics=last,
        first_metrics=first,
    )


_BUDGET_SKIP: Final = 10  # steps before timing (cuDNN autotuning, loader warm-up)
_BUDGET_TIMED: Final = 20  # steps per timing window of the time-budget fit


def _fit_to_budget(step: int, seconds_per_step: float, left_s: float, end: int, world: int) -> int:
    """The last step that fits in ``left_s`` at the measured pace (3 % margin), never past
    ``end`` and never before the next step. Ranks agree on the smallest."""
    fits = step + max(1, int(0.97 * left_s / max(seconds_per_step, 1e-9)))
    fitted = min(end, fits)
    if world > 1:
        t = torch.tensor([fitted], dtype=torch.int64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        fitted = int(t.item())
    return fitted


def _sync_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average gradients over ranks. A parameter without a gradient on this rank joins the
    all-reduce with zeros (every rank must reduce the same flat vector) and is set back to
    no gradient if no rank had one, so AdamW does not decay parameters this step never used."""
    if _world() == 1:
        return
    had = torch.tensor(
        [q.grad is not None for q in params], dtype=torch.float32, device=_comm_device()
    )
    for q in params:
        if q.grad is None:
            q.grad = torch.zeros_like(q)
    _allreduce_mean([q.grad for q in params if q.grad is not None])
    dist.all_reduce(had)
    for q, h in zip(params, had.tolist(), strict=True):
        if h == 0:
            q.grad = None


def _mean_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    if _world() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    t /= _world()
    return dict(zip(keys, t.cpu().tolist(), strict=True))


def _gather_objects(obj: Any) -> list[Any]:
    """One entry per rank (rank order); just ``[obj]`` when not distributed."""
    if _world() == 1:
        return [obj]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, obj)
    return out
