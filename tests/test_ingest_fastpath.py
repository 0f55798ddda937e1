"""The C-STORE receive fast path (dicom_io.upper_layer), the header scan, the seal and the one-flush
durable link: each against the stock pynetdicom/pydicom behaviour it replaces."""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from conftest import REAL, small_phantom, wait_for
from dicom_io import header_scan, upper_layer
from dicom_io.incoming import IncomingFile
from dicom_io.scp import StorageSCP, _identify, _identify_scanned, instance_from_spool
from dicom_io.spool import (
    PREAMBLE_BYTES,
    Quarantine,
    Spool,
    durable_link,
    seal_bytes,
    verify_seal,
)
from radfinder_node.database import Database
from radfinder_node.ingest import IngestRecorder
from radfinder_node.models import Instance

pytestmark = pytest.mark.integration

WANTED = (0x0020000D, 0x0020000E, 0x00080018, 0x00080016, 0x00200013)
KEYWORDS = {
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00080018: "SOPInstanceUID",
    0x00080016: "SOPClassUID",
    0x00200013: "InstanceNumber",
}


def real_files() -> list[Path]:
    if not REAL.is_dir():
        return []
    return sorted(
        p for p in REAL.rglob("*") if p.is_file() and p.suffix.lower() in ("", ".dcm", ".ima")
    )


def part10(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


# -- byte-for-byte agreement with pynetdicom ------------------------------------------------


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        (CTImageStorage, "1.2.3.4.5", ExplicitVRLittleEndian),  # odd-length UID: padded
        (CTImageStorage, "1.2.3.4.56", ImplicitVRLittleEndian),
        ("1.2.840.10008.5.1.4.1.1.4", "2.25.12345678901234567890", JPEG2000Lossless),
    ],
)
def test_file_meta_is_what_pynetdicom_writes(
    sop_class: str, sop_instance: str, syntax: str
) -> None:
    out = BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(
        out,  # type: ignore[arg-type]
        create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(syntax),
        ),
    )
    assert upper_layer.file_meta(sop_class, sop_instance, syntax) == out.getvalue()


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC211, 0xB007])
@pytest.mark.parametrize("sop_instance", ["1.2.3.4.5", "1.2.3.4.56"])
def test_store_response_is_what_pynetdicom_sends(status: int, sop_instance: str) -> None:
    rsp = C_STORE()  # as StorageServiceClass.SCP builds it
    rsp.MessageID = 7
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPInstanceUID = UID(sop_instance)
    rsp.AffectedSOPClassUID = UID(CTImageStorage)
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    [pdata] = list(msg.encode_msg(3, 16384))
    expected = P_DATA_TF(pdata).encode()
    ours = upper_layer.store_response_pdu(3, 7, CTImageStorage, sop_instance, status)
    assert ours == expected


# -- the header scan ------------------------------------------------------------------------


