"""The outbox against a real dcmtk storescp: retries while the peer is down, sends once it is up,
and never sends an object twice once the peer confirmed it. Against a pynetdicom PACS that answers
slowly: the wait for a response has its own timeout, a send it cuts short is recorded as
ambiguous and resent with identical bytes, and no C-STORE starts that could outlast the lease."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, StoragePresentationContexts, evt
from sqlalchemy import select

from conftest import free_port, small_phantom, wait_for
from radfinder_node.database import Database
from radfinder_node.job_models import OutboundObject, OutboundState
from radfinder_node.outbox import OutboxSender, RetryPolicy, Written, add_outbound, write_result
from radfinder_node.status import inference_status
from radfinder_node.timeutil import as_utc, utcnow


class StoreSCP:
    """dcmtk's storescp as the PACS: every received object becomes its own file (``+uf``), so
    counting files counts receptions."""

    def __init__(self, directory: Path, port: int, ae_title: str = "PACS") -> None:
        self.directory = directory
        self.port = port
        self.ae_title = ae_title
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def start(self) -> StoreSCP:
        self.proc = subprocess.Popen(
            ["storescp", "-aet", self.ae_title, "-od", str(self.directory), "+uf", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        assert wait_for(self._accepts, timeout=10), "storescp did not start listening"
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def received(self) -> list[str]:
        """SOP Instance UIDs of every object received, one entry per reception."""
        return sorted(
            str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in self.directory.iterdir()
            if p.is_file()
        )


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs", free_port())
    yield scp
    scp.stop()


def _written(tmp_path: Path, n: int) -> tuple[Path, list[Written]]:
    """``n`` real DICOM objects written through the outbox's durable writer."""
    from dicom_io.synthetic import write_ct_series

    hu, spacing = small_phantom(slices=n, size=16)
    series = write_ct_series(tmp_path / "objects", hu, spacing)
    results_dir = tmp_path / "results"
    written = []
    for path in series.paths:
        ds = dcmread(path)
        written.append(Written.of("sr", ds, write_result(results_dir, ds)))
    return results_dir, written


@pytest.fixture
def results(tmp_path: Path) -> tuple[Path, list[Written]]:
    return _written(tmp_path, 2)


