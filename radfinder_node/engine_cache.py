"""Engines loaded once per worker process, not per job.

Loading a bundle verifies every file's SHA-256 and builds an ONNX Runtime session (or a
TensorRT plan, or moves weights to the GPU): seconds, against milliseconds to run a volume. A
process-wide cache keyed by (bundle directory, runtime, device) keeps one engine per GPU worker;
the lock makes concurrent first requests (embedded worker and a test thread) load it once.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from engines.runtimes import Engine, load_engine

log = logging.getLogger("radfinder_node.engine_cache")

_Key = tuple[str, str, str]
_engines: dict[_Key, Engine] = {}
_lock = threading.Lock()


def get_engine(bundle_path: Path, runtime: str, device: str, *, reload: bool = False) -> Engine:
    """The cached engine, loaded on first use; ``reload`` replaces it (the bundle directory
    was updated in place to a new version)."""
    key = (str(Path(bundle_path).resolve()), runtime, device)
    with _lock:
        engine = _engines.get(key)
        if engine is not None and reload:
            engine.close()
            engine = None
        if engine is None:
            t0 = time.perf_counter()
            engine = load_engine(key[0], runtime, device=device)
            _engines[key] = engine
            log.info(
                "engine loaded",
                extra={
                    "fields": {
                        "bundle": engine.bundle.name,
                        "version": engine.bundle.version,
                        "runtime": type(engine).runtime,
                        "device": device,
                        "load_s": round(time.perf_counter() - t0, 3),
                    }
                },
            )
        return engine


def loaded() -> int:
    """How many engines this process holds (for status and tests)."""
    with _lock:
        return len(_engines)


def clear() -> None:
    """Release every engine (process shutdown, tests that swap bundles in place)."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.close()
