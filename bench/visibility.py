"""How visible is each synthetic finding at a preset's resolution, before any model looks?

The issue asks that a weak label be explained by its size at the preset's resolution; this
measures that instead of arguing it. For each label, the same patients (seeds) are drawn twice
on the preset's grid, once with only that finding and once with none: the anatomy, noise and
blur are identical (the generator draws them from the seed), so the difference is the finding
as the scanner at that resolution shows it. Per label it reports

- ``voxels``: model-space voxels the finding changes by at least 3x the patient's noise sigma
  (what a detector at full resolution could see at all);
- ``peak/sigma``: the largest change in HU over the noise sigma (contrast to noise of the best
  voxel, after partial volume and blur);
- ``cells``: stem cells (``stem_pool`` voxels, the tiny preset's 12 x 10 x 10 mm) where some
  channel of the fixed HU-ramp stem moves by more than the between-patient spread of that cell
  and channel in normal patients, and ``cell z``, the largest such move in units of that spread;
- ``region z``: the same on the 4 x 4 x 4 regions a regional histogram sees.

The script first prints the scale a ``cell z`` must be read against: the p99 and p99.9 cell z
a *normal* patient reaches against the other normals. A finding with voxels well above noise
but whose few moved cells stay below that scale is visible to a full-resolution detector and,
at this cell size, indistinguishable from ordinary anatomy; one with ``voxels`` near zero is
below the resolution itself.

    .venv/bin/python bench/visibility.py [--seeds 6] [--normals 16] [--labels 1,4,9]
        [--set model.backbone.stem_pool=(1,2,2)] [--json OUT]

``--set`` changes the tiny preset as ``bench/ablation.py`` variants do, so a finer stem (or
another grid) can be judged for visibility before it costs a training run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engines.data.labels import LABELS  # noqa: E402
from engines.data.phantoms import Phantom, PhantomConfig, generate_phantom  # noqa: E402
from engines.model.stem import HistogramStem  # noqa: E402
from engines.preprocess import to_model_space  # noqa: E402
from engines.presets import CNNBackboneConfig, Preset  # noqa: E402

F32 = npt.NDArray[np.float32]
# Normal patients and finding pairs use disjoint seeds so that the spread is not measured on
# the very anatomy the differences are taken on.
NORMAL_SEED0 = 50_000
PAIR_SEED0 = 60_000
REGIONS = (4, 4, 4)
# Floors of the between-patient spread (see ``spread``), in stem-channel units.
CELL_FLOOR = 0.01
REGION_FLOOR = 0.001


def model_volume(ph: Phantom, preset: Preset) -> torch.Tensor:
    """The phantom in model space, ``[1, 1, Z, Y, X]`` in [0, 1] (the training path)."""
    mi = to_model_space(ph.hu, ph.spacing, ph.affine, config=preset.space)
    return mi.image[None]


def stem_cells(x: torch.Tensor, stem: HistogramStem) -> F32:
    """``[C, z, y, x]`` cell features of the preset's fixed stem."""
    s, b = stem.weights()
    return stem.apply(x, s, b)[0].numpy()


def regions(cells: F32) -> F32:
    """Cell features averaged to ``REGIONS`` regions, ``[C, 4, 4, 4]``."""
    t = torch.from_numpy(cells)[None]
    return np.asarray(F.adaptive_avg_pool3d(t, REGIONS)[0].numpy(), dtype=np.float32)


def spread(stack: F32, floor: float) -> F32:
    """Between-patient standard deviation per feature, floored: a feature that never moves in
    normal patients (air outside the body) would otherwise make any change infinitely
    significant."""
    sd: F32 = np.maximum(stack.std(axis=0), floor).astype(np.float32)
    return sd


def background_z(stack: F32, floor: float, q: float) -> float:
    """The ``q`` quantile of cell z a *normal* patient reaches against the other normals
    (leave one out), median over patients: the scale a finding's cell z must beat to stand out
    from ordinary anatomical variation at the same place."""
    out = []
    for i in range(len(stack)):
        rest = np.delete(stack, i, axis=0)
        z = np.abs(stack[i] - rest.mean(axis=0)) / spread(rest, floor)
        out.append(float(np.quantile(z, q)))
    return float(np.median(out))


def normal_of(
    seeds: list[int], preset: Preset, stem: HistogramStem, config: PhantomConfig
) -> dict[int, tuple[torch.Tensor, F32]]:
    """Finding-free patients (model volume and stem cells) by seed: the normal population of
    the spread, and each pair's finding-free half, drawn once since it is the same patient for
    every label."""
    out = {}
    for seed in seeds:
        x = model_volume(generate_phantom(preset.space.shape, preset.space.spacing_mm,
                                          seed=seed, labels=[], config=config), preset)
        out[seed] = (x, stem_cells(x, stem))
    return out


