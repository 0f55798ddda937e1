"""Who may associate and how much: the calling-AE allow-list with host checks (127.0.0.1 against
127.0.0.2, both loopback), associations per peer, the instance size limit, and the PHI audit of
the node's INFO logs while a study and its report go all the way through."""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pydantic
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import select
from test_outbox import StoreSCP

from conftest import free_port, node_settings, small_phantom, storescu, wait_for
from dicom_io.scp import VERIFICATION
from dicom_io.synthetic import SyntheticSeries, write_ct_series
from radfinder_node.job_models import Job, JobState, OutboundObject, OutboundState
from radfinder_node.logs import JsonFormatter
from radfinder_node.models import Instance, QuarantinedObject
from radfinder_node.node import Node
from radfinder_node.report_models import Report, ReportState, SnippetSlicePair
from radfinder_node.security import AllowEntry, CallingAEAllowList, normalise_address
from reports.hl7_writer import oru_r01
from reports.mllp import frame

OTHER_LOOPBACK = "127.0.0.2"


# -- the allow-list, pure ---------------------------------------------------------------------


def test_allow_entries_parse_every_host_form() -> None:
    assert AllowEntry.parse("PACS") == AllowEntry("PACS")
    one = AllowEntry.parse(" PACS@10.0.0.5 ")
    assert one.network == ipaddress.ip_network("10.0.0.5/32") and str(one) == "PACS@10.0.0.5"
    net = AllowEntry.parse("PACS@10.0.0.0/24")
    assert net.network == ipaddress.ip_network("10.0.0.0/24") and str(net) == "PACS@10.0.0.0/24"
    assert AllowEntry.parse("PACS@pacs.Example.org.").hostname == "pacs.example.org"
    assert AllowEntry.parse("MOD@[fd00::5]") == AllowEntry.parse("MOD@fd00::5")
    assert str(AllowEntry.parse("MOD@fd00::5")) == "MOD@[fd00::5]"
    assert AllowEntry.parse("*@10.0.0.0/8").admits_title("ANYONE")
    assert AllowEntry.parse("A@B@10.0.0.1").ae_title == "A@B"  # '@' may be in an AE title
    for bad, why in [
        ("", "AE title"),
        ("PACS@", "empty host"),
        ("PACS@10.0.0.0/33", "10.0.0.0/33"),
        ("PACS@10.0.0.1/24", "host bits"),
        ("PACS@10.0.0.256", "10.0.0.256"),
        ("PACS@bad_host!", "not an address or host name"),
        ("SEVENTEEN_CHARS_AE@10.0.0.1", "1-16"),
        ("BACK\\SLASH", "backslash"),
    ]:
        with pytest.raises(ValueError, match=re.escape(why)):
            AllowEntry.parse(bad)


def test_allow_list_decides_on_title_and_address() -> None:
    allow = CallingAEAllowList(
        ["PACS@127.0.0.1", "CT1@10.1.0.0/16", "ANY", "*@192.168.7.0/24", "LOCAL@localhost"]
    )
    assert allow("PACS", "127.0.0.1") is None
    assert allow("PACS", "::ffff:127.0.0.1") is None  # IPv4-mapped, as a dual-stack bind sees it
    assert "not allowed from 127.0.0.2" in (allow("PACS", OTHER_LOOPBACK) or "")
    assert allow("CT1", "10.1.200.3") is None
    assert allow("CT1", "10.2.0.1") is not None
    assert allow("ANY", "203.0.113.9") is None
    assert allow("WHOEVER", "192.168.7.77") is None
    assert "not allowed from 10.1.0.1" in (allow("WHOEVER", "10.1.0.1") or "")
    assert "not on the allow-list" in (CallingAEAllowList(["PACS"])("WHOEVER", "::1") or "")
    # host names resolve forward (localhost is 127.0.0.1 here), never by reverse lookup
    assert allow("LOCAL", "127.0.0.1") is None
    assert allow("LOCAL", OTHER_LOOPBACK) is not None
    assert CallingAEAllowList([])("ANYONE", "198.51.100.1") is None  # empty: everyone
    assert normalise_address("::ffff:10.0.0.1") == ipaddress.ip_address("10.0.0.1")
    assert normalise_address("not-an-ip") is None


