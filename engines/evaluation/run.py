"""``evaluate``: the CT-RATE protocol on a checkpoint or a bundle, with baselines and 95% CIs.

What is measured (following the paper code's tasks):

* Retrieval, text->image and image->text Recall@1/5/10: cosine similarity between the global
  image embedding and the report embedding over the *full* pool of evaluated volumes; a query
  is a hit when its own volume (report) is in the top k.
* Zero-shot classification, AUC per label and macro: the probability the served model gives
  (positive vs negative prompt, prompt embeddings averaged over the templates), against the
  labels; unknown labels (-1) are left out of that label's AUC.
* Localization, MAE in mm: for every snippet, the depth token whose embedding is most similar
  to the snippet against the cited token, times the token size (12 mm for both presets).
  A figure without its baselines says little, so beside it: the volume's centre (middle of the
  valid depth range); the label prior (where that finding type was cited on average in the
  training data, placed on this volume's range); the shuffled control (the same model scoring
  each snippet against another patient's volume: what the model gets from "where findings
  usually are" without looking at this patient); and, given a second checkpoint, the same
  model trained without the localization loss.

Every figure gets a 1,000-sample bootstrap 95% interval (volumes are resampled for retrieval
and AUC, snippets for localization). The output folder gets ``metrics.json``, ``metrics.md``,
``roc.png``, ``localization.png``, ``localization_scatter.png``, ``predictions.csv`` and
``localization.jsonl``.
"""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from engines.data.labels import LABELS
from engines.datasets import (
    Batch,
    DataSpec,
    RadFinderDataset,
    TextEncoder,
    collate,
    open_dataset,
)
from engines.evaluation.metrics import (
    Estimate,
    bootstrap_counts,
    estimate,
    retrieval_ranks,
    roc_curve,
    weighted_auc,
    weighted_mean,
    youden_threshold,
)
from engines.evaluation.plots import Series, bar_chart, line_chart, scatter_chart
from engines.losses import localization_predict
from engines.model.radfinder import RadFinder
from engines.model.text import TextTower
from engines.presets import Preset
from engines.training.checkpoint import load_model
from engines.training.progress import Progress

__all__ = [
    "EvalOutputs",
    "EvalResult",
    "collect_outputs",
    "compute_metrics",
    "evaluate",
    "load_prior",
    "resolve_checkpoint",
]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass
class EvalOutputs:
    """What the model produced on an evaluation set, enough for every figure.

    Per volume: L2-normalised ``image_embedding``/``report_embedding`` ``[N, P]``,
    ``probabilities``/``labels`` ``[N, L]``. Per snippet: its volume, label, cited token,
    the valid token range of its volume, and the predicted token of the model, of the
    shuffled control and (continuous) of the label prior.
    """

    volume_ids: list[str]
    image_embedding: F64
    report_embedding: F64
    probabilities: F64
    labels: I64
    token_mm: float
    snippet_volume: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    snippet_label: list[str | None] = field(default_factory=list)
    snippet_text: list[str] = field(default_factory=list)
    snippet_target: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    snippet_valid: I64 = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    snippet_pred: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    snippet_pred_shuffled: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    snippet_pred_prior: F64 | None = None
    snippet_pred_no_localization: I64 | None = None


@dataclass(frozen=True)
class EvalResult:
    out_dir: Path
    metrics: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Inputs


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """``(checkpoint file, folder to look for depth_prior.json)`` for a checkpoint file, a
    training run folder or a bundle folder."""
    p = Path(path)
    if p.is_dir() and (p / "bundle.toml").exists():
        from engines.bundle import load_bundle

        b = load_bundle(p)
        return b.checkpoint_path, p
    if p.is_dir():
        ck = p / "checkpoints" / "last.pt"
        if not ck.exists():
            raise FileNotFoundError(f"{p} is neither a bundle nor a run folder with a checkpoint")
        return ck, p
    if p.parent.name == "checkpoints":
        return p, p.parent.parent
    return p, p.parent


