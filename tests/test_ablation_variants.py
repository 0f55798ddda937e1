"""bench/ablation.py's variant list: tuple overrides carry commas of their own."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _load_ablation() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_ablation", ROOT / "bench" / "ablation.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ablation = _load_ablation()


def test_commas_inside_a_tuple_value_do_not_split_the_variant_list() -> None:
    spec = "full,full:lr=3e-4,full:max_windows=(9,10):min_windows=(0,),,clip,"
    assert ablation.split_variants(spec) == [
        "full", "full:lr=3e-4", "full:max_windows=(9,10):min_windows=(0,)", "clip",
    ]


def test_the_gpu_script_default_variants_build_the_presets_they_name() -> None:
    text = (ROOT / "bench" / "device_ablation.sh").read_text()
    default = text.split("${VARIANTS:-", 1)[1].split("}", 1)[0]
    variants = ablation.split_variants(default)
    assert variants[0] == "full" and len(variants) == 6
    built = dict(ablation.variant_preset(v) for v in variants if v.startswith("full:max"))
    bb = built["full"].model.backbone
    assert (bb.stem_max_windows, bb.stem_min_windows, bb.stem_channels) == ((9, 10), (0,), 15)
    name, plain = ablation.variant_preset("full")
    assert name == "full" and plain.model.backbone.stem_channels == 12
