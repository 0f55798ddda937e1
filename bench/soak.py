"""Soak and load: one node under sustained loopback traffic for an hour (issue 7, item 6).

What runs, all on 127.0.0.1:

- ``radfinder-node serve`` as a subprocess, configured as the embedded default runs at a site:
  SQLite, the embedded broker and worker, ONNX Runtime on the CPU, the demo bundle, fsync on,
  JSON logs (at WARNING, so an hour of traffic does not log every instance).
- dcmtk's ``storescp`` (TCP_NODELAY=1, ``+uf``) as the PACS the results go to. Every reception
  becomes its own file, so an object sent twice is seen twice; Orthanc would keep one copy and
  hide exactly the duplicate the accounting looks for.
- ``--senders`` sender processes (pynetdicom SCUs, one association per study) sending whole
  studies (scout, chest series, abdomen series) drawn from a pool of synthetic studies. Every
  UID, accession number and patient id is rewritten per send, so each study is new to the node.
  pynetdicom rather than storescu because it reports each instance's status: the set of
  acknowledged SOP Instance UIDs is exact, and that set is what the accounting checks.
  Starts are paced to ``--rate`` studies/h in total, with +-25 % jitter; a sender that falls
  behind does not burst to catch up.
- one persistent MLLP connection carrying an ORU^R01 per study (``--report-delay`` after the
  study's release; its text cites images of the study) and ``--extra-reports`` unrelated reports
  per study (most of a RIS feed is not chest CT: those stay waiting for a study that never comes).

Sampled every ``--sample-interval`` s: RSS (``/proc/<pid>/status`` VmRSS) and CPU time of the
node (and any child), storescp, every sender and this driver; jobs, outbox and series backlog
from the node's database; the load average (the machine may be shared).

Reported: throughput (studies/h, instances/s, reports/s), end-to-end latency p50/p95 (a study's
association release -> the last of its job's SR and KOS written by storescp, file mtime),
per-stage job timings, RSS of each process over time (its warm-up, found by ``warmup_end``, and
its steady state after it: first vs last tenth, least-squares slope in MiB/h with a 95 %
interval, projected over the run), errors, and the accounting, which sets the exit status:

- every instance a sender got a success status for has an Instance row (by SOP Instance UID);
- every report the node answered AA has a Report row (sending facility, control id);
- every completely sent study has a done job, and every object of every done job arrived at the
  PACS: no loss, and exactly once unless it was redelivered after an ambiguous send (see
  ``account``); nothing arrived that no job wrote;
- in runs of 10 minutes or more, every process's steady-state RSS stayed flat (``is_flat``).

The default load, 240 studies/h of 89 instances (80 chest slices at 256x256, about 12 MB) from
4 senders, is several times a busy site's chest-CT volume and keeps a shared 2-core machine
below saturation, so latency measures the node and not a queue growing without bound.

Writes ``soak.json`` (everything above plus the raw samples and per-study records) and
``soak.png`` (latency and RSS over time, drawn with Pillow) to ``--out``.

    .venv/bin/python bench/soak.py [--duration 3600] [--senders 4] [--rate 240]
                                   [--out bench/out/soak]

A benchmark, not a test: it runs for ``--duration`` plus the drain, and uses the CPU it is given.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import json
import math
import multiprocessing as mp
import os
import queue
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue as MpQueue
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ports import free_port, wait_port  # noqa: E402

if TYPE_CHECKING:
    from radfinder_node.database import Database

ENV = {**os.environ, "TCP_NODELAY": "1"}
NODE_AE = "RADFINDER"
PACS_AE = "PACS"
RIS_FACILITY = "SOAKRIS"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_UID_NAMESPACE = uuid.UUID("6f1d3b8e-5d0a-4c1e-9a51-50a4b0c0a7e1")  # this benchmark's UIDs
MIN_JUDGED_S = 600.0  # shorter runs are mostly start-up: their memory trend says nothing
_SUCCESS_OR_WARNING = frozenset({0x0000, 0xB000, 0xB007, 0xB006})


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 3600.0
    senders: int = 4
    rate_per_h: float = 240.0
    slices: int = 80
    size: int = 256
    pool: int = 6
    seed: int = 7
    quiet_period_s: float = 5.0
    report_delay_s: float = 2.0
    extra_reports: int = 1
    sample_s: float = 5.0
    drain_s: float = 600.0
    out: Path = ROOT / "bench" / "out" / "soak"  # git-ignored
    work_dir: Path | None = None
    keep: bool = False
    bundle: Path | None = None


# --- small helpers -------------------------------------------------------------------------


def new_uid(key: str, old: str) -> str:
    """A ``2.25.`` UID per (send, original UID): distinct for every send, stable within one."""
    return "2.25." + str(uuid.uuid5(_UID_NAMESPACE, key + "\x1f" + old).int)


def rss_mib(pid: int) -> float | None:
    """Resident set size from /proc (psutil is not a dependency); None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None  # a zombie has no VmRSS


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime; the fields after the parenthesised command name, which may hold spaces."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# --- the study pool ------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolStudy:
    """One synthetic study on disk; senders read it per send and rewrite its identity."""

    files: tuple[str, ...]
    report: str
    instances: int


def make_pool(directory: Path, cfg: SoakConfig) -> list[PoolStudy]:
    """Generate (or reuse, when the same parameters made it) the studies senders draw from."""
    params = {"n": cfg.pool, "seed": cfg.seed, "slices": cfg.slices, "size": cfg.size}
    stamp = directory / "pool.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == params):
        from radfinder_node import synth

        shutil.rmtree(directory, ignore_errors=True)
        # 3 mm slices and a 360 mm field of view: a whole chest at a size the CPU keeps up with.
        spacing = (3.0, 360.0 / cfg.size, 360.0 / cfg.size)
        synth.synth_dicom(
            directory,
            cfg.pool,
            cfg.seed,
            (cfg.slices, cfg.size, cfg.size),
            spacing,
            with_scout=True,
            with_non_chest=True,
        )
        stamp.write_text(json.dumps(params))
    pool = []
    for study_dir in sorted(p for p in directory.iterdir() if p.name.startswith("study_")):
        files = tuple(sorted(str(p) for p in (study_dir / "dicom").rglob("*.dcm")))
        pool.append(PoolStudy(files, (study_dir / "report.txt").read_text(), len(files)))
    return pool


# --- senders (each in its own process) -----------------------------------------------------


@dataclass(frozen=True)
class SenderSpec:
    port: int
    run: str
    senders: int
    interval_s: float
    seed: int
    pool: tuple[PoolStudy, ...]


def send_study(
    port: int, calling_ae: str, study: PoolStudy, key: str, accession: str
) -> dict[str, Any]:
    """One study over one association; the record of what the node acknowledged, per instance."""
    from pydicom import dcmread
    from pynetdicom import AE

    started = time.time()
    acked: list[str] = []
    failed: list[list[Any]] = []
    size = 0
    error: str | None = None
    study_uid = ""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CT_IMAGE_STORAGE, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        error = "association rejected or aborted"
    else:
        _tune(assoc)
        try:
            for path in study.files:
                ds = dcmread(path)
                for keyword in (
                    "StudyInstanceUID",
                    "SeriesInstanceUID",
                    "SOPInstanceUID",
                    "FrameOfReferenceUID",
                ):
                    if keyword in ds:
                        setattr(ds, keyword, new_uid(key, str(getattr(ds, keyword))))
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.AccessionNumber = accession
                ds.PatientID = f"P{accession}"
                study_uid = str(ds.StudyInstanceUID)
                sop = str(ds.SOPInstanceUID)
                size += Path(path).stat().st_size
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code in _SUCCESS_OR_WARNING:
                    acked.append(sop)
                else:
                    failed.append([sop, code])
                if not assoc.is_established:
                    error = "association aborted mid-study"
                    break
        except Exception as exc:  # recorded, not raised: the run goes on and counts it
            error = f"{type(exc).__name__}: {exc}"
        finally:
            if assoc.is_established:
                assoc.release()
    return {
        "key": key,
        "sender": calling_ae,
        "study_uid": study_uid,
        "accession": accession,
        "started": started,
        "released": time.time(),
        "instances": study.instances,
        "acked": acked,
        "failed": failed,
        "bytes": size,
        "error": error,
        "report": study.report,
    }