def load_prior(
    prior: str | Path | Mapping[str, Any] | RadFinderDataset | None,
    preset: Preset,
    *,
    search: Sequence[Path] = (),
    progress: bool = False,
) -> tuple[dict[str, Any] | None, str]:
    """The label-depth prior and where it came from.

    ``prior``: a mapping (``depth_prior.json`` content), a JSON file, a training manifest or
    CT-RATE folder or dataset (the statistic is computed from it, without augmentation), or
    None (``depth_prior.json`` in the ``search`` folders, written by training and copied into
    bundles).
    """
    if isinstance(prior, Mapping):
        return dict(prior), "given"
    if isinstance(prior, str | Path) and Path(prior).suffix == ".json":
        return json.loads(Path(prior).read_text(encoding="utf-8")), str(prior)
    if prior is None:
        for folder in search:
            f = folder / "depth_prior.json"
            if f.exists():
                return json.loads(f.read_text(encoding="utf-8")), str(f)
        return None, "none found"
    from engines.training.loop import DepthPrior

    ds = open_dataset(prior, preset.space, split="train", augment=None)
    stats = DepthPrior()
    with Progress(len(ds), "label prior", enabled=progress, unit="vol") as bar:
        for i in range(len(ds)):
            s = ds[i]
            stats.add(s.snippet_labels, s.snippet_relative_depth)
            bar.update(1)
    src = ds.provenance().get("path", "dataset")
    return stats.to_dict(), f"computed from {src}"


def _prior_mean(prior: Mapping[str, Any], label: str | None) -> float:
    per = prior.get("labels", {})
    if label is not None and label in per:
        return float(per[label]["mean"])
    return float(prior.get("overall", {}).get("mean", 0.5))


_CTRATE_PATIENT = re.compile(r"^((?:train|valid|test)_\d+)_")


def patient_key(volume_id: str) -> str:
    """The patient a volume belongs to: CT-RATE names carry it (``valid_12_a_1`` ->
    ``valid_12``); elsewhere each volume is its own patient."""
    m = _CTRATE_PATIENT.match(Path(volume_id).name)
    return m.group(1) if m else volume_id


def shuffled_partner(volume_ids: Sequence[str], seed: int) -> I64:
    """For every volume another patient's volume (a random derangement over patients);
    a volume maps to itself only when every volume is the same patient's."""
    n = len(volume_ids)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    keys = [patient_key(v) for v in volume_ids]
    out = np.arange(n, dtype=np.int64)
    for pos, i in enumerate(order):
        for step in range(1, n):
            j = int(order[(pos + step) % n])
            if keys[j] != keys[int(i)]:
                out[int(i)] = j
                break
    return out


# ---------------------------------------------------------------------------------------------
# Running the model


@dataclass
class _Collected:
    volume_ids: list[str] = field(default_factory=list)
    image: list[torch.Tensor] = field(default_factory=list)
    report: list[torch.Tensor] = field(default_factory=list)
    prob: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    depth: list[torch.Tensor] = field(default_factory=list)
    valid: list[torch.Tensor] = field(default_factory=list)
    snippet_emb: list[torch.Tensor] = field(default_factory=list)
    snippet_volume: list[int] = field(default_factory=list)
    snippet_target: list[int] = field(default_factory=list)
    snippet_label: list[str | None] = field(default_factory=list)
    snippet_text: list[str] = field(default_factory=list)
    snippet_prior: list[float] = field(default_factory=list)


def _autocast(device: torch.device, preset: Preset) -> Any:
    if device.type == "cuda" and preset.optim.precision == "bf16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


@torch.no_grad()
def _run_model(
    model: RadFinder,
    preset: Preset,
    dataset: RadFinderDataset,
    *,
    text: TextEncoder,
    device: torch.device,
    batch: int,
    workers: int,
    progress: bool,
    prior: Mapping[str, Any] | None,
    desc: str,
) -> _Collected:
    model.eval()
    classify, locate = text.prompt_features()
    prompts = model.encode_prompts(classify.to(device), locate.to(device))
    loader = DataLoader(dataset, batch_size=batch, collate_fn=collate, num_workers=workers)
    c = _Collected()
    offset = 0
    with Progress(len(dataset), desc, enabled=progress, unit="vol") as bar:
        for b in loader:
            assert isinstance(b, Batch)
            mb = b.to(device)
            with _autocast(device, preset):
                pred = model.predict(mb.image, mb.depth_valid, prompts)
                rep = model.encode_reports(text(b.reports).to(device))
                snip = model.encode_snippets(text(b.snippets).to(device))
            c.volume_ids += b.volume_ids
            c.image.append(pred.image_embedding.float().cpu())
            c.report.append(F.normalize(rep.float(), dim=-1).cpu())
            c.prob.append(pred.probabilities.float().cpu())
            c.labels.append(b.labels)
            c.depth.append(pred.depth_embeddings.float().cpu())
            c.valid.append(pred.depth_valid.cpu())
            c.snippet_emb.append(F.normalize(snip.float(), dim=-1).cpu())
            c.snippet_volume += [offset + int(i) for i in b.snippet_batch_index]
            c.snippet_target += [int(t) for t in b.snippet_target]
            c.snippet_label += b.snippet_labels
            c.snippet_text += b.snippets
            if prior is not None:
                for vi, lb in zip(b.snippet_batch_index.tolist(), b.snippet_labels, strict=True):
                    c.snippet_prior.append(_prior_token(b.spaces[vi], _prior_mean(prior, lb)))
            offset += len(b)
            bar.update(len(b))
    return c


