"""Frozen-text-tower features of a training set's texts: length-grouped batches against the
order the dataset lists them in.

The tiny preset embeds every report, snippet and prompt once before its first step, inside
its one-hour budget. Batches pad to their longest text, so the order matters: this embeds the
same texts both ways with the same tower and batch size, alternating, and prints the ratio.

    .venv/bin/python bench/text_features.py --data DIR [--n 600] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a CT-RATE-layout folder")
    ap.add_argument("--split", default="train")
    ap.add_argument("--n", type=int, default=600, help="distinct texts to embed")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import statistics

    import torch

    from engines.datasets import open_dataset
    from engines.model.text import TextFeatureCache, TextTower
    from engines.presets import get_preset

    torch.set_num_threads(args.threads)
    preset = get_preset("tiny")
    ds = open_dataset(args.data, preset.space, split=args.split)
    every = ds.texts()  # what training embeds, in its order: reports, then snippets
    texts = every[:: max(1, len(every) // args.n)][: args.n]
    tower = TextTower.from_pretrained(
        preset.model.text.model, max_length=preset.model.text.max_length, freeze=True
    )

    class Unsorted(TextFeatureCache):
        """The cache as it was: batches in the order the texts come."""

        def __call__(self, batch: list[str]) -> torch.Tensor:  # type: ignore[override]
            for i in range(0, len(batch), self.batch_size):
                chunk = batch[i : i + self.batch_size]
                self._features.update(zip(chunk, self.tower.embed(chunk), strict=True))
            return torch.stack([self._features[t] for t in batch])

    print(f"{len(texts)} of {len(every)} distinct texts, characters p50 "
          f"{statistics.median(len(t) for t in texts):.0f}, max {max(map(len, texts))}")
    times: dict[str, list[float]] = {"dataset order": [], "length-grouped": []}
    feats: dict[str, torch.Tensor] = {}
    for r in range(args.rounds):
        for name, cls in (("dataset order", Unsorted), ("length-grouped", TextFeatureCache)):
            cache = cls(tower)
            t0 = time.perf_counter()
            feats[name] = cache(texts)
            times[name].append(time.perf_counter() - t0)
            print(f"round {r} {name}: {times[name][-1]:.1f} s", flush=True)
    diff = float((feats["dataset order"] - feats["length-grouped"]).abs().max())
    a, b = (statistics.median(times[k]) for k in ("dataset order", "length-grouped"))
    print("| texts | dataset order (s) | length-grouped (s) | ratio | max abs diff |")
    print("|---|---|---|---|---|")
    print(f"| {len(texts)} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
