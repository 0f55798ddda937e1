"""Inference: ONNX Runtime against torch eager on one bundle and one volume, same run, same
threads. Target: ORT at least 1.5x faster, and the two agree to max |delta| <= 1e-4.

The bundle is ``--bundle``, else ``engines/bundles/demo-tiny`` when it exists, else a bundle
exported here at the TINY preset with random weights into a temporary directory (the script
says so: timing does not depend on the weights, agreement does not either). The volume is one
synthetic chest CT (``engines.data.phantoms``) on a scanner-like grid; it is brought to model
space once with the shared preprocessing (timed and reported, not part of the comparison) and
then both engines predict that same ``ModelInput``.

Fairness: both engines get ``--threads`` intra-op threads (default: the CPUs this process may
use) and one inter-op thread; ONNX Runtime uses ``engines.runtimes.onnx.session_options``
(every graph optimisation, sequential execution, memory patterns, CPU arena), torch runs under
``inference_mode``. After ``--warmup`` runs each, ``--runs`` timed runs alternate between the
engines so that a noisy neighbour hits both; medians are compared.

Run: ``.venv/bin/python bench/inference.py [--bundle DIR] [--runs 20] [--threads N] [--json F]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort  # type: ignore[import-untyped]
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engines.bundle import Bundle, export_bundle, load_bundle
from engines.data.phantoms import generate_phantom
from engines.model.radfinder import Prediction
from engines.preprocess import ModelInput
from engines.runtimes import Engine, load_engine

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "engines" / "bundles" / "demo-tiny"
TARGET_SPEEDUP = 1.5
TARGET_DIFF = 1e-4


def random_tiny_bundle(out: Path) -> Bundle:
    """A TINY-preset bundle with random weights (seed 0); the text tower embeds the prompts."""
    from engines.model import TextTower, build_model
    from engines.presets import TINY
    from engines.training import save_checkpoint

    tower = TextTower.from_pretrained(None, max_length=TINY.model.text.max_length, freeze=True)
    torch.manual_seed(0)
    model = build_model(TINY, text_tower=tower)
    run = out / "run"
    save_checkpoint(run / "checkpoints" / "last.pt", model, TINY, step=0)
    return export_bundle(run, out / "bundle", text_tower=tower, progress=False, name="bench-tiny")


def timed(engine: Engine, mi: ModelInput) -> tuple[float, Prediction]:
    t = time.perf_counter()
    pred = engine.predict(mi)
    return time.perf_counter() - t, pred


def max_diff(a: Prediction, b: Prediction) -> dict[str, float]:
    return {
        name: float((getattr(a, name) - getattr(b, name)).abs().max())
        for name in ("probabilities", "depth_distribution", "image_embedding", "depth_embeddings")
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: demo-tiny)")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per engine")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs per engine first")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--shape", type=int, nargs=3, default=(160, 256, 256), metavar=("Z", "Y", "X"))
    ap.add_argument("--spacing", type=float, nargs=3, default=(2.5, 1.5, 1.5), metavar="MM")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the text tower is local; never download
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):  # fixed already if parallel work ran before
        torch.set_num_interop_threads(1)

    tmp: tempfile.TemporaryDirectory[str] | None = None
    if args.bundle is not None:
        bundle, source = load_bundle(args.bundle), str(args.bundle)
    elif DEMO_BUNDLE.is_dir():
        bundle, source = load_bundle(DEMO_BUNDLE), str(DEMO_BUNDLE.relative_to(ROOT))
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-inference-")
        print(f"{DEMO_BUNDLE.relative_to(ROOT)} does not exist: exporting a TINY bundle with "
              f"random weights into {tmp.name}", flush=True)  # fmt: skip
        bundle, source = random_tiny_bundle(Path(tmp.name)), "TINY preset, random weights"

    onnx_engine = load_engine(bundle, "onnx", device="cpu", threads=args.threads)
    torch_engine = load_engine(bundle, "torch", device="cpu")

    ph = generate_phantom(args.shape, args.spacing, seed=7)
    t = time.perf_counter()
    mi = onnx_engine.prepare(ph.hu, ph.spacing, ph.affine)
    prep_s = time.perf_counter() - t

    for _ in range(args.warmup):
        onnx_engine.predict(mi)
        torch_engine.predict(mi)
    ort_times: list[float] = []
    torch_times: list[float] = []
    diffs: dict[str, float] = {}
    for i in range(args.runs):
        # alternate which engine goes first, so neither always runs on a warmer cache
        order = (onnx_engine, torch_engine) if i % 2 == 0 else (torch_engine, onnx_engine)
        got: dict[str, Prediction] = {}
        for eng in order:
            s, pred = timed(eng, mi)
            (ort_times if eng is onnx_engine else torch_times).append(s)
            got[eng.runtime] = pred
        for k, v in max_diff(got["onnx"], got["torch"]).items():
            diffs[k] = max(diffs.get(k, 0.0), v)

    ort_med, torch_med = statistics.median(ort_times), statistics.median(torch_times)
    speedup = torch_med / ort_med
    worst = max(diffs["probabilities"], diffs["depth_distribution"])
    result: dict[str, Any] = {
        "bundle": {"source": source, "name": bundle.name, "version": bundle.version,
                   "preset": bundle.preset.name, "model_space": list(bundle.preset.space.shape)},
        "volume": {"shape": list(args.shape), "spacing_mm": list(args.spacing),
                   "preprocess_s": round(prep_s, 4)},
        "threads": args.threads,
        "runs": args.runs,
        "warmup": args.warmup,
        "onnxruntime_s": {"median": ort_med, "min": min(ort_times), "max": max(ort_times)},
        "torch_eager_s": {"median": torch_med, "min": min(torch_times), "max": max(torch_times)},
        "speedup_ort_over_torch": speedup,
        "speedup_best_runs": min(torch_times) / min(ort_times),
        "max_abs_diff": diffs,
        "targets": {
            "speedup>=1.5": speedup >= TARGET_SPEEDUP,
            "max_abs_diff<=1e-4": worst <= TARGET_DIFF,
        },
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "onnxruntime": ort.__version__},
    }  # fmt: skip

    print(f"bundle      {source} ({bundle.name} {bundle.version}, preset {bundle.preset.name}, "
          f"model space {tuple(bundle.preset.space.shape)})")  # fmt: skip
    print(f"volume      {tuple(args.shape)} at {tuple(args.spacing)} mm; "
          f"preprocess {prep_s * 1e3:.1f} ms (shared, not compared)")  # fmt: skip
    print(f"threads     {args.threads} intra-op, 1 inter-op; {args.warmup} warm-up + {args.runs} "
          "alternating runs per engine")  # fmt: skip
    print(f"{'engine':<14}{'median':>11}{'min':>11}{'max':>11}")
    for name, ts in (("onnxruntime", ort_times), ("torch eager", torch_times)):
        print(f"{name:<14}{statistics.median(ts) * 1e3:>9.1f}ms{min(ts) * 1e3:>9.1f}ms"
              f"{max(ts) * 1e3:>9.1f}ms")  # fmt: skip
    ok = "ok" if speedup >= TARGET_SPEEDUP else "BELOW TARGET"
    print(f"speedup     ORT is {speedup:.2f}x torch eager on medians (target >= {TARGET_SPEEDUP}x: "
          f"{ok}); {min(torch_times) / min(ort_times):.2f}x on the best runs")  # fmt: skip
    ok = "ok" if worst <= TARGET_DIFF else "ABOVE TARGET"
    print(f"max |delta| probabilities {diffs['probabilities']:.2e}, depth distributions "
          f"{diffs['depth_distribution']:.2e} (target <= {TARGET_DIFF:g}: {ok}); embeddings "
          f"{diffs['image_embedding']:.2e} / {diffs['depth_embeddings']:.2e}")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    onnx_engine.close()
    torch_engine.close()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
