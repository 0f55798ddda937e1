"""The tiny preset end to end, and the paper's ablation table, in one run.

Synthesizes the CT-RATE-layout data (train, a validation split for thresholds, and a held-out
test set from a seed never used in training), trains the full model and its ablations
(without localization, without prompts, CLIP softmax instead of SigLIP) with identical data,
steps and seeds, evaluates each on the held-out set by the CT-RATE protocol, exports the full
model as a bundle, and writes ``ablation.md`` / ``ablation.json``.

On a GPU the variants train side by side on one device (``--parallel``); on this project's
2-core CPU machine train one variant at a time (each takes the tiny preset's hour).

    python bench/ablation.py --root /data/synth --out runs/ablation --device cuda --parallel 4
"""

from __future__ import annotations

import argparse
import dataclasses
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


def train_one(variant: str, data: Path, out: Path, args: argparse.Namespace) -> None:
    import torch

    from engines.presets import get_preset
    from engines.training import train

    torch.set_num_threads(max(1, args.threads))
    name, _, bias = variant.partition(":bias=")
    preset = get_preset("tiny")
    if bias:  # a variant of the SigLIP bias init, e.g. "full:bias=-2.7" (-log(B-1) at B=16)
        preset = dataclasses.replace(
            preset, loss=dataclasses.replace(preset.loss, init_logit_bias=float(bias))
        )
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
        progress=False,
        log_every=args.log_every,
        checkpoint_every=max(args.steps, 1),
    )


def evaluate_one(run: Path, test: Path, out: Path, args: argparse.Namespace, **kw: Any) -> Any:
    from engines.evaluation import evaluate

    return evaluate(
        run, test, out, split="valid", device=args.device, workers=args.workers,
        batch=16, progress=False, **kw,
    )


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
        "--variants", default=",".join(VARIANTS), help="also NAME:bias=X for the SigLIP bias init"
    )
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--bundle", type=Path, help="export the full model's bundle here")
    ap.add_argument("--train-one", help=argparse.SUPPRESS)
    args = ap.parse_args()

    variants = [v for v in args.variants.split(",") if v]
    if args.train_one:
        train_one(args.train_one, args.root / "train", args.out / args.train_one, args)
        return 0

    t0 = time.perf_counter()
    data = synthesize(
        args.root, {"train": args.n_train, "valid": args.n_valid, "test": args.n_test},
        args.synth_workers,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    pending = list(variants)
    running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    train_s: dict[str, float] = {}
    failed: list[str] = []
    while pending or running:
        while pending and len(running) < args.parallel:
            v = pending.pop(0)
            cmd = [sys.executable, __file__, *sys.argv[1:], "--train-one", v]
            logf = (args.out / f"train-{v}.log").open("wb")
            running[v] = (subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1"}),
                          time.perf_counter())
            log(f"training {v}")
        time.sleep(2)
        for v, (proc, started) in list(running.items()):
            if proc.poll() is not None:
                del running[v]
                train_s[v] = time.perf_counter() - started
                log(f"{v}: exit {proc.returncode} after {train_s[v]:.0f} s")
                if proc.returncode:
                    failed.append(v)
    results: dict[str, dict[str, Any]] = {}
    for v in variants:
        if v in failed:
            continue
        kw: dict[str, Any] = {}
        baseline = "no-localization" in variants and "no-localization" not in failed
        if v.startswith("full") and baseline:
            kw["no_localization"] = args.out / "no-localization"
        t = time.perf_counter()
        res = evaluate_one(args.out / v, data["test"], args.out / f"eval-{v}", args, **kw)
        results[v] = json.loads((Path(res.out_dir) / "metrics.json").read_text())
        log(f"evaluated {v} in {time.perf_counter() - t:.0f} s")
        (args.out / "ablation.md").write_text(table(results))  # partial, in case of a kill
    if args.bundle and "full" in results and "full" not in failed:
        from engines.bundle import export_bundle

        export_bundle(args.out / "full", args.bundle, validation_data=data["valid"],
                      device="cpu", progress=False, overwrite=True)
        log(f"bundle at {args.bundle}")
    summary = {
        "steps": args.steps, "batch": args.batch, "device": args.device,
        "n_train": args.n_train, "n_test": args.n_test, "train_seconds": train_s,
        "failed": failed, "total_seconds": time.perf_counter() - t0, "metrics": results,
    }
    (args.out / "ablation.json").write_text(json.dumps(summary, indent=2))
    md = table(results)
    (args.out / "ablation.md").write_text(md)
    print(md)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