def _prior_token(space: Any, rel: float) -> float:
    """The continuous depth token at relative depth ``rel`` of this volume's valid range."""
    valid = np.flatnonzero(space.depth_valid)
    za = space.token_to_z_mm(float(valid[0]))
    zb = space.token_to_z_mm(float(valid[-1]))
    lo, hi = min(za, zb), max(za, zb)
    return float(space.z_mm_to_token(lo + rel * (hi - lo)))


def _predict_tokens(
    depth: torch.Tensor, valid: torch.Tensor, snippets: torch.Tensor, volume: I64
) -> I64:
    if volume.size == 0:
        return np.zeros(0, np.int64)
    idx = torch.from_numpy(volume)
    pred = localization_predict(depth[idx], snippets, valid[idx])
    out: I64 = pred.numpy().astype(np.int64)
    return out


def collect_outputs(
    model: RadFinder,
    preset: Preset,
    dataset: RadFinderDataset,
    *,
    device: str | torch.device = "cpu",
    batch: int = 4,
    workers: int = 0,
    progress: bool = True,
    prior: Mapping[str, Any] | None = None,
    seed: int = 0,
    no_localization_model: RadFinder | None = None,
) -> EvalOutputs:
    """Run the model (and the ablation, if given) over ``dataset``."""
    dev = torch.device(device)
    text = TextEncoder(model, cache=False)
    c = _run_model(
        model, preset, dataset, text=text, device=dev, batch=batch, workers=workers,
        progress=progress, prior=prior, desc="evaluate",
    )
    depth = torch.cat(c.depth)
    valid = torch.cat(c.valid)
    snip = torch.cat(c.snippet_emb) if c.snippet_emb else torch.zeros(0, model.embed_dim)
    vol = np.asarray(c.snippet_volume, dtype=np.int64)
    partner = shuffled_partner(c.volume_ids, seed)
    valid_np = valid.numpy()
    ranges = np.array(
        [[int(np.flatnonzero(valid_np[v])[0]), int(np.flatnonzero(valid_np[v])[-1])]
         for v in vol],
        dtype=np.int64,
    ).reshape(-1, 2)
    outputs = EvalOutputs(
        volume_ids=c.volume_ids,
        image_embedding=torch.cat(c.image).numpy().astype(np.float64),
        report_embedding=torch.cat(c.report).numpy().astype(np.float64),
        probabilities=torch.cat(c.prob).numpy().astype(np.float64),
        labels=torch.cat(c.labels).numpy().astype(np.int64),
        token_mm=float(preset.space.depth_token_mm),
        snippet_volume=vol,
        snippet_label=c.snippet_label,
        snippet_text=c.snippet_text,
        snippet_target=np.asarray(c.snippet_target, dtype=np.int64),
        snippet_valid=ranges,
        snippet_pred=_predict_tokens(depth, valid, snip, vol),
        snippet_pred_shuffled=_predict_tokens(depth, valid, snip, partner[vol]),
        snippet_pred_prior=np.asarray(c.snippet_prior, dtype=np.float64) if prior else None,
    )
    if no_localization_model is not None:
        text2 = TextEncoder(no_localization_model, cache=False)
        c2 = _run_model(
            no_localization_model, preset, dataset, text=text2, device=dev, batch=batch,
            workers=workers, progress=progress, prior=None, desc="evaluate (no loc. loss)",
        )
        snip2 = torch.cat(c2.snippet_emb) if c2.snippet_emb else torch.zeros(0, 1)
        outputs.snippet_pred_no_localization = _predict_tokens(
            torch.cat(c2.depth), torch.cat(c2.valid), snip2, vol
        )
    return outputs


