"""GPU latency of the torch engine per volume, TINY and PAPER presets, against the FLOP bound.

For each preset (random weights: timing does not depend on them) and each precision (fp32,
and bf16 / fp16 autocast), this times what ``engines.runtimes.torch.TorchEngine`` does for one
model-space volume: copy the volume and mask to the GPU, ``RadFinder.predict`` with the
bundle-style prompt embeddings, copy the outputs back (which waits for the GPU). It reports

- ``e2e``: that whole step, median of ``--runs`` after ``--warmup`` (host clock);
- ``forward``: the forward pass alone on resident tensors (CUDA events);
- ``ideal``: the model's FLOP count (``torch.utils.flop_counter.FlopCounterMode`` on the meta
  device: matmuls, convolutions and attention, 2 FLOPs per multiply-add) over ``--peak``
  (default 790 TFLOP/s, an H200's measured dense bf16 rate), and the share of it reached.

fp32 keeps PyTorch's defaults (TF32 off for matmuls, on for cuDNN convolutions); the 790
TFLOP/s bound is a bf16 tensor-core number, so fp32 rows are expected far from it.

It imports only torch, numpy and ``engines.model`` / ``engines.presets`` (no DICOM, NIfTI,
ONNX or text-tower packages), so it runs on a bare CUDA box with a checkout of this repo:

    python bench/gpu_latency.py --out gpu_latency.json            # CUDA, both presets
    python bench/gpu_latency.py --device cpu --quick --out x.json  # smoke test anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engines.data.labels import LABELS
from engines.model.radfinder import Prediction, PromptEmbeddings, RadFinder
from engines.model.text import PROMPT_TEMPLATES
from engines.presets import PAPER, TINY, Preset

PRESETS = {"tiny": TINY, "paper": PAPER}
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_DIM = 384  # all-MiniLM-L6-v2's width; only the text heads see it


def build(preset: Preset, device: torch.device | str) -> tuple[RadFinder, PromptEmbeddings]:
    """A model at random weights (seed 0) and normalised random prompt embeddings shaped like
    a bundle's ``prompts.npz`` (18 labels x templates x [positive, negative])."""
    torch.manual_seed(0)
    with torch.device(device):
        model = RadFinder(preset.model, preset.space, text_dim=TEXT_DIM).eval()
        p, v = preset.model.head.output_dim, len(PROMPT_TEMPLATES)
        prompts = PromptEmbeddings(
            F.normalize(torch.randn(len(LABELS), v, 2, p), dim=-1),
            F.normalize(torch.randn(len(LABELS), v, p), dim=-1),
        )
    return model, prompts