class SlowPACS:
    """pynetdicom as a PACS whose disk is slow: each C-STORE is stored (kept with its exact
    bytes) only after the next delay in ``delays`` (none once they run out), then answered.
    Storing goes on even if the sender gave up meanwhile, as a real PACS's write does."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = list(delays)
        self.stored: list[tuple[str, bytes]] = []
        self.handling = 0
        self._lock = threading.Lock()
        self.port = free_port()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = StoragePresentationContexts
        server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        assert server is not None  # None only when blocking
        self.server = server

    @property
    def destination(self) -> str:
        return f"PACS@127.0.0.1:{self.port}"

    def _on_store(self, event: evt.Event) -> int:
        request = event.request
        uid = str(request.AffectedSOPInstanceUID)  # type: ignore[union-attr]
        data = bytes(request.DataSet.getvalue())  # type: ignore[union-attr]
        with self._lock:
            delay = self.delays.pop(0) if self.delays else 0.0
            self.handling += 1
        time.sleep(delay)
        with self._lock:
            self.stored.append((uid, data))
            self.handling -= 1
        return 0x0000

    def copies(self, uid: str) -> list[bytes]:
        with self._lock:
            return [data for u, data in self.stored if u == uid]

    def idle(self) -> bool:
        with self._lock:
            return self.handling == 0

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def slow_pacs() -> Iterator[list[SlowPACS]]:
    started: list[SlowPACS] = []
    yield started
    for pacs in started:
        pacs.stop()


def _rows(db: Database) -> list[OutboundObject]:
    with db.transaction() as session:
        return list(session.scalars(select(OutboundObject).order_by(OutboundObject.id)))


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(max_attempts=8, base_s=5.0, max_s=60.0)
    assert [policy.delay_s(n) for n in range(1, 7)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]


def test_written_file_is_the_object(results: tuple[Path, list[Written]]) -> None:
    results_dir, written = results
    for w in written:
        path = results_dir / w.path
        assert path.parts[-3:] == (w.study_uid, w.series_uid, f"{w.sop_uid}.dcm")
        assert str(dcmread(path).SOPInstanceUID) == w.sop_uid
    assert not list(results_dir.rglob("*.tmp"))


@pytest.mark.integration
def test_retries_while_down_then_sends_once(
    db_url: str, pacs: StoreSCP, results: tuple[Path, list[Written]]
) -> None:
    results_dir, written = results
    db = Database(db_url)
    policy = RetryPolicy(max_attempts=5, base_s=0.3, max_s=1.0)
    sender = OutboxSender(db, results_dir, calling_ae="RADFINDER", timeout_s=3, policy=policy)
    with db.transaction() as session:
        assert add_outbound(session, None, written, [pacs.destination]) == 2

    # The peer is down: both objects stay pending with the reason and a later due time.
    t0 = utcnow()
    report = sender.tick()
    assert (report.sent, report.retrying, report.failed) == (0, 2, 0)
    rows = _rows(db)
    assert all(r.state == OutboundState.PENDING and r.attempts == 1 for r in rows)
    assert all("could not connect" in (r.last_error or "") for r in rows)
    assert all(as_utc(r.next_attempt_at) >= t0 + timedelta(seconds=0.3) for r in rows)
    status = inference_status(db)
    assert status["outbox"]["pending"] == 2
    assert "could not connect" in status["last_errors"]["outbox"][0]["error"]
    assert sender.tick().sent == 0  # not due yet: no second try inside the backoff

    pacs.start()
    time.sleep(0.35)
    report = sender.tick()
    assert (report.sent, report.retrying, report.failed) == (2, 0, 0)
    rows = _rows(db)
    assert all(r.state == OutboundState.SENT and r.attempts == 2 for r in rows)
    assert all(r.last_status == 0 and r.last_error is None for r in rows)
    assert pacs.received() == sorted(w.sop_uid for w in written)

    # Confirmed objects are never sent again: not by later passes, not by a re-run's rows.
    with db.transaction() as session:
        assert add_outbound(session, None, written, [pacs.destination]) == 0
    assert sender.tick().sent == 0
    time.sleep(0.5)
    assert sender.tick().sent == 0
    assert pacs.received() == sorted(w.sop_uid for w in written)
    assert inference_status(db)["outbox"] == {"pending": 0, "sent": 2, "failed": 0}
    db.dispose()


@pytest.mark.integration
def test_gives_up_after_max_attempts_and_says_why(
    tmp_path: Path, results: tuple[Path, list[Written]]
) -> None:
    results_dir, written = results
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    policy = RetryPolicy(max_attempts=2, base_s=0.05, max_s=0.05)
    sender = OutboxSender(db, results_dir, calling_ae="RADFINDER", timeout_s=2, policy=policy)
    dead = f"PACS@127.0.0.1:{free_port()}"
    with db.transaction() as session:
        add_outbound(session, None, written[:1], [dead])
    assert sender.tick().retrying == 1
    assert wait_for(lambda: sender.tick().failed == 1, timeout=5)
    (row,) = _rows(db)
    assert row.state == OutboundState.FAILED and row.attempts == 2
    status = inference_status(db)
    assert status["outbox"]["failed"] == 1
    assert status["last_errors"]["outbox"][0]["state"] == "failed"
    assert sender.tick().failed == 0  # a failed row is not tried again
    # A re-run of its job gives it a fresh set of attempts.
    with db.transaction() as session:
        assert add_outbound(session, None, written[:1], [dead]) == 0
    assert _rows(db)[0].state == OutboundState.PENDING
    db.dispose()


@pytest.mark.integration
def test_missing_result_file_fails_the_object_not_the_batch(
    tmp_path: Path, pacs: StoreSCP, results: tuple[Path, list[Written]]
) -> None:
    results_dir, written = results
    (results_dir / written[0].path).unlink()
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    policy = RetryPolicy(max_attempts=1, base_s=1, max_s=1)
    sender = OutboxSender(db, results_dir, calling_ae="RADFINDER", timeout_s=3, policy=policy)
    pacs.start()
    with db.transaction() as session:
        add_outbound(session, None, written, [pacs.destination])
    report = sender.tick()
    assert (report.sent, report.failed) == (1, 1)
    by_uid = {r.sop_uid: r for r in _rows(db)}
    assert by_uid[written[0].sop_uid].state == OutboundState.FAILED
    assert "unreadable" in (by_uid[written[0].sop_uid].last_error or "")
    assert by_uid[written[1].sop_uid].state == OutboundState.SENT
    assert pacs.received() == [written[1].sop_uid]
    db.dispose()


@pytest.mark.integration
def test_slow_response_within_the_dimse_timeout_is_sent_once(
    tmp_path: Path, slow_pacs: list[SlowPACS]
) -> None:
    """The PACS takes 2 s to answer, twice the connect/association/socket timeout: the
    response wait has its own, longer timeout, so the object is sent once, first try."""
    results_dir, written = _written(tmp_path, 1)
    pacs = SlowPACS([2.0])
    slow_pacs.append(pacs)
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    policy = RetryPolicy(max_attempts=3, base_s=0.2, max_s=0.2)
    sender = OutboxSender(
        db, results_dir, calling_ae="RADFINDER", timeout_s=1.0, dimse_timeout_s=4.0, policy=policy
    )
    with db.transaction() as session:
        add_outbound(session, None, written, [pacs.destination])
    report = sender.tick()
    assert (report.sent, report.retrying, report.ambiguous) == (1, 0, 0)
    (row,) = _rows(db)
    assert row.state == OutboundState.SENT and row.attempts == 1 and row.last_error is None
    assert len(pacs.copies(written[0].sop_uid)) == 1
    db.dispose()


@pytest.mark.integration
def test_dimse_timeout_is_ambiguous_and_the_resend_is_identical(
    tmp_path: Path, slow_pacs: list[SlowPACS]
) -> None:
    """The PACS takes 1.5 s to store the first reception, longer than the 0.5 s response wait:
    the sender aborts, records an ambiguous try ("may have stored it", not a refusal) and
    retries; the PACS, which did store it, ends with two byte-identical copies of one SOP
    Instance UID, which is the at-least-once contract."""
    results_dir, written = _written(tmp_path, 1)
    uid = written[0].sop_uid
    pacs = SlowPACS([1.5])
    slow_pacs.append(pacs)
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    policy = RetryPolicy(max_attempts=3, base_s=0.2, max_s=0.2)
    sender = OutboxSender(
        db, results_dir, calling_ae="RADFINDER", timeout_s=2.0, dimse_timeout_s=0.5, policy=policy
    )
    with db.transaction() as session:
        add_outbound(session, None, written, [pacs.destination])
    started = time.monotonic()
    report = sender.tick()
    assert time.monotonic() - started < 1.4  # cut at the response timeout, not the store
    assert (report.sent, report.retrying, report.ambiguous) == (0, 1, 1)
    (row,) = _rows(db)
    assert row.state == OutboundState.PENDING and row.attempts == 1
    assert "within 0.5 s" in (row.last_error or "")
    assert "the peer may have stored it" in (row.last_error or "")
    assert "refused" not in (row.last_error or "")

    assert wait_for(pacs.idle, timeout=5)  # the slow write completes: the PACS has it
    assert len(pacs.copies(uid)) == 1
    assert wait_for(lambda: sender.tick().sent == 1, timeout=5)
    (row,) = _rows(db)
    assert row.state == OutboundState.SENT and row.attempts == 2 and row.last_error is None
    copies = pacs.copies(uid)
    assert len(copies) == 2 and copies[0] == copies[1]
    assert sender.tick().sent == 0  # confirmed: never again
    db.dispose()


@pytest.mark.integration
def test_no_store_starts_that_could_outlast_the_lease(
    tmp_path: Path, slow_pacs: list[SlowPACS]
) -> None:
    """A 4 s lease with a 2.5 s worst case per object leaves 1.5 s to start C-STOREs; at 0.6 s
    per answer, the batch's tail is handed back untried (no attempt counted) and goes out on
    the next passes, each object exactly once."""
    results_dir, written = _written(tmp_path, 4)
    pacs = SlowPACS([0.6] * 4)
    slow_pacs.append(pacs)
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    policy = RetryPolicy(max_attempts=3, base_s=0.2, max_s=0.2)
    sender = OutboxSender(
        db,
        results_dir,
        calling_ae="RADFINDER",
        timeout_s=0.5,
        dimse_timeout_s=2.0,
        policy=policy,
        lease_s=4.0,
    )
    with db.transaction() as session:
        add_outbound(session, None, written, [pacs.destination])
    report = sender.tick()
    assert report.sent >= 1 and report.deferred >= 1, report
    assert report.sent + report.deferred == 4 and report.retrying == 0
    rows = _rows(db)
    untried = [r for r in rows if r.state == OutboundState.PENDING]
    assert len(untried) == report.deferred
    assert all(r.attempts == 0 and r.lease_until is None and r.last_error is None for r in untried)
    for _ in range(4):
        if all(r.state == OutboundState.SENT for r in _rows(db)):
            break
        sender.tick()
    rows = _rows(db)
    assert all(r.state == OutboundState.SENT and r.attempts == 1 for r in rows)
    assert all(len(pacs.copies(w.sop_uid)) == 1 for w in written)
    with pytest.raises(ValueError, match="lease_s"):
        OutboxSender(
            db,
            results_dir,
            calling_ae="X",
            timeout_s=1,
            dimse_timeout_s=2,
            policy=policy,
            lease_s=4,
        )
    db.dispose()