def _pydicom_values(path: Path) -> dict[int, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {tag: str(ds.get(kw, "")).strip() for tag, kw in KEYWORDS.items() if kw in ds}


def _scanned_values(raw: dict[int, bytes]) -> dict[int, str]:
    return {tag: value.decode("ascii").rstrip("\0 ").strip() for tag, value in raw.items()}


def test_scan_agrees_with_pydicom_on_every_real_file_it_accepts() -> None:
    files = [p for p in real_files() if part10(p)]
    if not files:
        pytest.skip("no real DICOM files in shared/data/real")
    accepted = 0
    for path in files:
        data = path.read_bytes()
        raw = header_scan.scan(data[:65536], len(data), WANTED)
        if raw is None:
            continue
        accepted += 1
        assert _scanned_values(raw) == _pydicom_values(path), path
    assert accepted >= len(files) // 2, f"the scan vouched for only {accepted} of {len(files)}"


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_scan_reads_generated_series_and_sequences(tmp_path: Path, syntax: str) -> None:
    from dicom_io.synthetic import write_ct_series

    hu, spacing = small_phantom(slices=2, size=32)
    path = write_ct_series(tmp_path, hu, spacing, transfer_syntax=syntax).paths[0]
    ds = pydicom.dcmread(path)
    # sequences of undefined length, nested, before the UIDs and after them
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator = "T-D3000", "SRT"
    inner = pydicom.Dataset()
    inner.CodeMeaning = "chest"
    item.AnatomicRegionModifierSequence = pydicom.Sequence([inner])
    ds.AnatomicRegionSequence = pydicom.Sequence([item])
    ds.ReferencedImageSequence = pydicom.Sequence([pydicom.Dataset()])
    ds.AnatomicRegionSequence.is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    raw = header_scan.scan(data[:65536], len(data), WANTED)
    assert raw is not None
    assert _scanned_values(raw) == _pydicom_values(path)


def test_scan_declines_what_it_cannot_vouch_for(tmp_path: Path) -> None:
    from dicom_io.synthetic import write_ct_series

    hu, spacing = small_phantom(slices=2, size=32)
    path = write_ct_series(tmp_path, hu, spacing).paths[0]
    data = path.read_bytes()
    assert header_scan.scan(data[:65536], len(data), WANTED) is not None
    # cut short: the pixel data runs past the end of the file
    assert header_scan.scan(data[:65536], len(data) - 10, WANTED) is None
    # the bytes in memory end before the file does, in the middle of the header
    assert header_scan.scan(data[:300], len(data), WANTED) is None
    # no DICM prefix
    assert header_scan.scan(b"\0" * 200, 200, WANTED) is None
    # an element after the pixel data, beyond the bytes in memory
    ds = pydicom.dcmread(path)
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 16)  # Data Set Trailing Padding
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    pixels_end = len(data) - 12 - 16
    assert header_scan.scan(data[:pixels_end], len(data), WANTED) is None
    assert header_scan.scan(data, len(data), WANTED) is not None  # all in memory: fine
    # syntaxes it does not walk
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    other = (tmp_path / "deflated.dcm").read_bytes()
    assert header_scan.scan(other[:65536], len(other), WANTED) is None
    explicit_le = ExplicitVRLittleEndian.encode() + b"\0"
    assert explicit_le in data[:300]  # same length as big endian's UID: swap it in the meta
    other = data.replace(explicit_le, ExplicitVRBigEndian.encode() + b"\0", 1)
    assert header_scan.scan(other[:65536], len(other), WANTED) is None


def test_identify_scanned_equals_identify_on_real_files() -> None:
    files = [p for p in real_files() if part10(p)]
    if not files:
        pytest.skip("no real DICOM files in shared/data/real")
    for path in files:
        data = path.read_bytes()
        fast = _identify_scanned(data[:65536], len(data), None)
        if fast is None:
            continue
        ds = pydicom.dcmread(path, defer_size=16384)
        ids = _identify(ds, None)
        number = ds.get("InstanceNumber")
        assert fast == (ids, None if number in (None, "") else int(number)), path


# -- the seal ---------------------------------------------------------------------------------


def _incoming(path: Path, data: bytes) -> IncomingFile:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
    f = IncomingFile(fd, str(path))
    for i in range(0, len(data), 1000):  # in pieces, as fragments arrive
        f.write(data[i : i + 1000])
    return f


def test_seal_proves_a_file_complete(tmp_path: Path) -> None:
    body = b"\0" * PREAMBLE_BYTES + b"DICM" + os.urandom(50_000)
    f = _incoming(tmp_path / "a.dcm", body)
    assert f.crc == zlib.crc32(body[PREAMBLE_BYTES:]) and f.size == len(body)
    assert bytes(f.head) == body[:65536]
    assert verify_seal(tmp_path / "a.dcm") is None  # not sealed yet
    f.seal()
    f.close()
    sealed = (tmp_path / "a.dcm").read_bytes()
    assert sealed[PREAMBLE_BYTES:] == body[PREAMBLE_BYTES:]  # only the preamble changes
    assert sealed[:PREAMBLE_BYTES].rstrip(b"\0") == seal_bytes(len(body), f.crc).rstrip(b"\0")
    assert verify_seal(tmp_path / "a.dcm") is True
    assert pydicom.misc.is_dicom(tmp_path / "a.dcm")

    (tmp_path / "short.dcm").write_bytes(sealed[:-4096])  # tail never reached the disk
    assert verify_seal(tmp_path / "short.dcm") is False
    hole = bytearray(sealed)
    hole[20_000:24_096] = b"\0" * 4096  # a block that never reached the disk reads as zeros
    (tmp_path / "hole.dcm").write_bytes(bytes(hole))
    assert verify_seal(tmp_path / "hole.dcm") is False


