"""The HL7 listener over real sockets: one persistent MLLP connection, real databases, a real
node (C-STORE for the studies), kill -9 in the middle of a stream."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select

from conftest import REAL, free_port, port_open, small_phantom, start_serve, storescu, wait_for
from radfinder_node.database import Database
from radfinder_node.models import QuarantinedObject
from radfinder_node.node import Node
from radfinder_node.report_models import PairState, Report, ReportState, SnippetSlicePair
from radfinder_node.status import node_status
from reports.hl7_parse import parse_message
from reports.hl7_writer import oru_r01
from reports.mllp import frame

HL7_DIR = REAL / "dcm4che" / "dcm4che-assembly" / "src" / "etc" / "testdata" / "hl7"
SHARED = sorted(REAL.joinpath("dcm4che").rglob("*.hl7"))
STUDY_UID = "1.2.826.0.1.3680043.8.498.600"
ACCESSION = "ACC600"
TEXT = (
    "CT chest without contrast.\n"
    "There is a 7 mm nodule in the right lower lobe (series 2, image 10).\n"
    "No pleural effusion."
)


class MllpClient:
    """A socket client speaking MLLP: one connection, one message at a time, as engines do."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""

    def send(self, message: bytes) -> bytes:
        self.sock.sendall(frame(message))
        return self.read_ack()

    def read_ack(self) -> bytes:
        while b"\x1c\r" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("listener closed the connection")
            self._buf += chunk
        head, self._buf = self._buf.split(b"\x1c\r", 1)
        assert head.startswith(b"\x0b"), head[:20]
        return head[1:]

    def close(self) -> None:
        self.sock.close()


def msa(ack: bytes) -> tuple[str, str, str]:
    """(MSA-1, MSA-2, ERR segment) of an ACK."""
    message = parse_message(ack)
    assert message.header.message_type == "ACK"
    seg = next(s for s in message.segments if s[0] == "MSA")
    sep = message.header.field_separator
    err = next((sep.join(s) for s in message.segments if s[0] == "ERR"), "")
    return seg[1], seg[2], err


def oru(control_id: str, **overrides: object) -> bytes:
    args: dict[str, object] = {
        "accession_number": ACCESSION,
        "patient_id": "P600",
        "patient_name": "Doe^Jane",
        "study_uid": STUDY_UID,
        "placer_order": "PO600",
        "filler_order": None,
        "observation_datetime": datetime(2026, 1, 5, 10, 0),
        "sending_facility": "HOSP",
        "control_id": control_id,
    }
    args.update(overrides)
    text = args.pop("report", TEXT)
    return oru_r01(text, **args)  # type: ignore[arg-type]


@pytest.fixture
def hl7_node(make_node: Callable[..., Node], db_url: str) -> Node:
    return make_node(database_url=db_url)


@pytest.fixture
def client(hl7_node: Node) -> Iterator[MllpClient]:
    assert hl7_node.hl7_port
    c = MllpClient(hl7_node.hl7_port)
    yield c
    c.close()


def reports(db: Database) -> list[Report]:
    with db.transaction() as session:
        return list(session.scalars(select(Report).order_by(Report.id)).all())