# ---------------------------------------------------------------------------------------------
# Figures


def compute_metrics(
    outputs: EvalOutputs, *, bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Every figure of the protocol with its bootstrap 95% interval."""
    o = outputs
    n = len(o.volume_ids)
    counts = bootstrap_counts(n, bootstrap, seed)
    out: dict[str, Any] = {
        "n_volumes": n,
        "n_snippets": int(o.snippet_target.size),
        "bootstrap": int(bootstrap),
        "bootstrap_seed": int(seed),
    }

    def mean_est(values: npt.ArrayLike, cnt: F64) -> Estimate:
        v = np.asarray(values, dtype=np.float64)
        point = float(v.mean()) if v.size else float("nan")
        return estimate(point, weighted_mean(v, cnt) if v.size else [])

    sim = o.image_embedding @ o.report_embedding.T
    ranks = {"i2t": retrieval_ranks(sim), "t2i": retrieval_ranks(sim.T)}
    for direction, r in ranks.items():
        for k in (1, 5, 10):
            out[f"{direction}_r{k}"] = mean_est((r < k).astype(np.float64), counts)

    aucs: dict[str, Estimate] = {}
    points: list[float] = []
    reps: list[F64] = []
    for j, label in enumerate(LABELS):
        y = o.labels[:, j]
        point = float(weighted_auc(o.probabilities[:, j], y)[0])
        rep = weighted_auc(o.probabilities[:, j], y, counts)
        aucs[label] = estimate(point, rep)
        if math.isfinite(point):
            points.append(point)
            reps.append(rep)
    out["auc"] = aucs
    if points:
        with warnings.catch_warnings():
            # A replicate in which no label has both classes is all-NaN: it is dropped.
            warnings.simplefilter("ignore", category=RuntimeWarning)
            macro_reps = np.nanmean(np.stack(reps), axis=0) if bootstrap else np.zeros(0)
        out["auc_macro"] = estimate(float(np.mean(points)), macro_reps)
    else:
        out["auc_macro"] = estimate(float("nan"), [])
    out["auc_macro_n_labels"] = len(points)

    s = o.snippet_target.size
    scounts = bootstrap_counts(s, bootstrap, seed + 1)
    mm = o.token_mm
    target = o.snippet_target.astype(np.float64)
    err = np.abs(o.snippet_pred - target) * mm
    centre = o.snippet_valid.mean(axis=1) if s else np.zeros(0)
    out["loc_mae_mm"] = mean_est(err, scounts)
    out["loc_mae_mm_center_baseline"] = mean_est(np.abs(centre - target) * mm, scounts)
    if o.snippet_pred_prior is not None:
        out["loc_mae_mm_prior_baseline"] = mean_est(
            np.abs(o.snippet_pred_prior - target) * mm, scounts
        )
    else:
        out["loc_mae_mm_prior_baseline"] = {
            **estimate(float("nan"), []),
            "note": "no label-depth prior (training manifest or depth_prior.json) given",
        }
    out["loc_mae_mm_shuffled_control"] = mean_est(
        np.abs(o.snippet_pred_shuffled - target) * mm, scounts
    )
    if o.snippet_pred_no_localization is not None:
        out["loc_mae_mm_no_localization_model"] = mean_est(
            np.abs(o.snippet_pred_no_localization - target) * mm, scounts
        )
    out["loc_within_one_token"] = mean_est((err <= mm + 1e-9).astype(np.float64), scounts)
    by_label: dict[str, Estimate] = {}
    for label in LABELS:
        sel = np.array([lb == label for lb in o.snippet_label], dtype=bool)
        if sel.any():
            sub = bootstrap_counts(int(sel.sum()), bootstrap, seed + 2)
            by_label[label] = mean_est(err[sel], sub)
    out["loc_mae_mm_by_label"] = by_label

    thresholds = {}
    for j, label in enumerate(LABELS):
        thr, info = youden_threshold(o.probabilities[:, j], o.labels[:, j])
        thresholds[label] = {"threshold": thr, **info}
    out["youden_thresholds"] = thresholds
    return out


_MAIN_ROWS = (
    ("auc_macro", "Zero-shot AUC, macro", "{:.3f}"),
    ("t2i_r1", "Text->image R@1", "{:.3f}"),
    ("t2i_r5", "Text->image R@5", "{:.3f}"),
    ("t2i_r10", "Text->image R@10", "{:.3f}"),
    ("i2t_r1", "Image->text R@1", "{:.3f}"),
    ("i2t_r5", "Image->text R@5", "{:.3f}"),
    ("i2t_r10", "Image->text R@10", "{:.3f}"),
    ("loc_mae_mm", "Localization MAE (mm)", "{:.1f}"),
    ("loc_mae_mm_center_baseline", "  baseline: volume centre", "{:.1f}"),
    ("loc_mae_mm_prior_baseline", "  baseline: label prior", "{:.1f}"),
    ("loc_mae_mm_shuffled_control", "  control: another patient's volume", "{:.1f}"),
    ("loc_mae_mm_no_localization_model", "  ablation: no localization loss", "{:.1f}"),
    ("loc_within_one_token", "Localization within one token", "{:.3f}"),
)


def _fmt(e: Mapping[str, Any], fmt: str) -> tuple[str, str]:
    v = e.get("value")
    lo, hi = e.get("ci95", [None, None])
    value = fmt.format(v) if v is not None else "n/a"
    ci = f"{fmt.format(lo)} - {fmt.format(hi)}" if lo is not None and hi is not None else "n/a"
    return value, ci


def markdown_table(metrics: Mapping[str, Any]) -> str:
    lines = [
        f"Volumes: {metrics['n_volumes']}, snippets: {metrics['n_snippets']}, "
        f"bootstrap: {metrics['bootstrap']} resamples (95% percentile intervals).",
        "",
        "| metric | value | 95% CI |",
        "|---|---|---|",
    ]
    for key, name, fmt in _MAIN_ROWS:
        if key in metrics:
            v, ci = _fmt(metrics[key], fmt)
            lines.append(f"| {name} | {v} | {ci} |")
    lines += ["", "| label | AUC | 95% CI | loc. MAE (mm) |", "|---|---|---|---|"]
    for label in LABELS:
        v, ci = _fmt(metrics["auc"][label], "{:.3f}")
        loc = metrics["loc_mae_mm_by_label"].get(label)
        lv = _fmt(loc, "{:.1f}")[0] if loc else "n/a"
        lines.append(f"| {label} | {v} | {ci} | {lv} |")
    return "\n".join(lines) + "\n"


def _plots(out_dir: Path, o: EvalOutputs, metrics: Mapping[str, Any]) -> None:
    curves = []
    for j, label in enumerate(LABELS):
        fpr, tpr, _ = roc_curve(o.probabilities[:, j], o.labels[:, j])
        if np.isfinite(fpr).all() and np.isfinite(tpr).all() and fpr.size > 1:
            auc = metrics["auc"][label]["value"]
            curves.append(Series(f"{label[:22]} {auc:.2f}", fpr, tpr))
    line_chart(
        out_dir / "roc.png", curves, title="zero-shot ROC per label (AUC)",
        xlabel="false positive rate", ylabel="true positive rate",
        xlim=(0.0, 1.0), ylim=(0.0, 1.0), diagonal=True,
    )
    bars: dict[str, tuple[float, float, float]] = {}
    for key, name in (
        ("loc_mae_mm", "model"),
        ("loc_mae_mm_center_baseline", "centre"),
        ("loc_mae_mm_prior_baseline", "label prior"),
        ("loc_mae_mm_shuffled_control", "shuffled"),
        ("loc_mae_mm_no_localization_model", "no loc. loss"),
    ):
        e = metrics.get(key)
        if e and e.get("value") is not None:
            lo, hi = e["ci95"]
            bars[name] = (e["value"], lo if lo is not None else math.nan,
                          hi if hi is not None else math.nan)
    bar_chart(out_dir / "localization.png", bars, title="localization MAE with 95% CI",
              ylabel="mm")
    d = float(np.max(o.snippet_valid)) + 1 if o.snippet_valid.size else 1.0
    scatter_chart(
        out_dir / "localization_scatter.png",
        [Series("model", o.snippet_target, o.snippet_pred),
         Series("shuffled", o.snippet_target, o.snippet_pred_shuffled)],
        title="predicted vs cited depth token", xlabel="cited token",
        ylabel="predicted token", lim=(-0.5, d - 0.5), jitter=0.2,
    )


def _write_tables(out_dir: Path, o: EvalOutputs) -> None:
    with (out_dir / "predictions.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["volume_id", *[f"p:{lb}" for lb in LABELS], *[f"y:{lb}" for lb in LABELS]])
        for i, vid in enumerate(o.volume_ids):
            w.writerow([vid, *[f"{p:.6f}" for p in o.probabilities[i]], *o.labels[i].tolist()])
    with (out_dir / "localization.jsonl").open("w", encoding="utf-8") as f:
        for s in range(o.snippet_target.size):
            row: dict[str, Any] = {
                "volume_id": o.volume_ids[int(o.snippet_volume[s])],
                "label": o.snippet_label[s],
                "snippet": o.snippet_text[s] if s < len(o.snippet_text) else None,
                "target": int(o.snippet_target[s]),
                "pred": int(o.snippet_pred[s]),
                "pred_shuffled": int(o.snippet_pred_shuffled[s]),
                "valid": [int(v) for v in o.snippet_valid[s]],
            }
            if o.snippet_pred_prior is not None:
                row["pred_prior"] = round(float(o.snippet_pred_prior[s]), 3)
            if o.snippet_pred_no_localization is not None:
                row["pred_no_localization"] = int(o.snippet_pred_no_localization[s])
            f.write(json.dumps(row) + "\n")


def write_report(out_dir: str | Path, outputs: EvalOutputs, metrics: Mapping[str, Any]) -> None:
    """metrics.json, metrics.md, the PNGs and the per-volume / per-snippet tables."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(
        json.dumps(metrics, indent=2, allow_nan=False), encoding="utf-8"
    )
    (d / "metrics.md").write_text(markdown_table(metrics), encoding="utf-8")
    _plots(d, outputs, metrics)
    _write_tables(d, outputs)


