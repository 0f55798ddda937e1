"""Why the tiny model's image tower collapsed, measured on a toy grid in seconds.

The 600-step tiny run of 2026-11-29 ended with every volume's image embedding at cosine
0.999996 to every other and SigLIP at exactly its constant-solution value. This script trains
the tiny preset's design on a toy grid (8 depth tokens of 12 mm, 32 x 32 pixels of 10 mm; the
same model space as the tests' MICRO preset) on 8 phantoms for 20 steps, once per configuration
and seed, and prints what tells a learning model from a collapsed one:

- SigLIP after 20 steps against the constant solution ``log B + (B - 1) log(B / (B - 1))``
  (every pair equally similar at the best bias; 3.01 for B = 8);
- ``img_cos``, the mean cosine between different volumes' image embeddings (1.0 = collapsed);
- in-batch image->report top-1 and the prompt AUC over the batch.

Configurations toggle the pieces of the fix: the BN neck (``feature_norm``), the projection
heads' init (``0.02`` as in the paper vs ``fan_in``), the SigLIP bias init (-10 vs
-log(B - 1)), and the learning rate.

    .venv/bin/python bench/collapse.py [--seeds 2] [--steps 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS: dict[str, dict[str, Any]] = {
    "no neck, head 0.02, b -10 (the 11-29 run)": {"neck": "none", "init": "0.02", "bias": -10.0},
    "no neck, head fan_in, b -log7": {"neck": "none", "init": "fan_in"},
    "neck, head 0.02, b -log7": {"neck": "batch", "init": "0.02"},
    "neck, head fan_in, b -10": {"neck": "batch", "init": "fan_in", "bias": -10.0},
    "neck, head fan_in, b -log7 (tiny now)": {"neck": "batch", "init": "fan_in"},
    "neck, head fan_in, b -log7, lr 3e-4": {"neck": "batch", "init": "fan_in", "lr": 3e-4},
}


def micro_preset(cfg: dict[str, Any], batch: int) -> Any:
    from engines.presets import (
        TINY,
        AugmentConfig,
        CNNBackboneConfig,
        CombinerConfig,
        HeadConfig,
        ModelConfig,
        ModelSpaceConfig,
    )

    return dataclasses.replace(
        TINY,
        name="micro",
        space=ModelSpaceConfig(spacing_mm=(4.0, 10.0, 10.0), shape=(24, 32, 32)),
        model=ModelConfig(
            backbone=CNNBackboneConfig(channels=(8, 16, 32), inplane_grid=(2, 2)),
            combiner=CombinerConfig(embed_dim=32, depth=1, num_heads=2, layer_scale_init=0.0),
            head=HeadConfig(hidden_dim=64, bottleneck_dim=32, output_dim=32, init=cfg["init"]),
            text=dataclasses.replace(TINY.model.text, max_length=64),
            feature_norm=cfg["neck"],
        ),
        loss=dataclasses.replace(
            TINY.loss, init_logit_bias=cfg.get("bias", -math.log(batch - 1))
        ),
        optim=dataclasses.replace(TINY.optim, lr=cfg.get("lr", 1e-3), batch_size=batch),
        augment=AugmentConfig(flip_prob=0.0),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()

    import torch

    from engines.datasets import SyntheticDataset
    from engines.model.text import TextTower
    from engines.training import train

    torch.set_num_threads(1)
    tower = TextTower.from_pretrained(None, max_length=64, freeze=True)
    b = args.volumes
    const = math.log(b) + (b - 1) * math.log(b / (b - 1))
    print(f"{args.volumes} phantoms, batch {b}, {args.steps} steps; constant solution {const:.2f}")
    print("| configuration | seed | SigLIP start -> end | img_cos | batch R@1 | prompt AUC |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, cfg in CONFIGS.items():
        preset = micro_preset(cfg, b)
        data = SyntheticDataset(preset.space, b, seed=1, fresh_each_epoch=False,
                                max_shift=(0, 0, 0))
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                train(preset, data, Path(d) / "run", steps=args.steps, seed=seed,
                      progress=False, checkpoint_every=10**6, warmup_steps=2, text_tower=tower)
                log = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").open()]
            tail = log[-3:]

            def mean(k: str, tail: list[dict[str, Any]] = tail) -> float:
                return sum(r[k] for r in tail) / len(tail)

            row = {"config": name, "seed": seed, "siglip_start": log[0]["siglip"],
                   "siglip_end": mean("siglip"), "img_cos": mean("img_cos"),
                   "batch_r1": mean("batch_r1"), "prompt_auc": mean("prompt_auc"),
                   "seconds": time.perf_counter() - t}
            rows.append(row)
            print(f"| {name} | {seed} | {row['siglip_start']:.2f} -> {row['siglip_end']:.2f} | "
                  f"{row['img_cos']:.2f} | {row['batch_r1']:.2f} | {row['prompt_auc']:.2f} |",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps({"constant": const, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
