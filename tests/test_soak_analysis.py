"""bench/soak.py's judgement, on synthetic samples: the memory verdict looks at the steady state
after the warm-up (and still catches a leak), and a result object received twice is accepted
only as an identical redelivery after an ambiguous send.

bench/ is scripts, not a package: soak.py is loaded from its path (its imports are the standard
library and bench/ports.py; nothing starts).
"""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_soak", ROOT / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


soak = _load_soak()

RUN_S = 3600.0
SAMPLE_S = 5.0


def samples(rss: Callable[[float], float], run_s: float = RUN_S) -> list[dict[str, Any]]:
    """The sampler's records for one process: every 5 s through the run and a 40 s drain."""
    n = int((run_s + 40.0) / SAMPLE_S) + 1
    return [{"t": i * SAMPLE_S, "rss_mib": {"p": rss(i * SAMPLE_S)}} for i in range(n)]


def warm_up(
    rng: random.Random, start: float, top: float, ramp_s: float
) -> Callable[[float], float]:
    """A start-up ramp with the jitter the node showed (allocations come and go while the
    engine loads), ``start`` -> ``top`` over ``ramp_s``."""

    def rss(t: float) -> float:
        return start + (top - start) * t / ramp_s + rng.gauss(0, 15)

    return rss


def judge(rss: Callable[[float], float], run_s: float = RUN_S) -> tuple[dict[str, Any], bool]:
    trend = soak.rss_trend(samples(rss, run_s), "p", run_s)
    assert trend is not None
    return trend, soak.is_flat(trend)


def test_warm_up_ramp_then_allocator_steps_is_flat() -> None:
    """The one-hour soak's node: 500 -> 624 MiB in under 5 minutes, then +8 MiB in three
    allocator steps over 55 minutes. The old first-10 %-vs-last-10 % check called it GROWING."""
    rng = random.Random(1)
    ramp = warm_up(rng, 500.0, 624.0, 280.0)

    def rss(t: float) -> float:
        if t < 280:
            return ramp(t)
        steps = 4 * (t > 17 * 60) + 2 * (t > 32 * 60) + 2 * (t > 45 * 60)
        return 624.0 + steps + rng.gauss(0, 0.2)

    trend, flat = judge(rss)
    warm, steady = trend["warmup"], trend["steady"]
    assert 300 <= warm["end_s"] <= 0.25 * (RUN_S + 40)
    assert warm["start_mib"] == pytest.approx(500, abs=50)  # one jittery sample
    assert warm["end_mib"] == pytest.approx(624, abs=1)
    assert warm["growth_mib"] == pytest.approx(warm["end_mib"] - warm["start_mib"], abs=0.2)
    assert steady["first_mib"] == pytest.approx(624, abs=1)
    assert steady["delta_mib"] == pytest.approx(8, abs=1)
    assert steady["limit_mib"] == pytest.approx(31.2, abs=0.2)  # 5 % of 624
    assert 0 < steady["slope_mib_per_h"] < 16
    lo, hi = steady["slope_ci95_mib_per_h"]
    assert lo < steady["slope_mib_per_h"] < hi
    assert steady["lag1_autocorrelation"] > 0.5  # steps: neighbouring samples agree
    assert steady["effective_samples"] < steady["samples"] / 5
    assert flat


def test_ramp_longer_than_the_floor_moves_the_warm_up_end() -> None:
    """A ramp that takes 8 minutes (a slower machine): the two-line fit puts the end of the
    warm-up at the ramp's end, not at the 5-minute floor, so the ramp's tail is not read as a
    leak."""
    rng = random.Random(2)

    def rss(t: float) -> float:
        return (500.0 + 124.0 * t / 480 if t < 480 else 624.0) + rng.gauss(0, 1)

    trend, flat = judge(rss)
    assert 440 <= trend["warmup"]["end_s"] <= 560
    assert abs(trend["steady"]["delta_mib"]) < 2
    assert flat


@pytest.mark.parametrize("shape", ["continuous", "steps"])
def test_leak_of_20_mib_per_hour_after_warm_up_is_growing(shape: str) -> None:
    """20 MiB/h after the warm-up, on a 300 MiB process (limit 16 MiB), whether it grows
    smoothly or in 4 MiB allocator steps every 12 minutes."""
    rng = random.Random(3)
    ramp = warm_up(rng, 200.0, 300.0, 280.0)

    def rss(t: float) -> float:
        if t < 280:
            return ramp(t)
        if shape == "continuous":
            return 300.0 + 20.0 * (t - 280) / 3600 + rng.gauss(0, 2)
        return 300.0 + 4.0 * math.floor((t - 280) / 720) + rng.gauss(0, 0.2)

    trend, flat = judge(rss)
    steady = trend["steady"]
    assert steady["slope_mib_per_h"] == pytest.approx(20, abs=3)
    assert steady["slope_ci95_mib_per_h"][0] > 0
    assert steady["projected_mib"] > steady["limit_mib"] == 16.0
    assert not flat