def test_one_connection_carries_real_and_generated_messages(
    hl7_node: Node, client: MllpClient
) -> None:
    sent: list[tuple[str, bytes]] = [(p.name, p.read_bytes()) for p in SHARED]
    for i, version in enumerate(["2.3", "2.3.1", "2.4", "2.5", "2.5.1"]):
        sent.append(
            (f"gen-{version}", oru(f"GEN{i}", version=version, accession_number=f"ACCG{i}"))
        )
    acks = [(name, msa(client.send(raw))) for name, raw in sent]

    for (name, raw), (_, (code, control_id, err)) in zip(sent, acks, strict=True):
        assert code == "AA", (name, err)
        assert control_id == parse_message(raw).header.control_id  # answered in order

    rows = reports(hl7_node.db)
    by_control = {r.control_id: r for r in rows}
    # 4 ORU^R01 from dcm4che + 5 generated; ADT/ORM/OMI/OMG/SIU acknowledged and ignored
    assert sorted(by_control) == sorted(
        ["MESA4b141a5c", "1001127", "1001128", "1001129", "GEN0", "GEN1", "GEN2", "GEN3", "GEN4"]
    )
    raw_by_name = dict(sent)
    cda = by_control["1001127"]
    assert cda.raw == raw_by_name["ORU^R01-CDA.hl7"]
    assert cda.text_source == "cda" and cda.text is not None
    assert "round density at the left hilus" in cda.text
    pdf = by_control["1001128"]
    assert pdf.text is None and pdf.document is not None and pdf.document.startswith(b"%PDF")
    assert pdf.unminable_reason == "report is a PDF document; its text cannot be mined"
    assert pdf.document_type == "application/pdf"
    mesa = by_control["MESA4b141a5c"]
    assert mesa.version == "2.3.1" and mesa.accession_number == "ACC1"
    assert mesa.study_uids == ["1.113654.1.2001.30.2.2"]
    # no study was received: every report waits for its study
    assert {r.state for r in rows} == {ReportState.WAITING}
    assert "no study received yet with accession ACCG0" in (by_control["GEN0"].state_reason or "")
    for i in range(5):
        assert by_control[f"GEN{i}"].text == TEXT
    # the three dcm4che reports share accession "AccessionNumber": the newest final is current
    sr, cda_row, pdf_row = by_control["1001129"], by_control["1001127"], by_control["1001128"]
    order = sorted([cda_row, pdf_row, sr], key=lambda r: r.id)
    assert [r.superseded_by_id for r in order] == [order[1].id, order[2].id, None]


def test_resend_is_idempotent_and_a_reused_control_id_is_rejected(
    hl7_node: Node, client: MllpClient
) -> None:
    first = oru("R1")
    assert msa(client.send(first))[0] == "AA"
    # the same message again, even with a regenerated MSH-7 timestamp: AA, still one row
    again = first.replace(b"|20260105100000||ORU", b"|20260105110000||ORU", 1)
    assert again != first
    assert msa(client.send(again))[0] == "AA"
    assert msa(client.send(first))[0] == "AA"
    assert len(reports(hl7_node.db)) == 1
    # a different report under the same (facility, control id): AE 205, quarantined
    code, control_id, err = msa(client.send(oru("R1", report="Something else entirely.")))
    assert (code, control_id) == ("AE", "R1")
    assert "205" in err and "already used for a different message" in err
    assert len(reports(hl7_node.db)) == 1
    with hl7_node.db.transaction() as session:
        q = session.scalars(select(QuarantinedObject)).one()
    assert q.kind == "hl7" and q.status == 205


BAD_MESSAGES = [
    (b"this is not HL7 at all", "AE", "does not start with an MSH segment", 100),
    (b"MSH|^~\\&|RIS|HOSP|||||ORU^R01|OLD1|P|2.2\rOBR|1\r", "AR", "version 2.2", 203),
    (b"MSH|^~\\&|RIS|HOSP|||||ORU^R01||P|2.5.1\rOBR|1\r", "AE", "MSH-10", 101),
    (b"MSH|^~\\&|RIS|HOSP|||||ORU^R01|NOOBR|P|2.5.1\rPID|1\r", "AE", "no OBR", 100),
]


def test_malformed_and_unlinkable_messages_get_ae_or_ar_and_are_quarantined(
    hl7_node: Node, client: MllpClient
) -> None:
    unlinkable = oru("U1", accession_number="", study_uid=None, filler_order="F1")
    cases = [*BAD_MESSAGES, (unlinkable, "AE", "cannot be linked to a study", 101)]
    for raw, code, words, err_code in cases:
        got, _, err = msa(client.send(raw))
        assert got == code, (raw[:40], err)
        assert words in err and str(err_code) in err
    # the connection survived every rejection: a good report still goes through
    assert msa(client.send(oru("GOOD")))[0] == "AA"
    assert [r.control_id for r in reports(hl7_node.db)] == ["GOOD"]
    with hl7_node.db.transaction() as session:
        kept = session.scalars(select(QuarantinedObject).order_by(QuarantinedObject.id)).all()
    assert [(q.kind, q.status) for q in kept] == [("hl7", c[3]) for c in cases]
    root = hl7_node.settings.quarantine_dir
    for q, (raw, _, words, _) in zip(kept, cases, strict=True):
        assert (root / q.path).read_bytes() == raw  # byte for byte
        sidecar = json.loads((root / q.path).with_suffix(".json").read_text())
        assert words in sidecar["reason"] and sidecar["kind"] == "hl7"
        assert words in q.reason
    assert node_status(hl7_node.db)["quarantined"] == len(cases)


