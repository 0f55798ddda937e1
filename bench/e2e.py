"""End to end: storescu's association release -> SR and KOS stored in Orthanc (issue 5, item 8).

One generated 300-slice 512x512 chest series (Explicit VR LE, 1.5 mm slices) is sent by dcmtk's
storescu over one association to a radfinder-node running as in production (embedded SQLite
database and broker, embedded worker, fsync on, the demo bundle on the CPU), whose destination
is a fresh Debian Orthanc. The clock starts when storescu exits (the association is released)
and stops when Orthanc's REST API lists both the SR and the KOS. Each run gets a fresh node and
a fresh Orthanc; the engine is loaded once before the first run, as a running worker holds it.

Stages, from the job record and its timestamps:

  completion  release -> job queued: the quiet period, completion poll, selection, job row
  queue       job queued -> a worker claimed it (the embedded broker's poll)
  engine      engine cache lookup (loading, when cold)
  load        spool files -> volume (pydicom, geometry checks) and the evidence headers
  preprocess  volume -> model space (orientation, resampling, window, crop/pad)
  infer       the ONNX graph
  findings    probabilities and depth distributions -> findings and key slices
  write       SR + KOS built (highdicom) and written durably
  send        results committed -> last object confirmed by Orthanc
  other       the rest: commit, outbox wake-up, Orthanc indexing, our 20 ms REST poll

    .venv/bin/python bench/e2e.py [--slices 300] [--repeat 3] [--quiet-period S]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the Orthanc helper the end-to-end test uses

from orthanc_peer import OrthancPeer  # noqa: E402

from radfinder_node.config import Settings  # noqa: E402

STAGES = (
    "completion",
    "queue",
    "engine",
    "load",
    "preprocess",
    "infer",
    "findings",
    "write",
    "send",
    "other",
)
POLL_S = 0.02


def make_series(directory: Path, slices: int) -> tuple[str, str, int]:
    """A chest series the default selection rules pick; (study UID, series UID, bytes)."""
    from dicom_io.synthetic_study import write_study
    from engines.data.phantoms import basic_chest_phantom

    spacing = (1.5, 0.7, 0.7)
    hu = basic_chest_phantom((slices, 512, 512), spacing, seed=7)
    study = write_study(
        directory,
        hu,
        spacing,
        seed=7,
        accession_number="BENCHE2E",
        patient_id="BENCHE2E",
        patient_name="Bench^EndToEnd",
    )
    size = sum(p.stat().st_size for p in study.chest.paths)
    return study.study_uid, study.chest.series_uid, size


def node_settings(data_dir: Path, args: argparse.Namespace, destination: str) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": None,
        "broker_url": None,
        "host": "127.0.0.1",
        "port": 0,
        "hl7_enabled": False,
        "http_enabled": False,
        "export_nightly": False,
        "destinations": [destination],
        "engine_runtime": args.runtime,
        "engine_device": args.device,
        "log_json": False,
        "log_level": "WARNING",
    }
    if args.quiet_period is not None:
        values["quiet_period_s"] = args.quiet_period
    if args.bundle is not None:
        values["bundle_path"] = args.bundle
    return Settings(**values)


def _finished_job(node: Any, series_uid: str, timeout_s: float) -> Any:
    from sqlalchemy import select

    from radfinder_node.job_models import Job, JobState

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with node.db.transaction() as session:
            job = session.scalar(select(Job).where(Job.series_uid == series_uid))
        if job is not None and job.state == JobState.FAILED:
            raise RuntimeError(f"job failed: {job.error}")
        if job is not None and job.state == JobState.DONE:
            return job
        time.sleep(POLL_S)
    raise RuntimeError(f"no finished job for {series_uid} within {timeout_s} s")


def _job_with_send(node: Any, job_id: int, timeout_s: float = 30.0) -> Any:
    """The job once the outbox recorded its ``send`` timing (it commits right after the peer's
    confirmation, so a few ms after Orthanc lists the objects)."""
    from radfinder_node.job_models import Job

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with node.db.transaction() as session:
            job = session.get_one(Job, job_id)
        if "send" in (job.timings or {}):
            return job
        time.sleep(POLL_S)
    raise RuntimeError("the outbox never recorded the send timing")


def one_run(
    work: Path, series_dir: Path, series_uid: str, args: argparse.Namespace
) -> dict[str, float]:
    from radfinder_node.node import Node
    from radfinder_node.timeutil import as_utc

    orthanc = OrthancPeer(work / "orthanc").start()
    node = Node(node_settings(work / "node", args, orthanc.destination))
    node.start()
    try:
        assert node.port is not None
        os.sync()  # no dirty pages of the previous run are flushed during this one
        time.sleep(0.5)
        proc = subprocess.run(
            [
                "storescu",
                "-aet",
                "BENCH",
                "-aec",
                node.settings.ae_title,
                "+sd",
                "+r",
                "127.0.0.1",
                str(node.port),
                str(series_dir),
            ],
            env={**os.environ, "TCP_NODELAY": "1"},
            capture_output=True,
            text=True,
        )
        t0 = time.perf_counter()
        released = datetime.now(UTC)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {proc.stderr[-500:]}")
        job = _finished_job(node, series_uid, timeout_s=600)
        uids = [o["sop_uid"] for o in (job.result or {}).get("objects", [])]
        if sorted(o["kind"] for o in job.result["objects"]) != ["kos", "sr"]:
            raise RuntimeError(f"the job wrote {uids}, expected an SR and a KOS")
        while not orthanc.has_instances(uids):
            if time.perf_counter() - t0 > 600:
                raise RuntimeError("Orthanc never received the SR and KOS")
            time.sleep(POLL_S)
        total = time.perf_counter() - t0
        job = _job_with_send(node, job.id)
        timings = dict(job.timings)
        out = {k: float(timings.get(k, 0.0)) for k in STAGES if k not in ("completion", "other")}
        out["completion"] = (as_utc(job.queued_at) - released).total_seconds()
        out["other"] = total - sum(out.values())
        out["total"] = total
        out["beyond_quiet"] = total - node.settings.quiet_period_s
        out["quiet_period"] = node.settings.quiet_period_s
        return out
    finally:
        node.stop()
        orthanc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--quiet-period", type=float, help="seconds (default: the node's default setting)"
    )
    parser.add_argument("--runtime", default="onnx")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bundle", type=Path, help="default: the demo bundle")
    args = parser.parse_args()

    from radfinder_node import engine_cache
    from radfinder_node.logs import setup_logging

    setup_logging("WARNING", json_lines=False)
    with tempfile.TemporaryDirectory(prefix="rf-bench-e2e-") as tmp_name:
        tmp = Path(tmp_name)
        t = time.perf_counter()
        _, series_uid, size = make_series(tmp / "series", args.slices)
        print(
            f"series: {args.slices} slices 512x512 int16, {size / 1e6:.1f} MB "
            f"(generated in {time.perf_counter() - t:.1f} s)"
        )
        settings = node_settings(tmp / "probe", args, "X@127.0.0.1:1")
        t = time.perf_counter()
        engine = engine_cache.get_engine(
            settings.bundle_path, settings.engine_runtime, settings.engine_device
        )
        print(
            f"engine: {engine.bundle.name} {engine.bundle.version}, {type(engine).runtime} on "
            f"{settings.engine_device}, loaded once in {time.perf_counter() - t:.2f} s; "
            f"quiet period {settings.quiet_period_s} s; cpus {os.cpu_count()}"
        )
        runs = []
        for i in range(args.repeat):
            r = one_run(tmp / f"run{i}", tmp / "series", series_uid, args)
            runs.append(r)
            print(
                f"run {i + 1}: total {r['total']:.2f} s, beyond the quiet period "
                f"{r['beyond_quiet']:.2f} s"
            )
        cols = [*STAGES, "total", "beyond_quiet"]
        print()
        print(
            f"{'stage (s)':<14}"
            + "".join(f"{'run ' + str(i + 1):>9}" for i in range(len(runs)))
            + f"{'median':>9}"
        )
        for k in cols:
            values = [r[k] for r in runs]
            print(
                f"{k:<14}"
                + "".join(f"{v:>9.2f}" for v in values)
                + f"{statistics.median(values):>9.2f}"
            )
        median = statistics.median(r["beyond_quiet"] for r in runs)
        verdict = "meets" if median <= 10.0 else "misses"
        print(f"\nmedian beyond the quiet period: {median:.2f} s ({verdict} the 10 s target)")


if __name__ == "__main__":
    main()
