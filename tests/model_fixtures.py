"""A micro RadFinder preset for tests: 24x32x32 voxels, tiny layers, seconds to train."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from engines.presets import (
    TINY,
    AugmentConfig,
    CNNBackboneConfig,
    CombinerConfig,
    HeadConfig,
    ModelConfig,
    ModelSpaceConfig,
    Preset,
)

MICRO: Preset = dataclasses.replace(
    TINY,
    name="micro",
    space=ModelSpaceConfig(spacing_mm=(4.0, 10.0, 10.0), shape=(24, 32, 32)),
    model=ModelConfig(
        backbone=CNNBackboneConfig(channels=(8, 16, 32), inplane_grid=(2, 2)),
        combiner=CombinerConfig(embed_dim=32, depth=1, num_heads=2, layer_scale_init=0.0),
        head=HeadConfig(hidden_dim=64, bottleneck_dim=32, output_dim=32, init="fan_in"),
        text=dataclasses.replace(TINY.model.text, max_length=64),
    ),
    augment=AugmentConfig(flip_prob=0.0),
)


# The tiny preset's options that are off by default, all on (the stem's cell extremes, their
# pooling in the skip, the per-depth and input readouts, the heads' linear path, CLS-only
# embeddings): the graph tests trace them too.
TINY_OPTIONS_ON: tuple[tuple[str, object], ...] = (
    ("model.backbone.stem_max_windows", (9, 10)),
    ("model.backbone.stem_min_windows", (0,)),
    ("model.backbone.stem_skip_extremes", True),
    ("model.combiner.depth_readout", True),
    ("model.combiner.input_readout", True),
    ("model.head.skip", True),
    ("model.embedding_depth_mean", False),
    ("model.prompt_depth_mean_grad", False),
)
