"""The tiny preset end to end, and the paper's ablation table, in one run.

Synthesizes the CT-RATE-layout data (train, a validation split for thresholds, and a held-out
test set from a seed never used in training), trains the full model and its ablations
(without localization, without prompts, CLIP softmax instead of SigLIP) with identical data,
steps and seeds, evaluates each on the held-out set by the CT-RATE protocol, exports the full
model as a bundle, and writes ``ablation.md`` / ``ablation.json``.

Variants are ``NAME[:key=value]...``: NAME is ``full`` or an ablation, the overrides change
the tiny preset (``variant_preset``), so candidate configurations of the full model can train
beside the ablations in the same run. Every ``full...`` variant is also scored on the
validation split; the best one (macro AUC + T->I R@10 there) becomes the bundle.

On a GPU the variants train side by side on one device (``--parallel``); on this project's
2-core CPU machine train one variant at a time (each takes the tiny preset's hour). With
``--time-budget`` every run fits its cosine schedule to that many seconds (``train``'s
``time_budget_s``), so a time-boxed device call still ends each schedule properly.

    python bench/ablation.py --root /data/synth --out runs/ablation --device cuda --parallel 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("full", "no-localization", "no-prompts", "clip")
# The tiny preset's model space: data are rendered on it, so loading is nearly a copy.
SHAPE = (96, 128, 128)
SPACING = (4.0, 2.5, 2.5)
SEEDS = {"train": 101, "valid": 202, "test": 303}

ROWS = (
    ("auc_macro", "macro AUC"),
    ("t2i_r1", "T→I R@1"),
    ("t2i_r5", "T→I R@5"),
    ("t2i_r10", "T→I R@10"),
    ("i2t_r10", "I→T R@10"),
    ("loc_mae_mm", "loc MAE mm"),
    ("loc_mae_mm_prior_baseline", "prior MAE mm"),
    ("loc_mae_mm_shuffled_control", "shuffled MAE mm"),
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def synthesize(root: Path, counts: dict[str, int], workers: int) -> dict[str, Path]:
    from engines.data.ctrate import synthesize_ctrate

    out: dict[str, Path] = {}
    for name, n in counts.items():
        # test lives in its own folder as CT-RATE's "valid" split, so evaluate reads it as is
        split = "train" if name == "train" else "valid"
        folder = root / name
        marker = folder / f".complete-{n}"
        out[name] = folder
        if marker.exists():
            log(f"{name}: {n} volumes already at {folder}")
            continue
        t = time.perf_counter()
        synthesize_ctrate(folder, n, SEEDS[name], SHAPE, SPACING, split=split, workers=workers)
        marker.touch()
        log(f"{name}: {n} volumes in {time.perf_counter() - t:.0f} s")
    return out


ALIASES = {
    "bias": "loss.init_logit_bias",
    "scale": "loss.init_logit_scale",
    "lr": "optim.lr",
    "wd": "optim.weight_decay",
    "clip": "optim.clip_grad_norm",
    "warmup": "optim.warmup_epochs",
    "siglip_w": "loss.siglip_weight",
    "prompt_w": "loss.prompt_weight",
    "loc_w": "loss.localization_weight",
    "prompt_text_grad": "loss.prompt_text_grad",
    "label_w": "loss.label_head_weight",
    "label_in": "loss.label_head_input",
    "neck": "model.feature_norm",
    "windows": "model.backbone.input_windows",  # clear max_windows/min_windows first
    "max_windows": "model.backbone.stem_max_windows",
    "min_windows": "model.backbone.stem_min_windows",
    "skip_extremes": "model.backbone.stem_skip_extremes",
    "depth_readout": "model.combiner.depth_readout",
    "input_readout": "model.combiner.input_readout",
    "head_skip": "model.head.skip",
    "depth_mean": "model.embedding_depth_mean",
    "depth_mean_grad": "model.prompt_depth_mean_grad",
    "norm": "model.backbone.norm",
    "channels": "model.backbone.channels",
    "blocks": "model.backbone.stage_blocks",
    "stem_pool": "model.backbone.stem_pool",
}


def split_variants(spec: str) -> list[str]:
    """``"full,full:max_windows=(9, 10)"`` -> the variants: commas inside brackets belong to
    a value (a tuple override), not to the list."""
    out: list[str] = []
    depth, cur = 0, ""
    for ch in spec:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [v for v in [*out, cur] if v]


def variant_preset(variant: str) -> tuple[str, Any]:
    """``NAME[:key=value]...`` -> (NAME, the tiny preset with those fields replaced). NAME is
    ``full`` or an ablation; a key is ``section.field`` of the preset (``loss``, ``optim``,
    ``model``, ``augment``) or one of ``ALIASES``, e.g. ``full:bias=-2.7:lr=3e-4``."""
    import ast

    from engines.presets import get_preset, override

    name, *pairs = variant.split(":")
    preset = get_preset("tiny")
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            value: Any = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        try:
            preset = override(preset, ALIASES.get(key, key), value)
        except KeyError:
            raise SystemExit(f"unknown override {key!r} in variant {variant!r}") from None
    return name, preset


def train_one(variant: str, data: Path, out: Path, args: argparse.Namespace) -> None:
    import torch

    from engines.training import train

    torch.set_num_threads(max(1, args.threads))
    name, preset = variant_preset(":".join([variant, *args.set]))
    train(
        preset,
        data,
        out,
        steps=args.steps,
        batch=args.batch,
        seed=args.seed,
        workers=args.workers,
        device=args.device,
        ablation=None if name == "full" else name,
        lr=preset.optim.lr,
        volume_cache=args.volume_cache,
        time_budget_s=args.time_budget,
        progress=False,
        log_every=args.log_every,
        checkpoint_every=max(args.steps, 1),
    )


def eval_one(spec: str, args: argparse.Namespace) -> None:
    """``VARIANT@SPLIT`` (``test`` or ``valid``): evaluate a trained variant, write its metrics
    to ``eval-<split>-<variant>/metrics.json``."""
    import torch

    from engines.evaluation import evaluate

    torch.set_num_threads(max(1, args.threads))
    variant, _, split = spec.rpartition("@")
    kw: dict[str, Any] = {}
    base = args.out / "no-localization"
    if variant.startswith("full") and (base / "checkpoints" / "last.pt").exists():
        kw["no_localization"] = base
    evaluate(
        args.out / variant, args.root / split, args.out / f"eval-{split}-{variant}",
        split="valid", device=args.device, workers=args.workers, batch=16, progress=False,
        bootstrap=args.bootstrap, **kw,
    )


def prefill_cache(train_dir: Path, cache: Path, workers: int) -> None:
    """Decode every training volume (and compute the tiny stem of each) into the shared cache
    once, before the runs start (they would otherwise all do it in their first epoch)."""
    from engines.datasets import ManifestDataset
    from engines.model.stem import HistogramStem
    from engines.presets import get_preset

    preset = get_preset("tiny")
    stem = HistogramStem.of_preset(preset.model.backbone, preset.space)
    ds = ManifestDataset.from_ctrate(
        train_dir, preset.space, split="train", volume_cache=cache, stem=stem
    )
    ds.fill_caches(workers)


def shared_text_features(train_dir: Path, path: Path, device: str) -> None:
    """Embed the training texts once; every run starts from this cache (same frozen tower)."""
    from engines.datasets import TextEncoder, open_dataset
    from engines.model.radfinder import build_model
    from engines.presets import get_preset

    preset = get_preset("tiny")
    model = build_model(preset).to(device)
    text = TextEncoder(model, cache=True)
    texts = open_dataset(train_dir, preset.space, split="train").texts()
    text.warm(texts)
    text.save(path)


def run_parallel(cmds: dict[str, list[str]], parallel: int, logdir: Path) -> list[str]:
    """Run the commands, ``parallel`` at a time; returns the names that failed."""
    pending = list(cmds)
    running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    failed: list[str] = []
    while pending or running:
        while pending and len(running) < parallel:
            name = pending.pop(0)
            logf = (logdir / f"{name.replace('@', '-')}.log").open("wb")
            running[name] = (
                subprocess.Popen(cmds[name], stdout=logf, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"}),
                time.perf_counter(),
            )
            log(f"started {name}")
        time.sleep(1)
        for name, (proc, started) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                log(f"{name}: exit {proc.returncode} after {time.perf_counter() - started:.0f} s")
                if proc.returncode:
                    failed.append(name)
    return failed


def table(results: dict[str, dict[str, Any]]) -> str:
    head = "| variant | " + " | ".join(label for _, label in ROWS) + " |"
    lines = [head, "|" + "---|" * (len(ROWS) + 1)]
    for variant, m in results.items():
        cells = []
        for key, _ in ROWS:
            v = m.get(key)
            if v is None or v.get("value") is None:
                cells.append("—")
            else:
                lo, hi = v["ci95"]
                cells.append(f"{v['value']:.3f} [{lo:.3f}, {hi:.3f}]")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _metrics(out: Path, split: str, variant: str) -> dict[str, Any] | None:
    path = out / f"eval-{split}-{variant}" / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="synthetic data folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-valid", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=1, help="data loader workers per run")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads per run")
    ap.add_argument("--synth-workers", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=1, help="variants trained at once")
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help="NAME[:key=value]... (variant_preset)"
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="an override applied to every variant (repeatable)",
    )
    ap.add_argument("--volume-cache", type=Path, help="decoded-volume cache shared by the runs")
    ap.add_argument("--time-budget", type=float, help="seconds per run (fits the schedule)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--bundle", type=Path, help="export the selected full model's bundle here")
    ap.add_argument("--train-one", help=argparse.SUPPRESS)
    ap.add_argument("--eval-one", help=argparse.SUPPRESS)
    args = ap.parse_args()

    variants = split_variants(args.variants)
    if args.train_one:
        train_one(args.train_one, args.root / "train", args.out / args.train_one, args)
        return 0
    if args.eval_one:
        eval_one(args.eval_one, args)
        return 0

    t0 = time.perf_counter()
    data = synthesize(
        args.root, {"train": args.n_train, "valid": args.n_valid, "test": args.n_test},
        args.synth_workers,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stage: dict[str, float] = {"synthesize": time.perf_counter() - t0}
    if args.volume_cache:
        t = time.perf_counter()
        prefill_cache(data["train"], args.volume_cache, args.synth_workers)
        stage["prefill_cache"] = time.perf_counter() - t
        log(f"volume cache filled in {stage['prefill_cache']:.0f} s")
    t = time.perf_counter()
    shared = args.out / "text_features.pt"
    if not shared.exists():  # a rerun reuses it; train() re-embeds if its texts differ
        shared_text_features(data["train"], shared, args.device)
    stage["text_features"] = time.perf_counter() - t
    log(f"text features in {stage['text_features']:.0f} s")
    for v in variants:
        (args.out / v).mkdir(parents=True, exist_ok=True)
        (args.out / v / "text_features.pt").write_bytes(shared.read_bytes())

    me = [sys.executable, __file__, *sys.argv[1:]]
    t = time.perf_counter()
    failed = run_parallel({v: [*me, "--train-one", v] for v in variants}, args.parallel, args.out)
    stage["train"] = time.perf_counter() - t
    trained = [v for v in variants if v not in failed]
    fulls = [v for v in trained if v.startswith("full")]
    t = time.perf_counter()
    evals = {f"{v}@test": [*me, "--eval-one", f"{v}@test"] for v in trained}
    evals |= {f"{v}@valid": [*me, "--eval-one", f"{v}@valid"] for v in fulls}
    failed += run_parallel(evals, args.parallel, args.out)
    stage["evaluate"] = time.perf_counter() - t

    results = {v: m for v in trained if (m := _metrics(args.out, "test", v)) is not None}
    validation = {v: m for v in fulls if (m := _metrics(args.out, "valid", v)) is not None}

    def score(m: dict[str, Any]) -> float:
        return float(m["auc_macro"]["value"]) + float(m["t2i_r10"]["value"])

    selected = max(validation, key=lambda v: score(validation[v])) if validation else None
    if args.bundle and selected is not None:
        from engines.bundle import export_bundle

        t = time.perf_counter()
        export_bundle(args.out / selected, args.bundle, validation_data=data["valid"],
                      device="cpu", progress=False, overwrite=True)
        stage["bundle"] = time.perf_counter() - t
        log(f"bundle of {selected} at {args.bundle}")
    steps = {}
    for v in trained:
        info = json.loads((args.out / v / "run.json").read_text())
        steps[v] = info.get("total_steps")
    summary = {
        "steps": steps, "batch": args.batch, "device": args.device,
        "time_budget_s": args.time_budget,
        "n_train": args.n_train, "n_test": args.n_test, "stage_seconds": stage,
        "failed": failed, "total_seconds": time.perf_counter() - t0, "selected": selected,
        "validation_score": {v: score(m) for v, m in validation.items()},
        "metrics": results, "validation_metrics": validation,
    }
    (args.out / "ablation.json").write_text(json.dumps(summary, indent=2))
    md = table(results)
    (args.out / "ablation.md").write_text(md)
    print(md)
    print(json.dumps({k: summary[k] for k in ("steps", "stage_seconds", "selected",
                                                "validation_score", "failed")}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