def test_allow_list_entries_are_validated_in_the_settings(tmp_path: Path) -> None:
    ok = node_settings(data_dir=tmp_path, allowed_calling_aes=["PACS@10.0.0.0/24", "CT"])
    assert ok.allowed_calling_aes == ["PACS@10.0.0.0/24", "CT"]
    with pytest.raises(pydantic.ValidationError, match=r"10\.0\.0\.0/33"):
        node_settings(data_dir=tmp_path, allowed_calling_aes=["PACS@10.0.0.0/33"])
    with pytest.raises(pydantic.ValidationError):
        node_settings(data_dir=tmp_path, max_associations_per_peer=-1)


# -- the listener ------------------------------------------------------------------------------


def associate(
    node: Node, calling_ae: str = "PACS", source: str = "127.0.0.1", timeout: float = 10
) -> Association:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(CTImageStorage)
    assert node.port is not None
    return ae.associate("127.0.0.1", node.port, ae_title="RADFINDER", bind_address=(source, 0))


def rejection(assoc: Association) -> tuple[int, int, int]:
    """(result, source, reason/diag.) of an A-ASSOCIATE-RJ."""
    assert assoc.is_rejected
    rsp = assoc.acceptor.primitive
    assert rsp is not None
    return int(rsp.result or 0), int(rsp.result_source or 0), int(rsp.diagnostic or 0)


def test_calling_ae_from_the_wrong_host_is_rejected(
    make_node: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="dicom_io.scp")
    node = make_node(
        allowed_calling_aes=["PACS@127.0.0.1", "CT@127.0.0.0/31", "*@127.0.0.2"],
        embedded_worker=False,
        hl7_enabled=False,
    )
    ok = associate(node, "PACS", "127.0.0.1")
    assert ok.is_established and ok.send_c_echo().Status == 0
    ok.release()
    ct = associate(node, "CT", "127.0.0.1")  # 127.0.0.0/31 holds .0 and .1
    assert ct.is_established
    ct.release()
    # 1 rejected-permanent, 1 service-user, 3 calling-AE-title-not-recognized (PS3.8 9-21)
    assert rejection(associate(node, "INTRUDER", "127.0.0.1")) == (1, 1, 3)
    anyone = associate(node, "ANY_TITLE", OTHER_LOOPBACK)  # *@127.0.0.2
    assert anyone.is_established
    anyone.release()
    # PACS from 127.0.0.2 is outside its own entry but inside the wildcard one: admitted
    pacs_other = associate(node, "PACS", OTHER_LOOPBACK)
    assert pacs_other.is_established
    pacs_other.release()
    rejected = [r for r in caplog.records if r.getMessage() == "association rejected"]
    assert len(rejected) == 1
    assert rejected[0].fields["calling_ae"] == "INTRUDER"  # type: ignore[attr-defined]