def measure(
    label: str,
    normal: dict[int, tuple[torch.Tensor, F32]],
    preset: Preset,
    stem: HistogramStem,
    cell_sd: F32,
    region_sd: F32,
    config: PhantomConfig,
) -> dict[str, Any]:
    """Medians over the patients in which the finding was placed (the generator drops one
    whose centre falls outside the field of view, so a pair would then differ by nothing)."""
    hu_range = preset.space.hu_window[1] - preset.space.hu_window[0]
    rows: list[dict[str, float]] = []
    for seed, (xb, cb) in normal.items():
        with_f = generate_phantom(preset.space.shape, preset.space.spacing_mm, seed=seed,
                                  labels=[label], config=config)
        if with_f.finding(label) is None:
            continue  # dropped: centre outside the field of view
        xa = model_volume(with_f, preset)
        sigma = float(with_f.patient["noise_sigma_hu"])
        d_hu = (xa - xb).abs()[0, 0].numpy() * hu_range
        ca = stem_cells(xa, stem)
        dz_cell = np.abs(ca - cb) / cell_sd
        dz_region = np.abs(regions(ca) - regions(cb)) / region_sd
        rows.append({
            "voxels": float((d_hu >= 3 * sigma).sum()),
            "peak_over_sigma": float(d_hu.max() / sigma),
            "cells": float((dz_cell.max(axis=0) > 1.0).sum()),
            "cell_z": float(dz_cell.max()),
            "region_z": float(dz_region.max()),
        })
    if not rows:
        return {"label": label, "n": 0}
    med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
    return {"label": label, "n": len(rows), **med, "per_seed": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a tiny-preset override, as bench/ablation.py variants take")
    ap.add_argument("--seeds", type=int, default=6, help="patients per label")
    ap.add_argument("--normals", type=int, default=16,
                    help="normal patients for the between-patient spread")
    ap.add_argument("--labels", default="", help="label indices (comma separated); all if empty")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from ablation import variant_preset

    _, preset = variant_preset(":".join(["full", *args.set]))
    if not isinstance(preset.model.backbone, CNNBackboneConfig):
        raise SystemExit("this preset has no HU-ramp stem to measure cells with")
    stem = HistogramStem.from_config(preset.model.backbone, preset.space)
    config = PhantomConfig(threads=1)
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    population = normal_of([NORMAL_SEED0 + i for i in range(args.normals)], preset, stem, config)
    normals = [cells for _, cells in population.values()]
    cell_stack = np.stack(normals)
    cell_sd = spread(cell_stack, CELL_FLOOR)
    region_sd = spread(np.stack([regions(c) for c in normals]), REGION_FLOOR)
    cell_mm = tuple(p * s for p, s in zip(stem.pool, preset.space.spacing_mm, strict=True))
    print(f"{args.normals} normal patients in {time.perf_counter() - t0:.0f} s; stem cells "
          f"{stem.pool} voxels = {cell_mm} mm", flush=True)
    bg = {q: background_z(cell_stack, CELL_FLOOR, q) for q in (0.99, 0.999)}
    print(f"a normal patient's cell z against the other normals: p99 {bg[0.99]:.2f}, "
          f"p99.9 {bg[0.999]:.2f} (of {cell_stack[0].size} cell-channels)", flush=True)

    picks = [int(v) for v in args.labels.split(",")] if args.labels else range(len(LABELS))
    normal = normal_of([PAIR_SEED0 + i for i in range(args.seeds)], preset, stem, config)
    out = []
    print("| label | voxels >= 3 sigma | peak / sigma | cells moved > 1 sd | cell z | region z |")
    print("|---|---|---|---|---|---|")
    for li in picks:
        r = measure(LABELS[li], normal, preset, stem, cell_sd, region_sd, config)
        out.append(r)
        if not r["n"]:
            print(f"| {r['label']} | (dropped in every patient) | | | | |", flush=True)
            continue
        print(f"| {r['label']} | {r['voxels']:.0f} | {r['peak_over_sigma']:.1f} | "
              f"{r['cells']:.0f} | {r['cell_z']:.2f} | {r['region_z']:.2f} |", flush=True)
    print(f"medians over {args.seeds} patients per label; {time.perf_counter() - t0:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"set": args.set, "background_cell_z": bg,
                                         "labels": out}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