def test_partial_writes_and_junk_between_frames(hl7_node: Node) -> None:
    assert hl7_node.hl7_port
    with socket.create_connection(("127.0.0.1", hl7_node.hl7_port), timeout=30) as sock:
        stream = b"\r\n" + frame(oru("P1")) + b"\n\n" + frame(oru("P2", accession_number="X2"))
        for i in range(0, len(stream), 97):
            sock.sendall(stream[i : i + 97])
            time.sleep(0.001)
        client = MllpClient.__new__(MllpClient)
        client.sock, client._buf = sock, b""
        assert [msa(client.read_ack())[:2] for _ in range(2)] == [("AA", "P1"), ("AA", "P2")]
    assert [r.control_id for r in reports(hl7_node.db)] == ["P1", "P2"]


def test_oversized_message_is_answered_and_the_connection_goes_on(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = make_node(hl7_max_message_bytes=4000)
    assert node.hl7_port
    client = MllpClient(node.hl7_port)
    pdf = (HL7_DIR / "ORU^R01-PDF.hl7").read_bytes()
    assert len(pdf) > 4000
    code, control_id, err = msa(client.send(pdf))
    assert (code, control_id) == ("AE", "1001128") and "exceeds the limit" in err
    assert msa(client.send(oru("AFTER")))[0] == "AA"
    client.close()
    with node.db.transaction() as session:
        q = session.scalars(select(QuarantinedObject)).one()
    assert pdf.startswith((node.settings.quarantine_dir / q.path).read_bytes()[:3000])


def test_non_oru_messages_get_their_own_ack_and_leave_nothing(
    hl7_node: Node, client: MllpClient
) -> None:
    for path in SHARED:
        if path.name.startswith("ORU"):
            continue
        ack = client.send(path.read_bytes())
        header = parse_message(ack).header
        assert msa(ack)[0] == "AA"
        assert header.trigger_event == parse_message(path.read_bytes()).header.trigger_event
    assert reports(hl7_node.db) == []
    # an ACK sent to us is not answered (no ping-pong): the next message's ACK comes next
    client.sock.sendall(frame(b"MSH|^~\\&|X|Y|||||ACK^R01^ACK|A1|P|2.5.1\rMSA|AA|Z\r"))
    assert msa(client.send(oru("NEXT")))[1] == "NEXT"


@pytest.mark.integration
def test_report_before_its_study_waits_then_links(
    make_node: Callable[..., Node], tmp_path: Path, db_url: str
) -> None:
    from dicom_io.synthetic import write_ct_series

    node = make_node(database_url=db_url)
    assert node.hl7_port
    client = MllpClient(node.hl7_port)
    by_uid = oru("W1", accession_number="OTHER", report=TEXT)
    by_accession = oru("W2", study_uid=None, accession_number=ACCESSION, sending_facility="H2")
    assert msa(client.send(by_uid))[0] == "AA"
    assert msa(client.send(by_accession))[0] == "AA"
    client.close()
    assert [r.state for r in reports(node.db)] == [ReportState.WAITING] * 2

    hu, spacing = small_phantom()
    write_ct_series(
        tmp_path / "study", hu, spacing, study_uid=STUDY_UID, accession_number=ACCESSION
    )
    assert storescu(node.port or 0, tmp_path / "study").returncode == 0

    def linked() -> bool:
        return all(r.state == ReportState.LINKED for r in reports(node.db))

    assert wait_for(linked, timeout=30)
    rows = reports(node.db)
    assert rows[0].study_id == rows[1].study_id is not None
    assert rows[0].state_reason is None and rows[0].linked_at is not None

    def mined() -> bool:
        return all(r.mined_at is not None for r in reports(node.db))

    assert wait_for(mined, timeout=30)
    with node.db.transaction() as session:
        pairs = session.scalars(select(SnippetSlicePair).order_by(SnippetSlicePair.id)).all()
    assert sorted(p.report_id for p in pairs) == [r.id for r in rows]  # one citation each
    for pair in pairs:
        assert (pair.series_number, pair.image_number) == (2, 10)
        assert pair.state == PairState.RESOLVED and pair.sop_uid and pair.z_mm is not None
        assert "nodule" in pair.snippet and "image 10" not in pair.snippet
        assert TEXT[pair.start : pair.end].startswith("series 2")


def test_corrected_report_supersedes_the_earlier_one(hl7_node: Node, client: MllpClient) -> None:
    assert msa(client.send(oru("F1", result_status="F")))[0] == "AA"
    assert msa(client.send(oru("C1", result_status="C", report="Corrected text.")))[0] == "AA"
    late = oru("F2", result_status="F", report="A late final after the correction.")
    assert msa(client.send(late))[0] == "AA"
    other = oru("O1", accession_number="ANOTHER", study_uid="1.2.3.999")
    assert msa(client.send(other))[0] == "AA"
    rows = {r.control_id: r for r in reports(hl7_node.db)}
    assert rows["F1"].superseded_by_id == rows["C1"].id
    assert rows["C1"].superseded_by_id is None
    assert rows["F2"].superseded_by_id == rows["C1"].id  # a correction stays current
    assert rows["O1"].superseded_by_id is None
    status = node_status(hl7_node.db)["reports"]
    assert status["superseded"] == 2 and status["waiting"] == 2


def test_migration_matches_the_models(db_url: str) -> None:
    from radfinder_node.models import Base

    db = Database(db_url)
    try:
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        ours = {"reports", "snippet_slice_pairs"}
        relevant = [d for d in diff if ours & set(str(d).split("'"))]
        assert relevant == []
    finally:
        db.dispose()


# --- kill -9 ---------------------------------------------------------------------------------


def start_node(data_dir: Path, hl7_port: int, db_url: str) -> subprocess.Popen[bytes]:
    env = {
        "RADFINDER_DATABASE_URL": db_url,
        "RADFINDER_EMBEDDED_WORKER": "false",
        "RADFINDER_LOG_JSON": "true",
        "RADFINDER_HTTP_PORT": "0",
    }
    args = ("--port", str(free_port()), "--hl7-port", str(hl7_port))
    return start_serve(data_dir, *args, env=env, ready=lambda: port_open(hl7_port))


@pytest.mark.slow
@pytest.mark.integration
def test_kill9_mid_stream_keeps_every_acknowledged_report(tmp_path: Path, db_url: str) -> None:
    n = 200
    base = datetime(2026, 2, 1, 8, 0)
    messages = [
        oru(
            f"K{i:05d}",
            accession_number=f"KACC{i:05d}",
            study_uid=f"1.2.826.0.1.3680043.8.498.9{i:05d}",
            observation_datetime=base + timedelta(minutes=i),
        )
        for i in range(n)
    ]
    data_dir, port = tmp_path / "data", free_port()
    proc = start_node(data_dir, port, db_url)
    acknowledged: list[str] = []
    killed = threading.Event()

    def killer() -> None:
        wait_for(lambda: len(acknowledged) >= 40, timeout=120, interval=0.001)
        os.kill(proc.pid, signal.SIGKILL)  # asynchronously: a message is usually in flight
        killed.set()

    threading.Thread(target=killer, daemon=True).start()
    client = MllpClient(port)
    try:
        for i, raw in enumerate(messages):
            code, control_id, _ = msa(client.send(raw))
            assert (code, control_id) == ("AA", f"K{i:05d}")
            acknowledged.append(control_id)
    except (ConnectionError, OSError):
        pass
    client.close()
    proc.wait(timeout=20)
    assert killed.is_set() and proc.returncode == -signal.SIGKILL
    assert 40 <= len(acknowledged) < n

    proc = start_node(data_dir, port, db_url)
    try:
        db = Database(db_url)
        with db.transaction() as session:
            stored = set(session.scalars(select(Report.control_id)).all())
        assert set(acknowledged) <= stored, "an acknowledged report was lost"
        assert len(stored) <= len(acknowledged) + 1  # at most the one in flight committed
        # the sender resends everything it has no ACK for, and (to be safe) everything else
        client = MllpClient(port)
        for raw in messages:
            assert msa(client.send(raw))[0] == "AA"
        client.close()
        with db.transaction() as session:
            count = session.scalar(select(func.count()).select_from(Report))
            distinct = session.scalar(select(func.count(func.distinct(Report.control_id))))
        assert count == distinct == n
        db.dispose()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0