def evaluate(
    checkpoint_or_bundle: str | Path,
    data: DataSpec,
    out_dir: str | Path,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    prior: str | Path | Mapping[str, Any] | RadFinderDataset | None = None,
    no_localization: str | Path | None = None,
    split: str = "valid",
    batch: int = 4,
    workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    text_tower: TextTower | None = None,
) -> EvalResult:
    """Evaluate a checkpoint, a run folder or a bundle on ``data`` (see ``open_dataset``;
    ``split`` picks CT-RATE's split or the manifest rows; ``"synthetic:N"`` is a fixed set of
    N phantoms drawn with ``seed + 1``, which training with the same seed never sees).

    ``prior``: where the label-prior baseline comes from (see ``load_prior``; default the
    ``depth_prior.json`` that training wrote beside the checkpoint or that the bundle holds).
    ``no_localization``: a checkpoint of the same model trained without the localization loss.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt, folder = resolve_checkpoint(checkpoint_or_bundle)
    model, preset, data_ck = load_model(ckpt, text_tower=text_tower, device=dev)
    ablation = None
    if no_localization is not None:
        ck2, _ = resolve_checkpoint(no_localization)
        ablation, preset2, _ = load_model(ck2, text_tower=model.text, device=dev)
        if preset2.space != preset.space:
            raise ValueError("the ablation checkpoint uses another model space")
    search = [f for f in (folder, ckpt.parent, ckpt.parent.parent) if f is not None]
    prior_stats, prior_src = load_prior(prior, preset, search=search, progress=progress)
    dataset = open_dataset(data, preset.space, split=split, augment=None, seed=seed + 1)
    outputs = collect_outputs(
        model, preset, dataset, device=dev, batch=batch, workers=workers, progress=progress,
        prior=prior_stats, seed=seed, no_localization_model=ablation,
    )
    metrics = compute_metrics(outputs, bootstrap=bootstrap, seed=seed)
    metrics["source"] = {
        "checkpoint": str(ckpt),
        "step": int(data_ck["step"]),
        "preset": preset.name,
        "data": dataset.provenance(),
        "prior": prior_src,
        "no_localization_checkpoint": None if no_localization is None else str(no_localization),
    }
    write_report(out_dir, outputs, metrics)
    return EvalResult(Path(out_dir), metrics)
