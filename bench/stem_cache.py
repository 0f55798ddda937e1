"""Tiny-preset training speed with the backbone's fixed stem cached per volume, against the
stem recomputed every step (issue 4: more steps in the CPU hour).

Runs the real ``engines.training.train`` on the same CT-RATE-layout folder, same seed and
steps, alternating the two settings (A B A B ...) so that load on the machine hits both
alike, and prints the median samples per second of each (the loop's own ``samples_per_s``,
first steps of each run skipped) and their ratio. The decoded-volume and stem caches are
filled first (not timed), as ``bench/ablation.py`` does; the frozen text tower's features
come from ``--text-features`` (a run's ``text_features.pt`` of the same data) so that both
settings time training only.

    .venv/bin/python bench/stem_cache.py --data DIR --cache DIR --text-features F \\
        [--steps 40] [--rounds 2] [--workers 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--text-features", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5, help="first steps of a run not counted")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fill-workers", type=int, default=2)
    args = ap.parse_args()
    import torch

    from engines.datasets import ManifestDataset
    from engines.model.stem import HistogramStem
    from engines.presets import get_preset
    from engines.training import train

    torch.set_num_threads(args.threads)
    preset = get_preset("tiny")
    stem = HistogramStem.of_preset(preset.model.backbone, preset.space)
    t = time.perf_counter()
    ds = ManifestDataset.from_ctrate(
        args.data, preset.space, split="train", volume_cache=args.cache, stem=stem
    )
    n = ds.fill_caches(args.fill_workers)
    print(f"caches filled for {n} volumes in {time.perf_counter() - t:.0f} s", flush=True)

    rates: dict[str, list[float]] = {"recomputed": [], "cached": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, cached in (("recomputed", False), ("cached", True)):
                run = Path(tmp) / f"{name}-{r}"
                run.mkdir()
                shutil.copy(args.text_features, run / "text_features.pt")
                t = time.perf_counter()
                train(
                    preset, args.data, run, steps=args.steps, seed=0, progress=False,
                    workers=args.workers, volume_cache=args.cache, cache_stems=cached,
                    checkpoint_every=10**9,
                )
                rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
                sps = [float(x["samples_per_s"]) for x in rows[args.skip :]]
                rates[name] += sps
                print(
                    f"round {r} {name:10s}: {statistics.median(sps):6.2f} samples/s "
                    f"(median of {len(sps)} steps; run {time.perf_counter() - t:.0f} s)",
                    flush=True,
                )
    a, b = (statistics.median(rates[k]) for k in ("recomputed", "cached"))
    print(f"stem recomputed every step: {a:.2f} samples/s")
    print(f"stem cached per volume:     {b:.2f} samples/s")
    print(f"ratio cached / recomputed:  {b / a:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
