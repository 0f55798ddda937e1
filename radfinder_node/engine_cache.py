"""Engines loaded once per worker process, not per job.

Loading a bundle verifies every file's SHA-256 and builds an ONNX Runtime session (or a
TensorRT plan, or moves weights to the GPU): seconds, against milliseconds to run a volume. A
process-wide cache keyed by (configured bundle path, runtime, device) keeps one engine per GPU
worker; the lock makes concurrent first requests (embedded worker and a test thread) load it
once.

Upgrades: the cache remembers which directory each engine came from. When the configured path
now leads elsewhere (a symlink switched to a new version) or a job asks for a version found in
another directory, the engine is replaced in its slot and the old one closed, between jobs, so
a worker never holds two models on its GPU and never needs a restart for a new bundle.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from engines.runtimes import Engine, load_engine

log = logging.getLogger("radfinder_node.engine_cache")

_Key = tuple[str, str, str]
_engines: dict[_Key, tuple[str, Engine]] = {}  # key -> (directory loaded from, engine)
_lock = threading.Lock()


def get_engine(
    bundle_path: Path,
    runtime: str,
    device: str,
    *,
    reload: bool = False,
    source: Path | None = None,
) -> Engine:
    """The cached engine for the bundle configured at ``bundle_path``, loaded on first use.

    It is loaded again (and the old one closed) when ``reload`` is set (the directory was
    updated in place), when ``bundle_path`` now resolves to another directory, or when
    ``source`` names another directory (a version installed beside it, see
    ``radfinder_node.jobs.locate_bundle``).
    """
    key = (str(Path(bundle_path).absolute()), runtime, device)
    directory = str(Path(source if source is not None else bundle_path).resolve())
    with _lock:
        cached = _engines.get(key)
        if cached is not None and (reload or cached[0] != directory):
            _engines.pop(key)
            cached[1].close()
            cached = None
        if cached is not None:
            return cached[1]
        t0 = time.perf_counter()
        engine = load_engine(directory, runtime, device=device)
        _engines[key] = (directory, engine)
        log.info(
            "engine loaded",
            extra={
                "fields": {
                    "bundle": engine.bundle.name,
                    "version": engine.bundle.version,
                    "directory": directory,
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
        engines = [engine for _, engine in _engines.values()]
        _engines.clear()
    for engine in engines:
        engine.close()