def test_a_pinned_title_from_another_address_gets_the_calling_ae_rejection(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(allowed_calling_aes=["PACS@127.0.0.1"], embedded_worker=False)
    assert rejection(associate(node, "PACS", OTHER_LOOPBACK)) == (1, 1, 3)
    assert rejection(associate(node, "OTHER", "127.0.0.1")) == (1, 1, 3)
    ok = associate(node, "PACS", "127.0.0.1")
    assert ok.is_established
    ok.release()


def test_associations_per_peer_are_limited(make_node: Callable[..., Node]) -> None:
    node = make_node(max_associations_per_peer=2, embedded_worker=False, hl7_enabled=False)
    held = [associate(node), associate(node)]
    assert all(a.is_established for a in held)
    # 2 rejected-transient, 3 service-provider (presentation), 2 local-limit-exceeded
    assert rejection(associate(node)) == (2, 3, 2)
    other = associate(node, source=OTHER_LOOPBACK)  # another peer has its own allowance
    assert other.is_established
    held[0].release()
    again: list[Association] = []

    def admitted() -> bool:
        a = associate(node)
        if a.is_established:
            again.append(a)
        return bool(again)

    assert wait_for(admitted, timeout=5, interval=0.1)
    assert rejection(associate(node)) == (2, 3, 2)
    for a in (held[1], other, *again):
        a.release()


def _slice_file(tmp_path: Path, name: str, size: int) -> Path:
    hu = np.full((1, size, size), 40, dtype=np.float32)
    series = write_ct_series(tmp_path / name, hu, (1.0, 0.7, 0.7))
    return series.paths[0]


def test_instance_over_the_size_limit_is_refused_and_nothing_is_kept(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = make_node(max_instance_bytes=64 * 1024, embedded_worker=False, hl7_enabled=False)
    small = _slice_file(tmp_path, "small", 64)  # ~ 8 KiB of pixels
    big = _slice_file(tmp_path, "big", 256)  # ~ 128 KiB of pixels
    small2 = _slice_file(tmp_path, "small2", 64)
    assert small.stat().st_size < 64 * 1024 < big.stat().st_size
    assoc = associate(node)
    assert assoc.send_c_store(dcmread(small)).Status == 0
    rsp = assoc.send_c_store(dcmread(big))
    assert rsp.Status == 0xA700
    assert "exceeds 65536 bytes" in str(rsp.get("ErrorComment", ""))
    assert assoc.send_c_store(dcmread(small2)).Status == 0  # the association goes on
    assoc.release()

    big_uid = str(dcmread(big, stop_before_pixels=True).SOPInstanceUID)
    with node.db.transaction() as session:
        stored = set(session.scalars(select(Instance.sop_uid)))
        quarantined = session.scalars(select(QuarantinedObject)).all()
    assert big_uid not in stored and len(stored) == 2
    assert len(quarantined) == 1
    row = quarantined[0]
    assert (row.sop_uid, row.status, row.path) == (big_uid, 0xA700, "")
    assert row.size_bytes > big.stat().st_size - 1024  # what arrived, counted but not kept
    assert "exceeds the limit of 65536 bytes" in row.reason
    files = [p for p in node.quarantine.root.rglob("*") if p.is_file()]
    assert files == []  # nothing half-written kept
    assert list(node.spool.incoming.iterdir()) == []
    assert not any(big_uid in p.name for p in node.spool.root.rglob("*"))


def test_storescu_sees_the_size_refusal(make_node: Callable[..., Node], tmp_path: Path) -> None:
    node = make_node(max_instance_bytes=64 * 1024, embedded_worker=False, hl7_enabled=False)
    big = _slice_file(tmp_path, "big", 256)
    assert node.port is not None
    done = storescu(node.port, big.parent, "-v")
    assert done.returncode != 0
    assert "Refused: OutOfResources" in done.stdout + done.stderr, done.stdout + done.stderr
    with node.db.transaction() as session:
        assert session.scalars(select(Instance)).all() == []


# -- PHI audit -------------------------------------------------------------------------------

PATIENT_NAME = "Quixley^Marisol"
PATIENT_ID = "PHI7731X"
ACCESSION = "ACCPHI4410"
PHI = (PATIENT_NAME, "Quixley", "Marisol", PATIENT_ID, ACCESSION)


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Every record at INFO and above, rendered by the node's JSON formatter (fields and
    tracebacks included), with the levels ``setup_logging`` sets for a site."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    pynetdicom = logging.getLogger("pynetdicom")
    levels = root.level, pynetdicom.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    pynetdicom.setLevel(logging.WARNING)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        pynetdicom.setLevel(levels[1])


def _oru(series: SyntheticSeries, control_id: str, **overrides: object) -> bytes:
    args: dict[str, object] = {
        "accession_number": ACCESSION,
        "patient_id": PATIENT_ID,
        "patient_name": PATIENT_NAME,
        "study_uid": series.study_uid,
        "placer_order": "PO1",
        "filler_order": None,
        "observation_datetime": datetime(2026, 1, 5, 10, 0),
        "sending_facility": "HOSP",
        "control_id": control_id,
    }
    args.update(overrides)
    text = (
        "CT chest.\nA 6 mm nodule in the right lower lobe (series 2, image 10).\n"
        f"Patient {PATIENT_NAME.replace('^', ' ')} ({PATIENT_ID}) was informed."
    )
    return oru_r01(text, **args)  # type: ignore[arg-type]


def _mllp(port: int, message: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(frame(message))
        data = b""
        while b"\x1c\r" not in data:
            chunk = sock.recv(65536)
            assert chunk, "no ACK"
            data += chunk
    return data


@pytest.mark.slow
@pytest.mark.integration
def test_no_patient_name_or_id_in_info_logs(tmp_path: Path, captured_logs: io.StringIO) -> None:
    """A study (received, selected, inferred, results sent), its report (stored, linked, mined),
    a rejected instance and a rejected report: not one log line names the patient."""
    pacs = StoreSCP(tmp_path / "pacs", free_port()).start()
    node = Node(
        node_settings(
            data_dir=tmp_path / "node",
            destinations=[pacs.destination],
            engine_runtime="onnx",
            engine_device="cpu",
            send_backoff_s=0.2,
            max_instance_bytes=1024 * 1024,
        )
    )
    node.start()
    try:
        assert node.port is not None and node.hl7_port is not None
        hu, spacing = small_phantom()
        series = write_ct_series(
            tmp_path / "series",
            hu,
            spacing,
            patient_name=PATIENT_NAME,
            patient_id=PATIENT_ID,
            accession_number=ACCESSION,
        )
        sent = storescu(node.port, series.paths[0].parent)
        assert sent.returncode == 0, sent.stderr
        # an instance the node quarantines (no Series UID), carrying the same patient
        broken = dcmread(series.paths[0])
        del broken.SeriesInstanceUID
        broken.SOPInstanceUID = broken.SOPInstanceUID + ".9"
        assoc = associate(node, "DCMTK")
        assert assoc.send_c_store(broken).Status == 0xC211
        assoc.release()
        # a report, and one that cannot be linked (no accession, no study UID)
        assert b"MSA|AA|PHI1" in _mllp(node.hl7_port, _oru(series, "PHI1"))
        unlinkable = _oru(series, "PHI2", accession_number="", study_uid=None)
        assert b"MSA|AE|PHI2" in _mllp(node.hl7_port, unlinkable)

        def finished() -> bool:
            with node.db.transaction() as session:
                jobs = session.scalars(select(Job)).all()
                out = session.scalars(select(OutboundObject)).all()
                report = session.scalars(select(Report).where(Report.control_id == "PHI1")).one()
                pairs = session.scalars(select(SnippetSlicePair)).all()
            return (
                len(jobs) == 1
                and jobs[0].state in (JobState.DONE, JobState.FAILED)
                and len(out) == 2
                and all(o.state == OutboundState.SENT for o in out)
                and report.state == ReportState.LINKED
                and report.mined_at is not None
                and len(pairs) == 1
            )

        assert wait_for(finished, timeout=120, interval=0.2)
        with node.db.transaction() as session:
            job = session.scalars(select(Job)).one()
            assert job.state == JobState.DONE, job.error
    finally:
        node.stop()  # its shutdown lines are audited too
        pacs.stop()

    text = captured_logs.getvalue()
    events = {json.loads(line)["event"] for line in text.splitlines()}
    # the audit saw the whole path, not an empty log
    for expected in (
        "association closed",
        "instance rejected",
        "series selected",
        "job created",
        "object sent",
        "report stored",
        "hl7 message rejected",
        "report mined",
        "node stopped",
    ):
        assert expected in events, (expected, sorted(events))
    lowered = text.lower()
    for value in PHI:
        assert value.lower() not in lowered, f"{value!r} appears in the logs"