def inputs(preset: Preset, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """A model-space volume in [0, 1] and a depth mask with the last token padded, as a
    scan slightly shorter than the crop gives."""
    g = torch.Generator().manual_seed(1)
    volume = torch.rand((1, 1, *preset.space.shape), generator=g).to(device)
    valid = torch.ones((1, preset.space.n_depth_tokens), dtype=torch.bool, device=device)
    valid[0, -1] = False
    return volume, valid


def count_flops(preset: Preset) -> int:
    """FLOPs of one ``predict`` at batch 1, counted on the meta device (no memory, no time)."""
    model, prompts = build(preset, "meta")
    volume, valid = inputs(preset, "meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.predict(volume, valid, prompts)
    return int(counter.get_total_flops())


@contextlib.contextmanager
def precision(device: torch.device, name: str) -> Iterator[None]:
    dtype = AUTOCAST[name]
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_step(
    model: RadFinder,
    prompts: PromptEmbeddings,
    volume: torch.Tensor,
    valid: torch.Tensor,
    device: torch.device,
    prec: str,
) -> Prediction:
    """What TorchEngine._run does: host tensors in, host float32 outputs out."""
    v = volume.to(device, non_blocking=True)
    m = valid.to(device, non_blocking=True)
    with precision(device, prec):
        pred = model.predict(v, m, prompts)
    return Prediction(
        probabilities=pred.probabilities.float().cpu(),
        depth_distribution=pred.depth_distribution.float().cpu(),
        image_embedding=pred.image_embedding.float().cpu(),
        depth_embeddings=pred.depth_embeddings.float().cpu(),
        depth_valid=pred.depth_valid.cpu(),
    )


def forward_ms(
    model: RadFinder,
    prompts: PromptEmbeddings,
    volume: torch.Tensor,
    valid: torch.Tensor,
    device: torch.device,
    prec: str,
    runs: int,
) -> list[float]:
    out: list[float] = []
    for _ in range(runs):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            with precision(device, prec):
                model.predict(volume, valid, prompts)
            end.record()
            end.synchronize()
            out.append(float(start.elapsed_time(end)))
        else:
            t = time.perf_counter()
            with precision(device, prec):
                model.predict(volume, valid, prompts)
            out.append((time.perf_counter() - t) * 1e3)
    return out


def measure(
    preset: Preset, device: torch.device, precisions: list[str], runs: int, warmup: int, peak: float
) -> list[dict[str, Any]]:
    flops = count_flops(preset)
    t = time.perf_counter()
    model, prompts = build(preset, device)
    build_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in model.parameters())
    host_volume, host_valid = inputs(preset, "cpu")
    dev_volume, dev_valid = host_volume.to(device), host_valid.to(device)
    reference: Prediction | None = None
    rows: list[dict[str, Any]] = []
    for prec in precisions:
        row: dict[str, Any] = {
            "preset": preset.name,
            "precision": prec,
            "model_space": list(preset.space.shape),
            "params": n_params,
            "gflop": flops / 1e9,
            "ideal_ms": flops / peak * 1e3,
            "build_s": round(build_s, 2),
        }
        try:
            with torch.inference_mode():
                for _ in range(warmup):
                    engine_step(model, prompts, host_volume, host_valid, device, prec)
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                e2e: list[float] = []
                pred = None
                for _ in range(runs):
                    t = time.perf_counter()
                    pred = engine_step(model, prompts, host_volume, host_valid, device, prec)
                    e2e.append((time.perf_counter() - t) * 1e3)
                fwd = forward_ms(model, prompts, dev_volume, dev_valid, device, prec, runs)
        except RuntimeError as e:  # e.g. fp16 autocast unsupported on this CPU build
            row["error"] = str(e).splitlines()[0]
            rows.append(row)
            continue
        assert pred is not None
        med_fwd = statistics.median(fwd)
        row.update(
            e2e_ms=statistics.median(e2e),
            e2e_min_ms=min(e2e),
            forward_ms=med_fwd,
            forward_min_ms=min(fwd),
            achieved_tflops=flops / (med_fwd / 1e3) / 1e12,
            fraction_of_ideal=(flops / peak * 1e3) / med_fwd,
        )
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if reference is None:
            reference = pred
        else:  # how far reduced precision moves the outputs from fp32
            row["max_abs_diff_vs_fp32"] = {
                "probabilities": float((pred.probabilities - reference.probabilities).abs().max()),
                "depth_distribution": float(
                    (pred.depth_distribution - reference.depth_distribution).abs().max()
                ),
            }
        rows.append(row)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),  # type: ignore[no-untyped-call]
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
        )
    return info


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'preset':<7}{'prec':<6}{'GFLOP':>9}{'ideal ms':>10}{'e2e ms':>10}{'fwd ms':>10}"
        f"{'TFLOP/s':>9}{'of ideal':>10}{'max|d| p':>10}{'GiB':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['preset']:<7}{r['precision']:<6}  error: {r['error']}")
            continue
        diff = r.get("max_abs_diff_vs_fp32", {}).get("probabilities")
        lines.append(
            f"{r['preset']:<7}{r['precision']:<6}{r['gflop']:>9.1f}{r['ideal_ms']:>10.3f}"
            f"{r['e2e_ms']:>10.2f}{r['forward_ms']:>10.2f}{r['achieved_tflops']:>9.3g}"
            f"{r['fraction_of_ideal']:>10.2%}{'-' if diff is None else f'{diff:.1e}':>10}"
            f"{r.get('peak_memory_gib', float('nan')):>6.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["tiny", "paper"])
    ap.add_argument("--precisions", nargs="+", choices=list(AUTOCAST), default=list(AUTOCAST))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak", type=float, default=790e12, help="FLOP/s of the ideal bound")
    ap.add_argument(
        "--no-cudnn-benchmark",
        action="store_true",
        help="leave cuDNN's autotuner off (TorchEngine turns it on: model-space shapes are fixed)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny preset only (unless --presets), 1 warm-up and 2 runs",
    )
    ap.add_argument("--out", type=Path, help="write the rows and the machine as JSON here")
    args = ap.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    if args.quick:
        args.runs, args.warmup = 2, 1
        if "--presets" not in given:
            args.presets = ["tiny"]
        if "--precisions" not in given and args.device == "cpu":
            args.precisions = ["fp32"]  # CPU autocast runs 3D convolutions 20x slower

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("CUDA is not available; use --device cpu", file=sys.stderr)
            return 2
        device = torch.device("cuda", device.index or 0)
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    rows: list[dict[str, Any]] = []
    for name in args.presets:
        print(f"{name}: building and timing on {device} ...", flush=True)
        rows += measure(PRESETS[name], device, args.precisions, args.runs, args.warmup, args.peak)
    print(table(rows))
    result = {
        "peak_flops": args.peak,
        "runs": args.runs,
        "warmup": args.warmup,
        "machine": machine(device),
        "rows": rows,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
