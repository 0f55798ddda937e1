"""Generation speed of the synthetic world (issue target: one 512x512x300 study < 3 s; 1,000
CT-RATE volumes at model resolution in minutes).

    .venv/bin/python bench/synth.py [--studies 3] [--volumes 200]

A study = phantom + DICOM series (300 files) + report + truth, as `radfinder-node synth dicom`
writes it; timed inside one process (interpreter start-up excluded), each study a new seed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from engines.data.ctrate import synthesize_ctrate
    from engines.data.phantoms import generate_phantom
    from radfinder_node.synth import synth_dicom

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--volumes", type=int, default=200)
    args = parser.parse_args()
    shape, spacing = (300, 512, 512), (1.5, 0.7, 0.7)
    with tempfile.TemporaryDirectory(prefix="rf-bench-synth-") as tmp:
        generate_phantom((32, 64, 64), (5.0, 5.0, 5.0), seed=0)  # imports and first-touch
        phantom_s, study_s = [], []
        for i in range(args.studies):
            t0 = time.perf_counter()
            generate_phantom(shape, spacing, seed=1000 + i)
            phantom_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            synth_dicom(Path(tmp) / f"s{i}", 1, 1000 + i, shape, spacing)
            study_s.append(time.perf_counter() - t0)
            shutil.rmtree(Path(tmp) / f"s{i}")
        print(
            f"phantom 512x512x300: median {statistics.median(phantom_s):.2f} s "
            f"(runs {', '.join(f'{s:.2f}' for s in phantom_s)})"
        )
        print(
            f"study 512x512x300 (phantom + 300 DICOM files + report): median "
            f"{statistics.median(study_s):.2f} s (runs {', '.join(f'{s:.2f}' for s in study_s)})"
        )
        t0 = time.perf_counter()
        synthesize_ctrate(
            Path(tmp) / "ct", args.volumes, 7, (64, 128, 128), (3.0, 2.5, 2.5), workers=2
        )
        seconds = time.perf_counter() - t0
        rate = args.volumes / seconds
        print(
            f"CT-RATE 64x128x128: {args.volumes} volumes in {seconds:.1f} s = {rate:.1f}/s, "
            f"1,000 volumes ~ {1000 / rate / 60:.1f} min (2 workers)"
        )


if __name__ == "__main__":
    main()