def test_reindexing_refuses_a_file_cut_short_by_a_crash(tmp_path: Path) -> None:
    from dicom_io.synthetic import write_ct_series

    hu, spacing = small_phantom(slices=1, size=64)
    source = write_ct_series(tmp_path / "src", hu, spacing).paths[0]
    ds = pydicom.dcmread(source)
    spool = Spool(tmp_path / "spool")
    rel = spool.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    dest = spool.root / rel
    dest.parent.mkdir(parents=True)
    f = _incoming(dest, source.read_bytes())
    f.seal()
    f.close()
    assert instance_from_spool(spool, dest).sop_uid == ds.SOPInstanceUID
    data = dest.read_bytes()
    dest.write_bytes(data[: len(data) - 8192])
    with pytest.raises(ValueError, match="incomplete"):
        instance_from_spool(spool, dest)


# -- the durable link -------------------------------------------------------------------------


def test_durable_link_files_new_instances_and_replaces_old_ones_safely(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    first = _incoming(spool.incoming / "rx1", b"one" * 1000)
    stored = spool.adopt(
        Path(first.name), "1.2.3", "1.2.3.4", "1.2.3.4.5", fd=first.fd, size=first.size
    )
    first.close()
    assert not stored.replaced
    assert stored.path.read_bytes() == b"one" * 1000
    assert os.stat(stored.path).st_nlink == 2  # the incoming name is the caller's to drop
    Path(first.name).unlink()
    second = _incoming(spool.incoming / "rx2", b"two" * 1000)
    again = spool.adopt(Path(second.name), "1.2.3", "1.2.3.4", "1.2.3.4.5", fd=second.fd)
    second.close()
    assert again.replaced  # through fsync + rename: the old copy may have been acknowledged
    assert stored.path.read_bytes() == b"two" * 1000
    assert not Path(second.name).exists()
    assert [p for p in spool.root.rglob("*") if p.is_file()] == [stored.path]


def test_durable_link_leaves_nothing_when_a_sync_fails(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    f = _incoming(spool.incoming / "rx", b"x" * 5000)
    f.close()
    read_end, write_end = os.pipe()  # a descriptor fdatasync refuses (EINVAL)
    dest = spool.root / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    try:
        with pytest.raises(OSError):
            durable_link(Path(f.name), read_end, dest)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert not dest.exists()
    assert Path(f.name).exists()


# -- end to end through the listener ----------------------------------------------------------


@pytest.fixture
def make_scp(tmp_path: Path) -> Iterator[Callable[..., tuple[StorageSCP, int]]]:
    made: list[tuple[StorageSCP, Database]] = []

    def _make(**kwargs: object) -> tuple[StorageSCP, int]:
        root = tmp_path / f"scp{len(made)}"
        db = Database(f"sqlite:///{root / 'db.sqlite'}")
        scp = StorageSCP(
            Spool(root / "spool"),
            Quarantine(root / "quarantine"),
            IngestRecorder(db),
            **kwargs,  # type: ignore[arg-type]
        )
        made.append((scp, db))
        return scp, scp.start("127.0.0.1", 0)

    yield _make
    for scp, db in made:
        scp.stop()
        db.dispose()


def _send(port: int, paths: list[Path]) -> list[int]:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="RADFINDER")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    statuses = [int(assoc.send_c_store(p).Status) for p in paths]
    assoc.release()
    return statuses


def _stored(scp: StorageSCP) -> dict[str, bytes]:
    with scp.recorder.db.transaction() as s:  # type: ignore[attr-defined]
        rows = s.scalars(select(Instance)).all()
    return {r.sop_uid: (scp.spool.root / r.path).read_bytes() for r in rows}


def test_fast_and_stock_paths_store_the_same_bytes(make_scp, chest_series) -> None:  # type: ignore[no-untyped-def]
    fast, fast_port = make_scp()
    stock, stock_port = make_scp(fast_path=False)
    assert fast.fast_path and not stock.fast_path
    paths = list(chest_series.paths)
    assert _send(fast_port, paths) == [0] * len(paths)
    assert _send(stock_port, paths) == [0] * len(paths)
    ours, theirs = _stored(fast), _stored(stock)
    assert ours.keys() == theirs.keys() and len(ours) == len(paths)
    for uid, data in ours.items():
        assert data[PREAMBLE_BYTES:] == theirs[uid][PREAMBLE_BYTES:]  # identical but the seal
    for scp in (fast, stock):
        files = [p for p in scp.spool.root.rglob("*.dcm") if ".incoming" not in p.parts]
        assert all(verify_seal(p) is True for p in files)
        # nothing left in incoming once the peer has seen the association end (the fast
        # path's spare file for the next request included)
        assert list(scp.spool.incoming.iterdir()) == []


def test_fast_path_serves_storescu_and_duplicates(make_scp, chest_series) -> None:  # type: ignore[no-untyped-def]
    from conftest import storescu

    scp, port = make_scp()
    done = storescu(port, chest_series.paths[0].parent)
    assert done.returncode == 0, done.stderr
    done = storescu(port, chest_series.paths[0].parent)  # again: replaced, one row each
    assert done.returncode == 0, done.stderr
    stored = _stored(scp)
    assert len(stored) == len(chest_series.paths)
    for path in chest_series.paths:
        ds = pydicom.dcmread(path)
        assert pydicom.dcmread(BytesIO(stored[ds.SOPInstanceUID])).PixelData == ds.PixelData
    assert not list(scp.spool.incoming.iterdir())


def test_stock_path_is_used_with_another_pynetdicom(make_scp, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(pynetdicom, "__version__", "9.9.9")
    assert not upper_layer.fast_path_available()
    scp, _ = make_scp()
    assert not scp.fast_path
    with pytest.raises(ValueError, match="needs pynetdicom"):
        make_scp(fast_path=True)


def test_a_data_set_cut_off_by_an_abort_leaves_nothing(make_scp, chest_series) -> None:  # type: ignore[no-untyped-def]
    from pynetdicom.dimse_messages import C_STORE_RQ

    scp, port = make_scp()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADFINDER", max_pdu=4096)
    assert assoc.is_established
    ds = pydicom.dcmread(chest_series.paths[0])
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(encode(ds, False, True))  # the data set only, as sent
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    context_id = int(assoc.accepted_contexts[0].context_id or 0)
    pdatas = list(msg.encode_msg(context_id, 4096))
    assert len(pdatas) > 3
    for pdata in pdatas[:3]:  # the command and the first data set fragments, not the last
        assoc.dul.send_pdu(pdata)
    assert wait_for(lambda: len(list(scp.spool.incoming.iterdir())) >= 1, timeout=5)
    time.sleep(0.2)
    assoc.abort()
    assert wait_for(lambda: not list(scp.spool.incoming.iterdir()), timeout=5)
    assert _stored(scp) == {}


def test_echo_and_events_still_reach_pynetdicom_handlers(make_scp) -> None:  # type: ignore[no-untyped-def]
    scp, port = make_scp()
    seen: list[str] = []

    def on_echo(event: evt.Event) -> int:
        seen.append("echo")
        return 0x0000

    assert scp._server is not None
    scp._server.bind(evt.EVT_C_ECHO, on_echo)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADFINDER")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert seen == ["echo"]


def test_the_peer_decodes_the_hand_encoded_response(make_scp, chest_series) -> None:  # type: ignore[no-untyped-def]
    """What a peer decodes from the hand-encoded response: status, message id, UIDs."""
    _, port = make_scp()
    commands: list[pydicom.Dataset] = []

    def on_dimse(event: evt.Event) -> None:
        commands.append(event.message.command_set)

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="RADFINDER",
        evt_handlers=[
            (evt.EVT_DIMSE_RECV, lambda event: commands.append(event.message.command_set))
        ],
    )
    sent = []
    for i, path in enumerate(chest_series.paths[:3]):
        ds = pydicom.dcmread(path)
        assert assoc.send_c_store(ds, msg_id=40 + i).Status == 0
        sent.append((40 + i, str(ds.SOPInstanceUID)))
    assoc.release()
    assert [
        (c.CommandField, c.MessageIDBeingRespondedTo, c.AffectedSOPInstanceUID, c.Status)
        for c in commands
    ] == [(0x8001, mid, uid, 0) for mid, uid in sent]
    assert all(c.AffectedSOPClassUID == CTImageStorage for c in commands)
    assert all(c.CommandDataSetType == 0x0101 for c in commands)


def test_seal_layout_is_stable() -> None:
    """Files sealed by one release must verify under the next: the layout is a format."""
    seal = seal_bytes(1234, 0xDEADBEEF)
    assert seal[:16] == b"RADFINDER-SEAL-1"
    assert struct.unpack("<QI", seal[16:28]) == (1234, 0xDEADBEEF)


def test_last_received_at_is_exact_once_the_association_ends(make_scp, chest_series) -> None:  # type: ignore[no-untyped-def]
    """Inside an open association the series' timestamp may lag (it is in flight, completion
    ignores it); when the association ends it is the time of the last instance, before the
    series stops counting as in flight."""
    from radfinder_node.models import Series

    scp, port = make_scp()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADFINDER")
    assert assoc.is_established
    db = scp.recorder.db  # type: ignore[attr-defined]
    for path in chest_series.paths[:6]:
        assert assoc.send_c_store(path).Status == 0
    with db.transaction() as s:
        first = s.scalar(select(Instance.received_at).order_by(Instance.id).limit(1))
        last = s.scalar(select(Instance.received_at).order_by(Instance.id.desc()).limit(1))
        lagging = s.scalar(select(Series.last_received_at))
    assert first <= lagging <= last
    assert scp.series_in_flight() == {chest_series.series_uid}
    assoc.release()
    assert wait_for(lambda: not scp.series_in_flight(), timeout=5)
    with db.transaction() as s:
        assert s.scalar(select(Series.last_received_at)) == last


@pytest.mark.parametrize(
    "layout", ["command-in-two-pdus", "command-and-data-in-one-pdu", "unusual-command"]
)
def test_fragmented_packed_and_unusual_requests(make_scp, chest_series, layout: str) -> None:  # type: ignore[no-untyped-def]
    """A command set split over P-DATA PDUs, or sharing one with the first data fragment,
    as PS3.8 allows: the lean path assembles both like pynetdicom; a command set with an
    element it does not expect goes to pynetdicom's own assembly, and is stored all the same."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.pdu_primitives import P_DATA

    scp, port = make_scp()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADFINDER")
    assert assoc.is_established
    ds = pydicom.dcmread(chest_series.paths[0])
    req = C_STORE()
    req.MessageID = 9
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(encode(ds, False, True))
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    if layout == "unusual-command":
        msg.command_set.add_new(0x00000001, "UL", 0)  # Command Length to End (retired)
        msg._set_command_group_length()
    cx = int(assoc.accepted_contexts[0].context_id or 0)
    pdatas = list(msg.encode_msg(cx, 16384))
    [(_, command)] = pdatas[0].presentation_data_value_list
    assert command[0] == 0x03  # one last command fragment, as encoded
    # As pynetdicom's send_c_store does: pause the requestor's reactor so that the response
    # waits in the DIMSE queue for us.
    assoc._reactor_checkpoint.clear()
    assert wait_for(lambda: assoc._is_paused, timeout=5, interval=0.0001)
    if layout == "command-in-two-pdus":
        for control, part in ((0x01, command[1:20]), (0x03, command[20:])):
            p = P_DATA()
            p.presentation_data_value_list = [[cx, bytes([control]) + part]]
            assoc.dul.send_pdu(p)
        rest = pdatas[1:]
    else:
        packed = P_DATA()
        packed.presentation_data_value_list = [
            list(pdv)
            for pdv in (
                *pdatas[0].presentation_data_value_list,
                *pdatas[1].presentation_data_value_list,
            )
        ]
        assoc.dul.send_pdu(packed)
        rest = pdatas[2:]
    for pdata in rest:
        assoc.dul.send_pdu(pdata)
    _, rsp = assoc.dimse.get_msg(block=True)
    assoc._reactor_checkpoint.set()
    assert rsp is not None and rsp.Status == 0 and rsp.MessageIDBeingRespondedTo == 9
    assoc.release()
    stored = _stored(scp)
    assert pydicom.dcmread(BytesIO(stored[ds.SOPInstanceUID])).PixelData == ds.PixelData