def test_leak_in_a_large_process_is_judged_against_5_percent() -> None:
    """On the node's 624 MiB the limit is 31.2 MiB: 40 MiB/h over an hour exceeds it."""
    rng = random.Random(4)
    ramp = warm_up(rng, 500.0, 624.0, 280.0)

    def rss(t: float) -> float:
        return ramp(t) if t < 280 else 624.0 + 40.0 * (t - 280) / 3600 + rng.gauss(0, 1)

    assert not judge(rss)[1]


def test_late_jump_is_growing_by_the_window_check() -> None:
    """One 40 MiB jump at 50 minutes: the line's slope is under the limit, but the last tenth
    of the steady window against its first says otherwise."""
    rng = random.Random(5)

    def rss(t: float) -> float:
        return 300.0 + (40.0 if t > 50 * 60 else 0.0) + rng.gauss(0, 0.5)

    trend, flat = judge(rss)
    assert trend["steady"]["delta_mib"] > trend["steady"]["limit_mib"]
    assert not flat


@pytest.mark.parametrize("sd", [0.5, 5.0, 20.0])
def test_noise_without_trend_is_flat(sd: float) -> None:
    rng = random.Random(6)
    trend, flat = judge(lambda t: 300.0 + rng.gauss(0, sd))
    lo, hi = trend["steady"]["slope_ci95_mib_per_h"]
    assert lo < 0 < hi
    assert flat


def test_short_run_keeps_a_steady_window_to_describe() -> None:
    """A 4-minute smoke run: the warm-up floor gives way to half the span, so there are still
    steady figures to print (the run is too short for a verdict anyway)."""
    trend, _ = judge(lambda t: 100.0 + t / 60, run_s=240.0)
    assert trend["warmup"]["end_s"] == pytest.approx(140, abs=5)
    assert trend["steady"]["samples"] >= 20


def test_no_steady_window_is_not_flat() -> None:
    assert not soak.is_flat({"warmup": {}, "steady": None})


def test_t_quantile() -> None:
    assert soak.t_quantile_975(1) == 12.706
    assert soak.t_quantile_975(10.9) == 2.228  # rounded down: never narrower
    assert soak.t_quantile_975(30) == pytest.approx(2.042, abs=0.002)
    assert soak.t_quantile_975(1000) == pytest.approx(1.962, abs=0.001)
    assert soak.t_quantile_975(0.5) == math.inf


# ----------------------------------------------------------------------------- duplicates

SENT = {"state": "sent", "attempts": 2, "destination": "PACS@127.0.0.1:1", "last_error": None}
AMBIGUOUS = {"ambiguous": True, "error": "no C-STORE response ...; the peer may have stored it"}
REFUSED = {"ambiguous": False, "error": "could not connect to PACS@127.0.0.1:1"}


def test_identical_redelivery_after_an_ambiguous_send_is_explained() -> None:
    assert soak.unexplained_duplicate(["a", "a"], SENT, [AMBIGUOUS]) is None
    assert soak.unexplained_duplicate(["a"], None, []) is None  # received once: nothing to say


@pytest.mark.parametrize(
    ("hashes", "row", "failures", "why"),
    [
        (["a", "b"], SENT, [AMBIGUOUS], "not byte-identical"),
        (["a", "a"], SENT, [REFUSED], "more copies than ambiguous sends"),
        (["a", "a"], SENT, [], "more copies than ambiguous sends"),
        (["a", "a", "a"], SENT, [AMBIGUOUS], "more copies than ambiguous sends"),
        (["a", "a"], {**SENT, "attempts": 1}, [AMBIGUOUS], "more copies than ambiguous sends"),
        (["a", "a"], {**SENT, "state": "failed"}, [AMBIGUOUS], "outbox row failed"),
        (["a", "a"], None, [AMBIGUOUS], "no outbox row"),
    ],
)
def test_any_other_duplicate_is_an_error(
    hashes: list[str], row: dict[str, Any] | None, failures: list[dict[str, Any]], why: str
) -> None:
    reason = soak.unexplained_duplicate(hashes, row, failures)
    assert reason is not None and why in reason