def _tune(assoc: Any) -> None:
    """What a well-configured modality does (dcmtk with TCP_NODELAY=1, as dicom_io.scu does):
    Nagle off and a short reactor poll, else every C-STORE waits ~40 ms for a delayed ACK and
    the senders, not the node, set the pace."""
    dul = getattr(assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = 0.0001
    raw = getattr(getattr(dul, "socket", None), "socket", None)
    if isinstance(raw, socket.socket):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def sender_main(index: int, spec: SenderSpec, out: MpQueue[dict[str, Any]], stop: MpEvent) -> None:
    """Paced loop of one sender; each start is ``interval_s`` +-25 % after the previous one."""
    import logging

    import pydicom
    import pynetdicom  # imported before the first send: the RSS trend starts from a warm process

    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    del pydicom, pynetdicom
    rng = random.Random(spec.seed * 1009 + index)
    next_start = time.time() + rng.uniform(0.0, spec.interval_s)  # senders do not start in step
    n = 0
    while not stop.is_set():
        wait = next_start - time.time()
        if wait > 0 and stop.wait(wait):
            break
        study = spec.pool[(index + n * spec.senders) % len(spec.pool)]
        accession = f"SK{spec.run}{index}{n:06d}"
        out.put(send_study(spec.port, f"SOAK{index}", study, f"{spec.run}/{index}/{n}", accession))
        n += 1
        next_start = max(next_start + spec.interval_s * rng.uniform(0.75, 1.25), time.time())


# --- HL7: one persistent MLLP connection ---------------------------------------------------


class ReportFeeder(threading.Thread):
    """Sends ORU^R01 messages when due, one at a time (next after the ACK), reconnecting and
    resending the same message (same control id: the node keeps one row) when the link drops."""

    def __init__(self, port: int) -> None:
        super().__init__(name="hl7-feeder", daemon=True)
        self.port = port
        self.results: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self._heap: list[tuple[float, int, bytes, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self._seq = 0
        self._busy = False
        self._stopping = False
        self._sock: socket.socket | None = None

    def submit(self, due: float, message: bytes, meta: dict[str, Any]) -> None:
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, message, meta))
            self._cond.notify()

    def idle(self) -> bool:
        with self._cond:
            return not self._heap and not self._busy

    def drain(self, timeout: float) -> bool:
        """Send everything queued (due or not) and stop; False if time ran out."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._heap = [(0.0, seq, m, meta) for _, seq, m, meta in self._heap]
            heapq.heapify(self._heap)
            self._cond.notify()
            while (self._heap or self._busy) and time.monotonic() < deadline:
                self._cond.wait(0.2)
            done = not self._heap and not self._busy
            self._stopping = True
            self._cond.notify()
        self.join(timeout=10)
        return done

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._heap or self._heap[0][0] > time.time()):
                    delay = self._heap[0][0] - time.time() if self._heap else 1.0
                    self._cond.wait(max(0.01, min(delay, 1.0)))
                if self._stopping:
                    break
                _, _, message, meta = heapq.heappop(self._heap)
                self._busy = True
            try:
                self.results.append({**meta, **self._send(message)})
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        if self._sock is not None:
            self._sock.close()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=120)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _send(self, message: bytes) -> dict[str, Any]:
        from reports.hl7_writer import mllp_frame

        for attempt in range(1, 6):
            try:
                if self._sock is None:
                    self._sock = self._connect()
                t0 = time.perf_counter()
                self._sock.sendall(mllp_frame(message))
                buf = b""
                while b"\x1c\r" not in buf:
                    chunk = self._sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("the node closed the MLLP connection")
                    buf += chunk
                rtt = time.perf_counter() - t0
                ack = buf.split(b"\x1c\r", 1)[0]
                code = next(
                    (s.split(b"|")[1].decode() for s in ack.split(b"\r") if s.startswith(b"MSA|")),
                    "none",
                )
                if code != "AA":
                    self.errors.append(
                        {
                            "t": time.time(),
                            "kind": "hl7 ack",
                            "code": code,
                            "ack": ack[-300:].decode(errors="replace"),
                        }
                    )
                return {"code": code, "rtt_s": rtt, "acked_at": time.time(), "attempts": attempt}
            except OSError as exc:
                self.errors.append({"t": time.time(), "kind": "hl7 connection", "error": str(exc)})
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                time.sleep(1.0)
        return {"code": "unsent", "rtt_s": None, "acked_at": time.time(), "attempts": 5}


def oru_for(record: dict[str, Any], control_id: str, *, extra: int | None) -> bytes:
    """The study's report, or (``extra``) an unrelated one whose study never arrives."""
    from reports.hl7_writer import oru_r01

    accession = record["accession"] if extra is None else f"{record['accession']}X{extra}"
    return oru_r01(
        record["report"],
        accession_number=accession,
        patient_id=f"P{record['accession']}",
        patient_name="Soak^Patient",
        study_uid=record["study_uid"] if extra is None else None,
        placer_order=f"PO{accession}",
        filler_order=None,
        observation_datetime=datetime.now(UTC).replace(microsecond=0),
        sending_facility=RIS_FACILITY,
        control_id=control_id,
    )


# --- the PACS: storescp and a watcher of what it wrote -------------------------------------


@dataclass(frozen=True)
class Reception:
    sop_uid: str
    study_uid: str
    sop_class: str
    arrived: float  # file mtime: when storescp finished writing it
    name: str


class PacsWatcher(threading.Thread):
    """Indexes storescp's files as they settle (mtime older than ``settle_s``)."""

    def __init__(self, directory: Path, period_s: float = 0.5, settle_s: float = 1.0) -> None:
        super().__init__(name="pacs-watcher", daemon=True)
        self.directory = directory
        self.period_s = period_s
        self.settle_s = settle_s
        self.receptions: list[Reception] = []
        self.unreadable: dict[str, str] = {}
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.stop_event = threading.Event()

    def scan(self, settle_s: float) -> None:
        from pydicom import dcmread

        now = time.time()
        with self._lock:
            for entry in os.scandir(self.directory):
                if entry.name in self._seen or not entry.is_file():
                    continue
                mtime = entry.stat().st_mtime
                if now - mtime < settle_s:
                    continue
                try:
                    ds = dcmread(
                        entry.path,
                        stop_before_pixels=True,
                        specific_tags=["SOPInstanceUID", "StudyInstanceUID", "SOPClassUID"],
                    )
                    reception = Reception(
                        str(ds.SOPInstanceUID),
                        str(ds.StudyInstanceUID),
                        str(ds.SOPClassUID),
                        mtime,
                        entry.name,
                    )
                except Exception as exc:
                    self.unreadable[entry.name] = f"{type(exc).__name__}: {exc}"
                    continue
                self.unreadable.pop(entry.name, None)
                self._seen.add(entry.name)
                self.receptions.append(reception)

    def by_sop(self) -> dict[str, list[Reception]]:
        with self._lock:
            out: dict[str, list[Reception]] = defaultdict(list)
            for r in self.receptions:
                out[r.sop_uid].append(r)
            return out

    def run(self) -> None:
        while not self.stop_event.wait(self.period_s):
            self.scan(self.settle_s)


class Storescp:
    def __init__(self, workdir: Path) -> None:
        self.directory = workdir / "pacs"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def destination(self) -> str:
        return f"{PACS_AE}@127.0.0.1:{self.port}"

    def start(self) -> None:
        with (self.directory.parent / "storescp.log").open("ab") as log:
            self.proc = subprocess.Popen(
                ["storescp", "-aet", PACS_AE, "-od", str(self.directory), "+uf", str(self.port)],
                env=ENV,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_port(self.port, 30, lambda: self.proc is not None and self.proc.poll() is None)

    def stop(self) -> int | None:
        return _terminate(self.proc, 30)


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# --- the node ------------------------------------------------------------------------------


class NodeProcess:
    """``radfinder-node serve`` on free loopback ports, with nothing inherited from a site's
    configuration (no RADFINDER_* variable, no ./radfinder.toml)."""

    def __init__(self, workdir: Path, cfg: SoakConfig, destination: str) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "node"
        self.log_path = workdir / "node.log"
        self.cfg = cfg
        self.destination = destination
        self.port, self.hl7_port, self.http_port = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def database_url(self) -> str:
        return f"sqlite:///{(self.data_dir / 'radfinder.db').resolve()}"

    def start(self) -> None:
        env = {k: v for k, v in ENV.items() if not k.startswith("RADFINDER_")}
        env.update(
            {
                "RADFINDER_HOST": "127.0.0.1",
                "RADFINDER_ENGINE_RUNTIME": "onnx",
                "RADFINDER_ENGINE_DEVICE": "cpu",
                "RADFINDER_QUIET_PERIOD_S": str(self.cfg.quiet_period_s),
                "RADFINDER_EXPORT_NIGHTLY": "false",  # a 02:00 export is not this load
                "RADFINDER_LOG_LEVEL": "WARNING",
                "RADFINDER_LOG_JSON": "true",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
            }
        )
        if self.cfg.bundle is not None:
            env["RADFINDER_BUNDLE_PATH"] = str(self.cfg.bundle.resolve())
        script = Path(sys.executable).with_name("radfinder-node")
        command = (
            [str(script)] if script.is_file() else [sys.executable, "-m", "radfinder_node.cli"]
        )
        with self.log_path.open("ab") as log:  # the child holds its own descriptor
            self.proc = subprocess.Popen(
                [
                    *command,
                    "serve",
                    "--data-dir",
                    str(self.data_dir),
                    "--port",
                    str(self.port),
                    "--ae-title",
                    NODE_AE,
                    "--hl7-port",
                    str(self.hl7_port),
                    "--http-port",
                    str(self.http_port),
                    "--destination",
                    self.destination,
                ],
                env=env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        alive = self.alive
        wait_port(self.port, 180, alive)
        wait_port(self.hl7_port, 60, alive)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> int | None:
        return _terminate(self.proc, 120)

    def failed_sends(self) -> dict[str, list[dict[str, Any]]]:
        """The outbox's failed C-STORE attempts by SOP Instance UID, from its log events (the
        row keeps only the last error, and a later success clears it): each with its error and
        whether it was ambiguous (sent, no response: the peer may have stored it)."""
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        if not self.log_path.is_file():
            return out
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(event, dict) or event.get("logger") != "radfinder_node.outbox":
                continue
            if event.get("event") not in ("send will be retried", "object failed"):
                continue
            out[str(event.get("sop_uid"))].append(
                {
                    "ts": event.get("ts"),
                    "attempt": event.get("attempts"),
                    "ambiguous": event.get("ambiguous") is True,
                    "error": event.get("error"),
                }
            )
        return out

    def log_summary(self, keep: int = 20) -> dict[str, Any]:
        """Lines by level and the first error and warning events (JSON lines; anything else,
        a traceback printed outside logging, counts as an error too)."""
        levels: Counter[str] = Counter()
        errors: list[dict[str, Any]] = []
        warnings: Counter[str] = Counter()
        if not self.log_path.is_file():
            return {"levels": {}, "errors": [], "warnings": {}}
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
                level = str(event.get("level", "?"))
            except (json.JSONDecodeError, AttributeError):
                event, level = {"event": line[:300]}, "unstructured"
            levels[level] += 1
            if level in ("error", "critical", "unstructured") and len(errors) < keep:
                errors.append({k: str(v)[:400] for k, v in event.items() if k != "exc"})
            elif level == "warning":
                warnings[str(event.get("event"))] += 1
        return {"levels": dict(levels), "errors": errors, "warnings": dict(warnings)}


# --- the node's database, read by the driver ------------------------------------------------


def open_db(url: str) -> Database:
    from radfinder_node.database import Database

    return Database(url, auto_migrate=False)


def backlog(db: Database) -> dict[str, int]:
    """What the node still has to do: series not decided, jobs not finished, objects unsent."""
    from sqlalchemy import func, select

    from radfinder_node.job_models import Job, OutboundObject
    from radfinder_node.models import Instance, Series
    from radfinder_node.report_models import Report

    with db.transaction() as s:
        series = dict(s.execute(select(Series.state, func.count()).group_by(Series.state)).all())
        jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        outbox = dict(
            s.execute(
                select(OutboundObject.state, func.count()).group_by(OutboundObject.state)
            ).all()
        )
        instances = s.scalar(select(func.count()).select_from(Instance)) or 0
        reports = dict(s.execute(select(Report.state, func.count()).group_by(Report.state)).all())
    return {
        "instances": int(instances),
        **{f"series_{k.value}": int(v) for k, v in series.items()},
        **{f"jobs_{k.value}": int(v) for k, v in jobs.items()},
        **{f"outbox_{k.value}": int(v) for k, v in outbox.items()},
        **{f"reports_{k.value}": int(v) for k, v in reports.items()},
    }


def settled(b: dict[str, int], studies: int) -> bool:
    """Every complete study has its job finished and sent, and nothing is in between."""
    finished = b.get("jobs_done", 0) + b.get("jobs_failed", 0)
    busy = sum(
        b.get(k, 0)
        for k in (
            "series_receiving",
            "series_complete",
            "jobs_queued",
            "jobs_running",
            "outbox_pending",
        )
    )
    return busy == 0 and finished >= studies


@dataclass
class JobRow:
    id: int
    state: str
    attempts: int
    error: str | None
    timings: dict[str, float]
    objects: list[dict[str, Any]]
    study_uid: str


def job_rows(db: Database) -> list[JobRow]:
    from sqlalchemy import select

    from radfinder_node.job_models import Job
    from radfinder_node.models import Series, Study

    with db.transaction() as s:
        rows = s.execute(
            select(
                Job.id, Job.state, Job.attempts, Job.error, Job.timings, Job.result, Study.study_uid
            )
            .join(Series, Job.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
        ).all()
    return [
        JobRow(
            r[0],
            str(r[1].value),
            r[2],
            r[3],
            dict(r[4] or {}),
            list((r[5] or {}).get("objects", [])),
            r[6],
        )
        for r in rows
    ]


def outbox_rows(db: Database) -> dict[str, dict[str, Any]]:
    """The node's outbox rows by SOP Instance UID (this soak has one destination)."""
    from sqlalchemy import select

    from radfinder_node.job_models import OutboundObject

    with db.transaction() as s:
        rows = s.execute(
            select(
                OutboundObject.sop_uid,
                OutboundObject.destination,
                OutboundObject.state,
                OutboundObject.attempts,
                OutboundObject.last_error,
            )
        ).all()
    return {
        str(r[0]): {
            "destination": r[1],
            "state": str(r[2].value),
            "attempts": int(r[3]),
            "last_error": r[4],
        }
        for r in rows
    }


# --- sampling ------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """RSS and CPU of every process, the node's backlog and the load average, every period."""

    def __init__(
        self, period_s: float, pids: Callable[[], dict[str, int]], db: Database, t0: float
    ) -> None:
        super().__init__(name="sampler", daemon=True)
        self.period_s = period_s
        self.pids = pids
        self.db = db
        self.t0 = t0
        self.samples: list[dict[str, Any]] = []
        self.stop_event = threading.Event()
        self.db_errors = 0

    def sample(self) -> dict[str, Any]:
        rss: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for name, pid in self.pids().items():
            value, seconds = rss_mib(pid), cpu_seconds(pid)
            if value is not None and seconds is not None:
                rss[name], cpu[name] = round(value, 2), round(seconds, 2)
            if name == "node":
                kids = [k for k in descendants(pid) if rss_mib(k) is not None]
                if kids:
                    rss["node children"] = round(sum(rss_mib(k) or 0.0 for k in kids), 2)
                    cpu["node children"] = round(sum(cpu_seconds(k) or 0.0 for k in kids), 2)
        try:
            db = backlog(self.db)
        except Exception:  # a locked or busy database must not stop the sampling
            self.db_errors += 1
            db = {}
        load1 = float(Path("/proc/loadavg").read_text().split()[0])
        sample = {
            "t": round(time.time() - self.t0, 2),
            "rss_mib": rss,
            "cpu_s": cpu,
            "db": db,
            "load1": load1,
        }
        self.samples.append(sample)
        return sample

    def run(self) -> None:
        while not self.stop_event.wait(self.period_s):
            self.sample()


# --- analysis ------------------------------------------------------------------------------


# Memory: a process's RSS climbs while it warms up (the engine loads, allocator arenas and caches
# fill on first use; the node went 500 -> 624 MiB in the first ~5 minutes of the one-hour soak and
# then moved 8 MiB in 55 minutes), so a leak is judged on the steady state after the warm-up only.
WARMUP_FLOOR_S = 300.0  # the warm-up observed at 240 studies/h on 2 cores
WARMUP_FLOOR_FRACTION = 0.10  # and never less than the old head window of 10 % of the run
WARMUP_CAP_FRACTION = 0.25  # at most a quarter: three quarters of the run stay judged
KNEE_TOLERANCE = 0.05  # break points within 5 % of the best two-line fit count as equally good
GROWTH_LIMIT_MIB = 16.0  # below this, growth is allocator noise ...
GROWTH_LIMIT_FRACTION = 0.05  # ... or 5 % of the steady-state RSS, whichever is larger
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # df 1..10


def t_quantile_975(df: float) -> float:
    """Student's t 97.5 % point (two-sided 95 %); table up to 10 degrees of freedom (rounded
    down, so never narrower), then the Cornish-Fisher expansion, within 0.1 % from there."""
    if df < 1:
        return math.inf
    if df < 11:
        return _T975[int(df) - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _line(points: Sequence[tuple[float, float]]) -> tuple[float, float, list[float]] | None:
    """Least-squares (slope per second, intercept at the mean time, residuals); None if the
    times do not spread."""
    if len(points) < 2:
        return None
    mx = statistics.fmean(p[0] for p in points)
    my = statistics.fmean(p[1] for p in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx <= 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my, [y - (my + slope * (x - mx)) for x, y in points]


def _sse(points: Sequence[tuple[float, float]]) -> float:
    fit = _line(points) if len(points) >= 3 else None
    return 0.0 if fit is None else sum(r * r for r in fit[2])


def warmup_end(points: Sequence[tuple[float, float]]) -> float:
    """When the warm-up ends, as a time of ``points`` (sorted (seconds, MiB)).

    Not before ``WARMUP_FLOOR_S`` nor 10 % of the span (the ramp seen in the one-hour soak),
    not after 25 % (a leak must not hide in a long "warm-up"; a ramp still going then is judged),
    and never beyond half the span, so a short run keeps a steady window to describe. Between
    those bounds the data decide: the series is fitted as two straight lines broken at each
    sample time, and the warm-up ends at the earliest break whose fit is within 5 % of the best.
    A ramp that is over by the floor leaves every break about equally good, so the floor wins;
    one that runs longer makes early breaks fit badly (its tail sits in the steady line), so the
    break moves to where the ramp ends. A steady leak fits one line wherever the break is, and
    the floor wins again.
    """
    t_first, t_last = points[0][0], points[-1][0]
    span = t_last - t_first
    floor = min(max(WARMUP_FLOOR_S, WARMUP_FLOOR_FRACTION * span), 0.5 * span)
    cap = max(floor, WARMUP_CAP_FRACTION * span)
    candidates = [i for i, (t, _) in enumerate(points) if floor <= t - t_first <= cap]
    if len(candidates) < 2:
        return t_first + floor
    fits = [(i, _sse(points[:i]) + _sse(points[i:])) for i in candidates]
    best = min(sse for _, sse in fits)
    first_good = next(i for i, sse in fits if sse <= best * (1 + KNEE_TOLERANCE))
    return points[first_good][0]


def steady_state(points: Sequence[tuple[float, float]], run_s: float) -> dict[str, Any] | None:
    """Flatness figures of a steady window of (seconds, MiB) points; None if too few.

    The slope's 95 % interval allows for RSS samples 5 s apart not being independent (memory
    moves in steps, so neighbouring residuals agree): the variance is inflated by
    (1 + r) / (1 - r), r the lag-1 autocorrelation of the residuals, and the degrees of freedom
    shrink to the effective sample count n (1 - r) / (1 + r). ``projected_mib`` is the slope
    over the whole run (``run_s``); the limit is max(16 MiB, 5 % of the steady-state RSS).
    """
    if len(points) < 3:
        return None
    fit = _line(points)
    if fit is None:
        return None
    slope_s, _, residuals = fit
    n = len(points)
    t_from, t_to = points[0][0], points[-1][0]
    width = 0.1 * (t_to - t_from)
    first = statistics.fmean(v for t, v in points if t <= t_from + width)
    last = statistics.fmean(v for t, v in points if t >= t_to - width)
    sse = sum(r * r for r in residuals)
    lag = sum(a * b for a, b in itertools.pairwise(residuals))
    r1 = max(0.0, min(lag / sse, 0.999)) if sse > 0 else 0.0
    n_eff = max(3.0, min(float(n), n * (1 - r1) / (1 + r1)))
    mx = statistics.fmean(t for t, _ in points)
    sxx = sum((t - mx) ** 2 for t, _ in points)
    se = math.sqrt(sse / (n - 2) / sxx * (1 + r1) / (1 - r1)) * 3600.0
    half = t_quantile_975(n_eff - 2) * se
    slope = slope_s * 3600.0
    run_h = run_s / 3600.0
    return {
        "from_s": round(t_from, 1),
        "to_s": round(t_to, 1),
        "samples": n,
        "first_mib": round(first, 1),
        "last_mib": round(last, 1),
        "delta_mib": round(last - first, 1),
        "max_mib": round(max(v for _, v in points), 1),
        "slope_mib_per_h": round(slope, 2),
        "slope_ci95_mib_per_h": [round(slope - half, 2), round(slope + half, 2)],
        "lag1_autocorrelation": round(r1, 3),
        "effective_samples": round(n_eff, 1),
        "projected_mib": round(slope * run_h, 1),
        "projected_upper_mib": round((slope + half) * run_h, 1),
        "limit_mib": round(max(GROWTH_LIMIT_MIB, GROWTH_LIMIT_FRACTION * first), 1),
    }


def rss_trend(samples: list[dict[str, Any]], name: str, run_s: float) -> dict[str, Any] | None:
    """One process's RSS: its warm-up (start, where it ended, how much it grew) and its steady
    state (see ``steady_state``), judged separately; ``run_s`` is the run the slope is
    projected over."""
    points = sorted(
        (float(s["t"]), float(s["rss_mib"][name])) for s in samples if name in s["rss_mib"]
    )
    if len(points) < 2:
        return None
    end = warmup_end(points)
    warm = [v for t, v in points if t < end] or [points[0][1]]
    steady = steady_state([(t, v) for t, v in points if t >= end], run_s)
    end_mib = steady["first_mib"] if steady is not None else points[-1][1]
    return {
        "samples": len(points),
        "max_mib": round(max(v for _, v in points), 1),
        "warmup": {
            "end_s": round(end, 1),
            "start_mib": round(points[0][1], 1),
            "end_mib": round(end_mib, 1),
            "growth_mib": round(end_mib - points[0][1], 1),
            "max_mib": round(max(warm), 1),
        },
        "steady": steady,
    }


def is_flat(trend: dict[str, Any]) -> bool:
    """Flat unless the steady state grew beyond its limit, by either measure:

    - the least-squares slope projected over the run exceeds the limit, and its 95 % interval
      lies above zero (growth that the noise cannot explain); a few allocator steps give a wide
      interval, but the projection of the slope itself still has to stay under the limit;
    - the mean of the last tenth of the steady window exceeds that of its first tenth by more
      than the limit (a model-free check: a late jump is growth whatever the line says).

    Without a steady window there is nothing to judge: not flat.
    """
    steady = trend.get("steady")
    if steady is None:
        return False
    limit = float(steady["limit_mib"])
    slope_grows = steady["projected_mib"] > limit and steady["slope_ci95_mib_per_h"][0] > 0
    return not (slope_grows or steady["delta_mib"] > limit)


def cpu_share(samples: list[dict[str, Any]], name: str) -> float | None:
    points = [(float(s["t"]), float(s["cpu_s"][name])) for s in samples if name in s["cpu_s"]]
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    return round(100 * (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0]), 1)


def unexplained_duplicate(
    hashes: Sequence[str], row: dict[str, Any] | None, failures: Sequence[dict[str, Any]]
) -> str | None:
    """Why an object the PACS received ``len(hashes)`` times is an error; None if it is the
    outbox's at-least-once delivery at work: every copy byte-identical, the row sent, and
    enough ambiguous attempts (sent, no response in time: the peer may have stored it) logged
    for it that each extra copy has one, with an attempt for every copy. Anything else (copies
    that differ, a resend after a refused or unreachable try, more copies than tries) is not
    explained by the delivery contract."""
    copies = len(hashes)
    if copies < 2:
        return None
    if len(set(hashes)) != 1:
        return f"{copies} copies, not byte-identical"
    if row is None:
        return "no outbox row"
    if row["state"] != "sent":
        return f"outbox row {row['state']}"
    ambiguous = sum(1 for f in failures if f["ambiguous"])
    if ambiguous < copies - 1 or row["attempts"] < copies:
        return (
            f"{copies} copies, {row['attempts']} attempts, {ambiguous} of them ambiguous: "
            "more copies than ambiguous sends explain"
        )
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def account(
    db: Database,
    studies: list[dict[str, Any]],
    reports: list[dict[str, Any]],
    by_sop: dict[str, list[Reception]],
    jobs: list[JobRow],
    pacs_dir: Path,
    failed_sends: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """The checks of "nothing is lost": what peers were told is stored, is stored.

    A result object received more than once is the outbox's at-least-once contract when the
    copies are identical and an ambiguous send precedes the success (``unexplained_duplicate``):
    counted as ``result_objects_redelivered_after_timeout`` and listed, not an error. Any other
    duplicate fails the run; what counts as loss does not change.
    """
    from sqlalchemy import func, select

    from radfinder_node.models import Instance, QuarantinedObject
    from radfinder_node.report_models import Report

    with db.transaction() as s:
        stored = set(s.scalars(select(Instance.sop_uid)))
        report_keys = {
            (str(r[0]), str(r[1]))
            for r in s.execute(select(Report.sending_facility, Report.control_id))
        }
        quarantined = s.scalar(select(func.count()).select_from(QuarantinedObject)) or 0
        report_states = {
            str(r[0]): str(r[1].value)
            for r in s.execute(
                select(Report.control_id, Report.state).where(
                    Report.sending_facility == RIS_FACILITY
                )
            )
        }
    acked = [sop for st in studies for sop in st["acked"]]
    missing_instances = [sop for sop in acked if sop not in stored]
    aa = [r for r in reports if r["code"] == "AA"]
    missing_reports = [
        r["control_id"] for r in aa if (RIS_FACILITY, r["control_id"]) not in report_keys
    ]
    by_study = {j.study_uid: j for j in jobs}
    complete = [st for st in studies if not st["failed"] and st["error"] is None]
    no_job = [st["study_uid"] for st in complete if st["study_uid"] not in by_study]
    not_done = [
        st["study_uid"]
        for st in complete
        if st["study_uid"] in by_study and by_study[st["study_uid"]].state != "done"
    ]
    expected: set[str] = set()
    lost_objects: list[str] = []
    duplicated: list[dict[str, Any]] = []
    redelivered: list[dict[str, Any]] = []
    rows = outbox_rows(db)
    for job in jobs:
        if job.state != "done":
            continue
        for obj in job.objects:
            sop = obj["sop_uid"]
            expected.add(sop)
            copies = by_sop.get(sop, [])
            if not copies:
                lost_objects.append(sop)
            elif len(copies) > 1:
                hashes = [_sha256(pacs_dir / c.name) for c in copies]
                why = unexplained_duplicate(hashes, rows.get(sop), failed_sends.get(sop, []))
                record = {
                    "sop_uid": sop,
                    "kind": obj.get("kind"),
                    "copies": len(copies),
                    "files": [c.name for c in copies],
                    "sha256": sorted(set(hashes)),
                    "outbox_attempts": (rows.get(sop) or {}).get("attempts"),
                    "failed_attempts": failed_sends.get(sop, []),
                }
                if why is None:
                    redelivered.append(record)
                else:
                    duplicated.append({**record, "why": why})
    unexpected = sorted(set(by_sop) - expected)
    ok = not (
        missing_instances
        or missing_reports
        or no_job
        or not_done
        or lost_objects
        or duplicated
        or unexpected
    )
    return {
        "ok": ok,
        "acknowledged_instances": len(acked),
        "acknowledged_instances_missing_in_db": len(missing_instances),
        "aa_reports": len(aa),
        "aa_reports_missing_in_db": len(missing_reports),
        "complete_studies": len(complete),
        "complete_studies_without_job": len(no_job),
        "complete_studies_job_not_done": len(not_done),
        "done_jobs": sum(1 for j in jobs if j.state == "done"),
        "result_objects_expected": len(expected),
        "result_objects_received_once": (
            len(expected) - len(lost_objects) - len(duplicated) - len(redelivered)
        ),
        "result_objects_lost": len(lost_objects),
        "result_objects_duplicated": len(duplicated),
        "result_objects_redelivered_after_timeout": len(redelivered),
        "redelivered_after_timeout": redelivered,
        "unexpected_objects_at_pacs": len(unexpected),
        "quarantined": int(quarantined),
        # not part of "ok": linking is not loss, but a report of a received study should link
        "study_reports_linked": sum(
            1 for r in aa if r["kind"] == "study" and report_states.get(r["control_id"]) == "linked"
        ),
        "study_reports": sum(1 for r in aa if r["kind"] == "study"),
        "extra_reports_waiting": sum(
            1
            for r in aa
            if r["kind"] == "extra" and report_states.get(r["control_id"]) == "waiting"
        ),
        "extra_reports": sum(1 for r in aa if r["kind"] == "extra"),
        "examples": {
            "missing_instances": missing_instances[:5],
            "missing_reports": missing_reports[:5],
            "no_job": no_job[:5],
            "not_done": not_done[:5],
            "lost_objects": lost_objects[:5],
            "duplicated": duplicated[:5],  # each with why it is not a redelivery
            "unexpected": unexpected[:5],
        },
    }


def latencies(
    studies: list[dict[str, Any]], jobs: list[JobRow], by_sop: dict[str, list[Reception]], t0: float
) -> list[dict[str, Any]]:
    """Per study: release -> the last of its job's objects written at the PACS (first copy)."""
    by_study = {j.study_uid: j for j in jobs}
    out = []
    for st in studies:
        job = by_study.get(st["study_uid"])
        if job is None or job.state != "done" or not job.objects:
            continue
        arrivals = [
            min(r.arrived for r in by_sop[o["sop_uid"]])
            for o in job.objects
            if by_sop.get(o["sop_uid"])
        ]
        if len(arrivals) != len(job.objects):
            continue
        out.append(
            {
                "study_uid": st["study_uid"],
                "warmup": st.get("warmup", False),
                "released_t": round(st["released"] - t0, 3),
                "latency_s": round(max(arrivals) - st["released"], 3),
                "objects": sorted(o["kind"] for o in job.objects),
                "timings": job.timings,
            }
        )
    return out


# --- the plot (Pillow: matplotlib is not a dependency) --------------------------------------

PALETTE = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#17becf",
    "#bcbd22",
]


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = max(span, 1e-9) / ticks
    base = 10.0 ** math.floor(math.log10(raw))
    return next(m * base for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * base >= raw)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _panel(
    draw: Any,
    box: tuple[int, int, int, int],
    series: dict[str, list[tuple[float, float]]],
    *,
    title: str,
    ylabel: str,
    x_max: float,
    scatter: Iterable[str] = (),
) -> None:
    left, top, right, bottom = box
    font, small = _font(16), _font(13)
    values = [y for pts in series.values() for _, y in pts]
    y_max = max(values) * 1.1 if values and max(values) > 0 else 1.0
    x_max = max(x_max, 1e-6)

    def xy(x: float, y: float) -> tuple[float, float]:
        return (left + (right - left) * x / x_max, bottom - (bottom - top) * y / y_max)

    draw.text((left, top - 26), title, fill="black", font=font)
    for axis_step, horizontal in ((_nice_step(y_max), True), (_nice_step(x_max), False)):
        v = 0.0
        while v <= (y_max if horizontal else x_max) + 1e-9:
            if horizontal:
                _, py = xy(0, v)
                draw.line([(left, py), (right, py)], fill="#e6e6e6")
                draw.text((left - 8, py), f"{v:g}", fill="black", font=small, anchor="rm")
            else:
                px, _ = xy(v, 0)
                draw.line([(px, top), (px, bottom)], fill="#e6e6e6")
                draw.text((px, bottom + 6), f"{v:g}", fill="black", font=small, anchor="mt")
            v += axis_step
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left - 70, top - 26), ylabel, fill="black", font=small)
    draw.text(
        ((left + right) / 2, bottom + 26),
        "minutes since the clock started",
        fill="black",
        font=small,
        anchor="mt",
    )
    dots = set(scatter)
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        coords = [xy(x, y) for x, y in pts]
        if name in dots:
            for cx, cy in coords:
                draw.ellipse([cx - 2.5, cy - 2.5, cx + 2.5, cy + 2.5], fill=color)
        elif len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        ly = top + 8 + 20 * i
        draw.line([(right + 14, ly + 7), (right + 38, ly + 7)], fill=color, width=3)
        draw.text((right + 44, ly), name, fill="black", font=small)


def plot(path: Path, lat: list[dict[str, Any]], samples: list[dict[str, Any]], title: str) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1280, 920), "white")
    draw = ImageDraw.Draw(image)
    draw.text((20, 12), title, fill="black", font=_font(18))
    points = sorted((r["released_t"] / 60, r["latency_s"]) for r in lat if not r["warmup"])
    rolling = []
    for i in range(len(points)):
        window = [y for _, y in points[max(0, i - 9) : i + 1]]
        rolling.append((points[i][0], statistics.median(window)))
    x_max = max([s["t"] / 60 for s in samples] + [p[0] for p in points] + [1e-3])
    _panel(
        draw,
        (100, 90, 1000, 430),
        {"study latency": points, "median of last 10": rolling},
        title="End-to-end latency: association release -> SR/KOS at the PACS",
        ylabel="seconds",
        x_max=x_max,
        scatter=["study latency"],
    )
    names = sorted({n for s in samples for n in s["rss_mib"]}, key=lambda n: (n != "node", n))
    rss = {n: [(s["t"] / 60, s["rss_mib"][n]) for s in samples if n in s["rss_mib"]] for n in names}
    _panel(
        draw,
        (100, 530, 1000, 860),
        rss,
        title="Resident memory (VmRSS) per process",
        ylabel="MiB",
        x_max=x_max,
    )
    image.save(path)


# --- the run -------------------------------------------------------------------------------


def _wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class Soak:
    """One run: the peers it starts, the threads that drive and watch them, what they saw.

    ``close`` ends every process the run started, whatever state the run stopped in, so an
    interrupted soak leaves no node or storescp behind.
    """

    def __init__(self, cfg: SoakConfig) -> None:
        self.cfg = cfg
        if cfg.work_dir is not None:
            cfg.work_dir.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="rf-soak-", dir=cfg.work_dir))
        self.run = secrets.token_hex(2).upper()
        self.pool: list[PoolStudy] = []
        self.pacs = Storescp(self.workdir)
        self.node = NodeProcess(self.workdir, cfg, self.pacs.destination)
        self.watcher = PacsWatcher(self.pacs.directory)
        self.feeder = ReportFeeder(self.node.hl7_port)
        self.senders: list[BaseProcess] = []
        self.studies: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self._control = itertools.count()
        self._db: Database | None = None
        self.sampler: Sampler | None = None
        self.t0 = self.send_end = 0.0
        self.aborted: str | None = None

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = open_db(self.node.database_url)
        return self._db

    def start(self) -> None:
        print(f"soak {self.run}: work dir {self.workdir}", flush=True)
        t = time.perf_counter()
        self.pool = make_pool((self.cfg.work_dir or self.workdir) / "pool", self.cfg)
        print(
            f"pool: {len(self.pool)} studies of {self.pool[0].instances} instances "
            f"({self.cfg.slices}x{self.cfg.size}x{self.cfg.size} chest), "
            f"{time.perf_counter() - t:.1f} s",
            flush=True,
        )
        self.pacs.start()
        self.watcher.start()
        t = time.perf_counter()
        self.node.start()
        print(
            f"node: pid {self.node.pid}, DICOM {self.node.port}, HL7 {self.node.hl7_port}, "
            f"HTTP {self.node.http_port}, started in {time.perf_counter() - t:.1f} s",
            flush=True,
        )
        self.feeder.start()

    def on_study(self, record: dict[str, Any]) -> None:
        """A sent study: keep its record and queue its report (and the unrelated ones)."""
        self.studies.append(record)
        if record["error"] or record["failed"]:
            self.errors.append(
                {
                    "t": record["released"],
                    "kind": "c-store",
                    "sender": record["sender"],
                    "error": record["error"],
                    "failed": record["failed"][:3],
                }
            )
        if not record["acked"]:
            return
        due = record["released"] + self.cfg.report_delay_s
        for extra in [None, *range(self.cfg.extra_reports)]:
            cid = f"SK{self.run}{next(self._control):09d}"
            meta = {
                "control_id": cid,
                "kind": "study" if extra is None else "extra",
                "study_uid": record["study_uid"],
            }
            self.feeder.submit(due, oru_for(record, cid, extra=extra), meta)

    def warm_up(self) -> None:
        """One study through the whole path before the clock starts: imports, the engine load
        and the first SR/KOS build are start-up costs, not steady state."""
        t = time.perf_counter()
        record = send_study(
            self.node.port, "SOAKWARM", self.pool[0], f"{self.run}/warmup", f"SK{self.run}W"
        )
        record["warmup"] = True
        self.on_study(record)
        ok = _wait(lambda: settled(backlog(self.db), 1) and self.feeder.idle(), 600)
        print(
            f"warm-up study: {'done' if ok else 'NOT DONE'} in {time.perf_counter() - t:.1f} s",
            flush=True,
        )

    def _pids(self) -> dict[str, int]:
        out = {"driver": os.getpid()}
        if self.node.pid is not None:
            out["node"] = self.node.pid
        if self.pacs.proc is not None:
            out["storescp"] = self.pacs.proc.pid
        for i, p in enumerate(self.senders):
            if p.pid is not None and p.is_alive():
                out[f"sender{i}"] = p.pid
        return out

    def drive(self) -> None:
        """``duration_s`` of traffic: the senders, the reports behind them, the sampler."""
        cfg = self.cfg
        ctx = mp.get_context("spawn")  # no forked copy of this process's threads and sockets
        results: MpQueue[dict[str, Any]] = ctx.Queue()
        stop = ctx.Event()
        interval = cfg.senders * 3600.0 / cfg.rate_per_h
        spec = SenderSpec(
            self.node.port, self.run, cfg.senders, interval, cfg.seed, tuple(self.pool)
        )
        self.senders = [
            ctx.Process(target=sender_main, args=(i, spec, results, stop), name=f"sender{i}")
            for i in range(cfg.senders)
        ]
        self.t0 = time.time()
        for p in self.senders:
            p.start()
        self.sampler = Sampler(cfg.sample_s, self._pids, open_db(self.node.database_url), self.t0)
        self.sampler.sample()
        self.sampler.start()
        collecting = threading.Event()
        collecting.set()

        def collect() -> None:
            while collecting.is_set() or not results.empty():
                try:
                    self.on_study(results.get(timeout=0.5))
                except queue.Empty:
                    continue

        collector = threading.Thread(target=collect, name="collector", daemon=True)
        collector.start()
        every = 30.0 if cfg.duration_s < 900 else 300.0
        next_progress = self.t0 + every
        end = self.t0 + cfg.duration_s
        while time.time() < end:
            time.sleep(min(1.0, max(0.0, end - time.time())))
            if not self.node.alive():
                self.aborted = f"the node exited with {self.node.returncode}"
                break
            if self.pacs.proc is None or self.pacs.proc.poll() is not None:
                self.aborted = "storescp exited"
                break
            if time.time() >= next_progress:
                next_progress += every
                _progress(self.t0, self.studies, self.watcher, self.sampler)
        self.send_end = time.time()
        stop.set()
        for p in self.senders:
            p.join(timeout=300)
            if p.is_alive():
                self.errors.append({"t": time.time(), "kind": "sender", "error": "did not stop"})
                p.terminate()
        collecting.clear()
        collector.join(timeout=30)
        print(f"sending stopped after {self.send_end - self.t0:.0f} s; draining", flush=True)

    def drain(self) -> dict[str, Any]:
        """Let the node finish what it acknowledged, then stop it and the PACS."""
        t = time.perf_counter()
        reports_drained = self.feeder.drain(timeout=120)
        complete = sum(1 for s in self.studies if not s["failed"] and s["error"] is None)
        drained = self.aborted is None and _wait(
            lambda: settled(backlog(self.db), complete), self.cfg.drain_s, interval=1.0
        )
        seconds = time.perf_counter() - t
        time.sleep(self.watcher.settle_s + 0.5)
        if self.sampler is not None:
            self.sampler.stop_event.set()
            self.sampler.join(timeout=30)
            self.sampler.sample()
        node_exit = self.node.stop()
        pacs_exit = self.pacs.stop()
        self.watcher.stop_event.set()
        self.watcher.join(timeout=10)
        self.watcher.scan(settle_s=0.0)  # storescp has stopped: every file is whole
        print(
            f"drained in {seconds:.1f} s ({'complete' if drained else 'INCOMPLETE'}); "
            f"node exit {node_exit}, storescp exit {pacs_exit}",
            flush=True,
        )
        return {
            "complete": drained,
            "seconds": round(seconds, 1),
            "reports_drained": reports_drained,
            "exit": {"node": node_exit, "storescp": pacs_exit},
        }

    def report(self, drain: dict[str, Any]) -> dict[str, Any]:
        """Accounting and summary from the stopped node's database and the PACS's files."""
        samples = self.sampler.samples if self.sampler is not None else []
        by_sop = self.watcher.by_sop()
        jobs = job_rows(self.db)
        failed_sends = self.node.failed_sends()
        checks = account(
            self.db,
            self.studies,
            self.feeder.results,
            by_sop,
            jobs,
            self.pacs.directory,
            failed_sends,
        )
        drain["backlog_after"] = backlog(self.db)
        lat = latencies(self.studies, jobs, by_sop, self.t0)
        summary = summarize(
            self.cfg,
            self.run,
            self.t0,
            self.send_end,
            self.studies,
            self.feeder,
            lat,
            samples,
            jobs,
        )
        summary["aborted"] = self.aborted
        summary["drain"] = drain
        summary["accounting"] = checks
        failed_jobs = [
            {"job_id": j.id, "study_uid": j.study_uid, "attempts": j.attempts, "error": j.error}
            for j in jobs
            if j.state == "failed"
        ]
        summary["errors"] = {
            "c_store_studies_with_errors": sum(
                1 for s in self.studies if s["error"] or s["failed"]
            ),
            "c_store_instances_failed": sum(len(s["failed"]) for s in self.studies),
            "hl7_not_aa": sum(1 for r in self.feeder.results if r["code"] != "AA"),
            "hl7_connection_errors": sum(
                1 for e in self.feeder.errors if e["kind"] == "hl7 connection"
            ),
            "jobs_failed": len(failed_jobs),
            "jobs_retried": sum(1 for j in jobs if j.attempts > 1),
            "outbox_failed": drain["backlog_after"].get("outbox_failed", 0),
            "outbox_failed_attempts": sum(len(v) for v in failed_sends.values()),
            "outbox_ambiguous_attempts": sum(
                1 for v in failed_sends.values() for f in v if f["ambiguous"]
            ),
            "quarantined": checks["quarantined"],
            "pacs_unreadable_files": len(self.watcher.unreadable),
            "sampler_db_errors": self.sampler.db_errors if self.sampler is not None else 0,
            "node_log": self.node.log_summary(),
            "events": (self.errors + self.feeder.errors)[:50],
            "failed_jobs": failed_jobs[:20],
        }
        summary["ok"] = bool(
            checks["ok"]
            and drain["complete"]
            and self.aborted is None
            and summary["memory_verdict"] != "GROWING"
        )
        summary["studies"] = [
            {k: v for k, v in s.items() if k not in ("acked", "report")}
            | {"acked": len(s["acked"])}
            for s in self.studies
        ]
        summary["latency_per_study"] = lat
        summary["samples"] = samples
        out = self.cfg.out
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(summary, indent=1, default=str))
        plot(
            out / "soak.png",
            lat,
            samples,
            f"radfinder-node soak {self.run}: {self.cfg.senders} senders, "
            f"{self.cfg.rate_per_h:g} studies/h offered, {self.cfg.duration_s / 60:g} min, "
            f"{os.cpu_count()} CPUs",
        )
        return summary

    def close(self) -> None:
        for p in self.senders:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        self.node.stop()
        self.pacs.stop()
        self.watcher.stop_event.set()
        for db in (self._db, self.sampler.db if self.sampler is not None else None):
            if db is not None:
                db.dispose()
        if self.cfg.keep:
            print(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    """Run one soak; the summary (also written to ``cfg.out/soak.json`` and ``soak.png``)."""
    soak = Soak(cfg)
    try:
        soak.start()
        soak.warm_up()
        soak.drive()
        return soak.report(soak.drain())
    finally:
        soak.close()


def _progress(
    t0: float, studies: list[dict[str, Any]], watcher: PacsWatcher, sampler: Sampler
) -> None:
    last: dict[str, Any] = sampler.samples[-1] if sampler.samples else {}
    db: dict[str, int] = last.get("db", {})
    rss: dict[str, float] = last.get("rss_mib", {})
    print(
        f"  t={time.time() - t0:6.0f} s  sent {len(studies):4d} studies  results at PACS "
        f"{len(watcher.receptions):4d}  jobs queued {db.get('jobs_queued', 0)} running "
        f"{db.get('jobs_running', 0)} done {db.get('jobs_done', 0)}  outbox pending "
        f"{db.get('outbox_pending', 0)}  node RSS {rss.get('node', 0):.0f} MiB  "
        f"load {last.get('load1', 0):.1f}",
        flush=True,
    )


def summarize(
    cfg: SoakConfig,
    run: str,
    t0: float,
    send_end: float,
    studies: list[dict[str, Any]],
    feeder: ReportFeeder,
    lat: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    jobs: list[JobRow],
) -> dict[str, Any]:
    window = max(send_end - t0, 1e-9)
    timed = [s for s in studies if not s.get("warmup")]
    in_window = [s for s in timed if s["released"] <= send_end]
    measured = sorted((r for r in lat if not r["warmup"]), key=lambda r: r["released_t"])
    values = [r["latency_s"] for r in measured]
    completed_in_window = [r for r in measured if r["released_t"] + r["latency_s"] <= window]
    tenth = max(1, len(values) // 10)
    reports_in_window = [
        r for r in feeder.results if r["code"] == "AA" and r["acked_at"] <= send_end
    ]
    stages: dict[str, list[float]] = defaultdict(list)
    for r in measured:
        for k, v in r["timings"].items():
            stages[k].append(float(v))
    names = sorted({n for s in samples for n in s["rss_mib"]}, key=lambda n: (n != "node", n))
    long_enough = window >= MIN_JUDGED_S
    memory = {}
    for n in names:
        trend = rss_trend(samples, n, window)
        if trend is None:
            continue
        if n != "driver" and long_enough:  # the driver keeps every record: it grows by design
            trend["flat"] = is_flat(trend)
        memory[n] = trend
    return {
        "run": run,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "load1_mean": _round(
                statistics.fmean(s["load1"] for s in samples) if samples else None, 2
            ),
        },
        "window_s": round(window, 1),
        "throughput": {
            "studies_sent": len(in_window),
            "studies_sent_per_h": round(len(in_window) / window * 3600, 1),
            "studies_completed_in_window_per_h": round(len(completed_in_window) / window * 3600, 1),
            "instances_acked": sum(len(s["acked"]) for s in in_window),
            "instances_per_s": round(sum(len(s["acked"]) for s in in_window) / window, 2),
            "mb_per_s": round(sum(s["bytes"] for s in in_window) / window / 1e6, 2),
            "reports_aa": len(reports_in_window),
            "reports_per_s": round(len(reports_in_window) / window, 3),
        },
        "latency_s": {
            "studies": len(values),
            "p50": _round(percentile(values, 0.5)),
            "p95": _round(percentile(values, 0.95)),
            "max": _round(max(values) if values else None),
            "first10_p50": _round(percentile(values[:tenth], 0.5)),
            "last10_p50": _round(percentile(values[-tenth:], 0.5)),
            "quiet_period_s": cfg.quiet_period_s,
            "send_s_p50": _round(percentile([s["released"] - s["started"] for s in timed], 0.5)),
        },
        "job_stage_s_p50": {k: _round(percentile(v, 0.5)) for k, v in sorted(stages.items())},
        "hl7_rtt_ms_p50": _round(
            percentile([r["rtt_s"] * 1000 for r in feeder.results if r["rtt_s"] is not None], 0.5),
            2,
        ),
        "memory": memory,
        "memory_verdict": (
            "flat" if all(m.get("flat", True) for m in memory.values()) else "GROWING"
        )
        if long_enough
        else "run too short to judge",
        "cpu_percent": {n: cpu_share(samples, n) for n in names},
        "jobs": dict(Counter(j.state for j in jobs)),
    }


def print_summary(s: dict[str, Any]) -> None:
    tp, lat, acc = s["throughput"], s["latency_s"], s["accounting"]
    print(
        f"\n== soak {s['run']}: {s['window_s']:.0f} s of traffic, {s['machine']['cpus']} CPUs, "
        f"mean load {s['machine']['load1_mean']}"
    )
    print(
        f"throughput   {tp['studies_sent_per_h']} studies/h sent, "
        f"{tp['studies_completed_in_window_per_h']} studies/h completed in the window, "
        f"{tp['instances_per_s']} instances/s ({tp['mb_per_s']} MB/s), "
        f"{tp['reports_per_s']} reports/s"
    )
    print(
        f"latency      p50 {lat['p50']} s, p95 {lat['p95']} s, max {lat['max']} s over "
        f"{lat['studies']} studies (quiet period {lat['quiet_period_s']} s); first 10 % p50 "
        f"{lat['first10_p50']} s, last 10 % p50 {lat['last10_p50']} s; C-STORE of a study "
        f"p50 {lat['send_s_p50']} s"
    )
    print("job stages   " + ", ".join(f"{k} {v}" for k, v in s["job_stage_s_p50"].items()))
    print(f"memory       ({s['memory_verdict']}; RSS in MiB, warm-up and steady state apart)")
    for name, m in s["memory"].items():
        w, st = m["warmup"], m["steady"]
        line = (
            f"  {name:<14} warm-up to {w['end_s']:.0f} s: {w['start_mib']:.1f} -> "
            f"{w['end_mib']:.1f} ({w['growth_mib']:+.1f})"
        )
        if st is None:
            line += "; no steady window"
        else:
            lo, hi = st["slope_ci95_mib_per_h"]
            line += (
                f"; steady {st['from_s']:.0f}-{st['to_s']:.0f} s: {st['first_mib']:.1f} -> "
                f"{st['last_mib']:.1f} ({st['delta_mib']:+.1f}), slope "
                f"{st['slope_mib_per_h']:+.1f} MiB/h (95 % CI {lo:+.1f}..{hi:+.1f}), "
                f"{st['projected_mib']:+.1f} over the run, limit {st['limit_mib']:.1f}"
            )
        line += f"; max {m['max_mib']:.1f}, cpu {s['cpu_percent'].get(name)} %"
        print(line + {True: "  flat", False: "  GROWING", None: ""}[m.get("flat")])
    e = s["errors"]
    print(
        f"errors       c-store studies {e['c_store_studies_with_errors']} (instances "
        f"{e['c_store_instances_failed']}), hl7 not AA {e['hl7_not_aa']}, hl7 reconnects "
        f"{e['hl7_connection_errors']}, jobs failed {e['jobs_failed']} (retried "
        f"{e['jobs_retried']}), outbox failed {e['outbox_failed']} (failed attempts "
        f"{e['outbox_failed_attempts']}, ambiguous {e['outbox_ambiguous_attempts']}), "
        f"quarantined {e['quarantined']}, node log {e['node_log']['levels']}"
    )
    print(
        f"accounting   {'OK' if acc['ok'] else 'FAILED'}: "
        f"{acc['acknowledged_instances']} acked instances, "
        f"{acc['acknowledged_instances_missing_in_db']} missing in the database; "
        f"{acc['aa_reports']} AA reports, {acc['aa_reports_missing_in_db']} missing; "
        f"{acc['complete_studies']} complete studies, {acc['complete_studies_without_job']} "
        f"without job, {acc['complete_studies_job_not_done']} not done; "
        f"{acc['result_objects_expected']} result objects, {acc['result_objects_received_once']} "
        f"received exactly once, {acc['result_objects_lost']} lost, "
        f"{acc['result_objects_redelivered_after_timeout']} redelivered after an ambiguous send "
        f"(identical copies), {acc['result_objects_duplicated']} duplicated otherwise, "
        f"{acc['unexpected_objects_at_pacs']} unexpected"
    )
    for r in acc["redelivered_after_timeout"]:
        first: dict[str, Any] = next((f for f in r["failed_attempts"] if f["ambiguous"]), {})
        print(
            f"  redelivered {r['kind']} {r['sop_uid']}: {r['copies']} identical copies, "
            f"{r['outbox_attempts']} attempts; {first.get('ts')}: {first.get('error')}"
        )
    for r in acc["examples"]["duplicated"]:
        print(f"  DUPLICATE {r['kind']} {r['sop_uid']}: {r['why']}")
    print(
        f"linking      {acc['study_reports_linked']} of {acc['study_reports']} study reports "
        f"linked; {acc['extra_reports_waiting']} of {acc['extra_reports']} unrelated reports "
        f"waiting"
    )
    if not s["drain"]["complete"]:
        print(f"drain        INCOMPLETE, backlog {s['drain']['backlog_after']}")
    if s["aborted"]:
        print(f"aborted      {s['aborted']}")
    print(f"verdict      {'OK' if s['ok'] else 'FAILED'}")


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = SoakConfig()
    parser.add_argument("--duration", type=float, default=d.duration_s, help="seconds of traffic")
    parser.add_argument("--senders", type=int, default=d.senders, help="parallel C-STORE SCUs")
    parser.add_argument(
        "--rate",
        type=float,
        default=d.rate_per_h,
        help="studies per hour offered, all senders together",
    )
    parser.add_argument("--slices", type=int, default=d.slices, help="chest slices per study")
    parser.add_argument("--size", type=int, default=d.size, help="rows = columns")
    parser.add_argument("--pool", type=int, default=d.pool, help="distinct synthetic studies")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--quiet-period",
        type=float,
        default=d.quiet_period_s,
        help="the node's series quiet period (its default is 5 s)",
    )
    parser.add_argument(
        "--report-delay",
        type=float,
        default=d.report_delay_s,
        help="seconds from a study's release to its report",
    )
    parser.add_argument(
        "--extra-reports",
        type=int,
        default=d.extra_reports,
        help="unrelated reports per study (their study never arrives)",
    )
    parser.add_argument("--sample-interval", type=float, default=d.sample_s)
    parser.add_argument("--drain-timeout", type=float, default=d.drain_s)
    parser.add_argument("--out", type=Path, default=d.out, help="soak.json and soak.png go here")
    parser.add_argument("--work-dir", type=Path, help="parent of the temp dir (and the pool)")
    parser.add_argument("--keep", action="store_true", help="keep the node's data and the PACS")
    parser.add_argument("--bundle", type=Path, help="model bundle (default: the demo bundle)")
    args = parser.parse_args(argv)
    if args.senders < 1 or args.rate <= 0 or args.duration <= 0:
        parser.error("--senders, --rate and --duration must be positive")
    if shutil.which("storescp") is None:
        parser.error("dcmtk's storescp is not on PATH")
    cfg = SoakConfig(
        duration_s=args.duration,
        senders=args.senders,
        rate_per_h=args.rate,
        slices=args.slices,
        size=args.size,
        pool=args.pool,
        seed=args.seed,
        quiet_period_s=args.quiet_period,
        report_delay_s=args.report_delay,
        extra_reports=args.extra_reports,
        sample_s=args.sample_interval,
        drain_s=args.drain_timeout,
        out=args.out,
        work_dir=args.work_dir,
        keep=args.keep,
        bundle=args.bundle,
    )
    signal.signal(signal.SIGTERM, _interrupt)  # stopped from outside: still end what it started
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background (SIG_IGN)
    try:
        summary = run_soak(cfg)
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc}): the node, storescp and senders were stopped", flush=True)
        return 130
    print_summary(summary)
    print(f"wrote {cfg.out / 'soak.json'} and {cfg.out / 'soak.png'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
