"""The C-STORE listener against real peers on loopback: pynetdicom and dcmtk's storescu."""

from __future__ import annotations

import io
import json
import os
import subprocess
from contextlib import redirect_stdout
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from conftest import REAL, storescu, wait_for
from dicom_io.scp import STATUS_CANNOT_UNDERSTAND, STATUS_MISSING_UIDS, STATUS_OUT_OF_RESOURCES
from radfinder_node.models import Instance, QuarantinedObject, Series, SeriesState
from radfinder_node.node import Node
from radfinder_node.status import node_status

pytestmark = pytest.mark.integration


def scu(calling: str = "TESTSCU") -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ae.add_requested_context(CTImageStorage, syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae


def associate(node: Node, ae: AE | None = None):  # type: ignore[no-untyped-def]
    assoc = (ae or scu()).associate("127.0.0.1", node.port, ae_title="RADFINDER")
    assert assoc.is_established
    return assoc


def test_echo(node: Node) -> None:
    assoc = associate(node)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    out = subprocess.run(
        ["echoscu", "-aec", "RADFINDER", "127.0.0.1", str(node.port)], capture_output=True
    )
    assert out.returncode == 0, out.stderr


def test_pynetdicom_store_is_on_disk_and_in_db_and_duplicates_keep_one_copy(
    node: Node, chest_series
) -> None:  # type: ignore[no-untyped-def]
    assoc = associate(node)
    for path in chest_series.paths:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    # the same instances again: still one row and one file each
    for path in chest_series.paths[:5]:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    assoc.release()
    with node.db.transaction() as s:
        rows = s.scalars(select(Instance)).all()
    assert len(rows) == len(chest_series.paths) == 24
    for row in rows:
        stored = node.spool.root / row.path
        original = pydicom.dcmread(next(p for p in chest_series.paths if row.sop_uid in p.name))
        assert pydicom.dcmread(stored).PixelData == original.PixelData
    files = [p for p in node.spool.root.rglob("*") if p.is_file()]
    assert len(files) == 24
    assert not [p for p in files if p.name.endswith(".tmp")]


def test_storescu_series_completes_and_is_selected(node: Node, chest_series) -> None:  # type: ignore[no-untyped-def]
    out = storescu(node.port, chest_series.paths[0].parent)
    assert out.returncode == 0, out.stderr

    def selected() -> bool:
        return node_status(node.db)["series"]["selected"] == 1

    assert wait_for(selected, timeout=10)
    with node.db.transaction() as s:
        series = s.scalars(select(Series)).one()
    assert series.series_uid == chest_series.series_uid
    assert series.state == SeriesState.SELECTED
    assert "chest-ct" in (series.state_reason or "")
    status = node_status(node.db)
    ingest_keys = ("studies", "series", "instances", "quarantined")
    assert {k: status[k] for k in ingest_keys} == {
        "studies": 1,
        "series": {"receiving": 0, "complete": 0, "selected": 1, "ignored": 0},
        "instances": 24,
        "quarantined": 0,
    }


def test_series_not_complete_while_its_association_is_open(node: Node, chest_series) -> None:  # type: ignore[no-untyped-def]
    assoc = associate(node)
    assert assoc.send_c_store(pydicom.dcmread(chest_series.paths[0])).Status == 0
    # quiet period is 0.5 s; the association stays open, so the series must stay receiving
    assert not wait_for(lambda: node_status(node.db)["series"]["receiving"] == 0, timeout=1.5)
    assoc.release()
    assert wait_for(lambda: node_status(node.db)["series"]["ignored"] == 1, timeout=5)
    # one slice is too few for the chest rule: ignored, and the reason says why
    with node.db.transaction() as s:
        series = s.scalars(select(Series)).one()
    assert series.state == SeriesState.IGNORED
    assert "n_frames" in (series.state_reason or "")


def test_disallowed_calling_ae_is_rejected(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node(allowed_calling_aes=["PACS"])
    assoc = scu("INTRUDER").associate("127.0.0.1", node.port, ae_title="RADFINDER")
    assert assoc.is_rejected
    assoc = scu("PACS").associate("127.0.0.1", node.port, ae_title="RADFINDER")
    assert assoc.is_established
    assoc.release()


def _raw_file(tmp_path: Path, body: bytes, sop_uid: str = "1.2.3.4.5.6") -> Path:
    """A Part 10 file with valid meta and an arbitrary (possibly broken) data set body."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / f"{sop_uid}.dcm"
    out = BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    path.write_bytes(out.getvalue() + body)
    return path


@pytest.fixture
def chunked_send():  # type: ignore[no-untyped-def]
    """Send files byte for byte (pynetdicom reads only the file meta), to deliver broken data."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = old


def test_bad_input_is_quarantined_and_the_association_goes_on(
    node: Node, chest_series, tmp_path: Path, chunked_send: None
) -> None:  # type: ignore[no-untyped-def]
    # an element claiming 0x7FFFFFF0 bytes: the data set cannot be decoded
    garbage = _raw_file(tmp_path, b"\x10\x00\x10\x00PN\xf0\xff" + b"\x01" * 64, "1.2.3.4.5.6")
    # a decodable data set without Study/Series Instance UIDs
    ds = pydicom.dcmread(chest_series.paths[0])
    del ds.StudyInstanceUID
    ds.SOPInstanceUID = "1.2.3.4.5.7"
    no_uids = tmp_path / "nouid.dcm"
    ds.save_as(no_uids, enforce_file_format=True)
    # a Series Instance UID that would escape the spool if it became a path
    ds = pydicom.dcmread(chest_series.paths[1])
    ds.SeriesInstanceUID = "1.2.3/../../../etc"
    ds.SOPInstanceUID = "1.2.3.4.5.8"
    evil = tmp_path / "evil.dcm"
    ds.save_as(evil, enforce_file_format=True)

    assoc = associate(node)
    assert assoc.send_c_store(garbage).Status == STATUS_CANNOT_UNDERSTAND
    assert assoc.send_c_store(no_uids).Status == STATUS_MISSING_UIDS
    assert assoc.send_c_store(evil).Status == STATUS_MISSING_UIDS
    assert assoc.send_c_store(chest_series.paths[2]).Status == 0x0000  # goes on
    assoc.release()

    with node.db.transaction() as s:
        quarantined = s.scalars(select(QuarantinedObject).order_by(QuarantinedObject.id)).all()
        assert s.scalar(select(Instance.sop_uid)) == chest_series.sop_uids[2]
    assert [q.status for q in quarantined] == [0xC210, 0xC211, 0xC211]
    assert "undecodable" in quarantined[0].reason
    assert "StudyInstanceUID" in quarantined[1].reason
    assert "not a valid DICOM UID" in quarantined[2].reason
    for q, source in zip(quarantined, [garbage, no_uids, evil], strict=True):
        kept = node.quarantine.root / q.path
        # the quarantined copy holds exactly the data set bytes the peer sent
        assert kept.read_bytes().endswith(source.read_bytes()[-60:])
        assert json.loads(kept.with_suffix(".json").read_text())["reason"] == q.reason
    assert not list(Path("/etc").glob("*.dcm"))
    assert not [p for p in node.spool.root.rglob("*") if ".." in p.name or "etc" in p.parts]


def test_full_disk_answers_out_of_resources(make_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    from conftest import small_phantom
    from dicom_io.synthetic import write_ct_series

    hu, spacing = small_phantom(slices=6, size=512)
    series = write_ct_series(tmp_path / "big", hu, spacing)
    data = tmp_path / "tiny"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(data)], check=True)
    try:
        node = make_node(data_dir=data, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}")
        assoc = associate(node)
        statuses = [assoc.send_c_store(pydicom.dcmread(p)).Status for p in series.paths]
        assoc.release()
        assert statuses[0] == 0x0000
        assert STATUS_OUT_OF_RESOURCES in statuses
        stored = [p for p in (data / "spool").rglob("*") if p.is_file()]
        assert not [p for p in stored if p.name.endswith(".tmp")]  # nothing half-written
        with node.db.transaction() as s:
            rows = s.scalars(select(Instance.path)).all()
        assert sorted(rows) == sorted(str(p.relative_to(data / "spool")) for p in stored)
        assert statuses.count(0) == len(rows)
        node.stop()
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def _send_files(node: Node, files: list[Path]) -> list[int]:
    """One association, a context per (class, syntax) as in each file's meta."""
    ae = AE(ae_title="TESTSCU")
    for f in files:
        meta = pydicom.dcmread(f, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RADFINDER")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(f).Status) for f in files]
    assoc.release()
    return statuses


def test_compressed_syntaxes_are_stored_byte_exact(
    node: Node, tmp_path: Path, chunked_send: None
) -> None:
    """Every compressed syntax we claim, from our writer, plus dcm4che's real JPEG Lossless."""
    from conftest import small_phantom
    from dicom_io.synthetic import SUPPORTED_TRANSFER_SYNTAXES, write_ct_series

    hu, spacing = small_phantom(slices=2, size=64)
    files = [REAL / "dcm4che/dcm4che-test-data/src/main/resources/CT-JPEGLosslessSV1.dcm"]
    for i, syntax in enumerate(SUPPORTED_TRANSFER_SYNTAXES):
        series = write_ct_series(
            tmp_path / str(syntax), hu, spacing, transfer_syntax=syntax, series_number=10 + i
        )
        files.append(series.paths[0])
    assert _send_files(node, files) == [0] * len(files)
    with node.db.transaction() as s:
        rows = {r.sop_uid: r for r in s.scalars(select(Instance)).all()}
    syntaxes = set()
    for f in files:
        ds = pydicom.dcmread(f)
        row = rows[ds.SOPInstanceUID]
        syntaxes.add(row.transfer_syntax_uid)
        assert row.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
        stored = pydicom.dcmread(node.spool.root / row.path)
        assert stored.PixelData == ds.PixelData  # as sent, never transcoded
        assert (stored.pixel_array == ds.pixel_array).all()
    assert {
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.5",
    } <= syntaxes


def test_instances_without_uids_from_totalsegmentator_are_quarantined(
    node: Node, chunked_send: None
) -> None:
    """The TotalSegmentator series has empty SOP Class, SOP Instance, Study and Series UIDs in
    its data sets (only the file meta has class and instance). storescu refuses to send them; a
    PACS that does gets 0xC211 for each: a study cannot be filed without its UIDs, and inventing
    them would split or merge studies. The bytes are kept in quarantine."""
    files = sorted((REAL / "totalsegmentator/example_ct_dicom").glob("*"))
    assert len(files) == 20
    assert _send_files(node, files) == [STATUS_MISSING_UIDS] * 20
    with node.db.transaction() as s:
        reasons = s.scalars(select(QuarantinedObject.reason)).all()
        assert s.scalar(select(Instance.id)) is None
    assert len(reasons) == 20 and all("StudyInstanceUID" in r for r in reasons)
    kept = sorted(p.stat().st_size for p in node.quarantine.root.rglob("*.dcm"))
    assert len(kept) == 20


@pytest.mark.slow
def test_storescu_every_real_series_then_volume(node: Node, tmp_path: Path) -> None:
    """storescu -> node -> `radfinder-node volume` on every series in shared/data/real."""
    from radfinder_node.cli import main

    sources = [
        REAL / "lung-pet-ct-dx",
        REAL / "dcm_qa_ct",
        REAL / "dcm4che/dcm4che-test-data",
    ]
    for src in sources:
        # -xs proposes JPEG Lossless SV1 too (the Elscint slice is sent as it is)
        syntax = ["-xs"] if "dcm4che" in str(src) else []
        out = storescu(node.port, src, *syntax, "-nh")
        assert out.returncode == 0, out.stderr[-2000:]
        assert "Store Failed" not in out.stderr, out.stderr[-2000:]
    assert wait_for(lambda: node_status(node.db)["series"]["receiving"] == 0, timeout=20)
    assert wait_for(lambda: node_status(node.db)["series"]["complete"] == 0, timeout=10)
    with node.db.transaction() as s:
        series = s.scalars(select(Series)).all()
        counts = {
            sr.series_uid: s.query(Instance).filter(Instance.series_id == sr.id).count()
            for sr in series
        }
        study_of = {sr.series_uid: sr.study.study_uid for sr in series}
    volumes = {}
    for sr in series:
        buf = io.StringIO()
        with redirect_stdout(buf):
            rc = main(
                ["volume", str(node.spool.root / study_of[sr.series_uid] / sr.series_uid), "--json"]
            )
        volumes[sr.series_uid] = json.loads(buf.getvalue())
        assert rc == (0 if volumes[sr.series_uid]["ok"] else 2)

    # 4 lung-pet-ct-dx series, GE tilt, Philips tilt + scout + summary, Philips axial, Elscint
    assert len(series) == 10, [(sr.attributes, counts[sr.series_uid]) for sr in series]
    loaded = sorted(v["slice_count"] for v in volumes.values() if v["ok"])
    assert loaded == [1, 28, 30, 30, 64, 64]
    for sr in series:
        v = volumes[sr.series_uid]
        assert (v["slice_count"] == counts[sr.series_uid]) if v["ok"] else v["reason"]
    tilted = [v for v in volumes.values() if not v["ok"] and "tilt" in v["reason"].lower()]
    assert len(tilted) == 2  # GE (tilt and uneven gaps) and Philips S2010

    # one series per lung-pet-ct-dx study, the soft kernel; nothing else is a chest CT
    selected = [sr for sr in series if sr.state == SeriesState.SELECTED]
    assert sorted(sr.attributes["ConvolutionKernel"] for sr in selected) == ["B", "B40f"]
    scout = [sr for sr in series if "LOCALIZER" in sr.attributes.get("ImageType", [])]
    summary = [sr for sr in series if sr.attributes["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.7"]
    assert len(scout) == 1 and len(summary) == 1
    assert scout[0].state == SeriesState.IGNORED and "LOCALIZER" in (scout[0].state_reason or "")
    assert summary[0].state == SeriesState.IGNORED
    assert "SOPClassUID" in (summary[0].state_reason or "")
    assert not volumes[scout[0].series_uid]["ok"] and not volumes[summary[0].series_uid]["ok"]
    for sr in series:
        assert sr.state in (SeriesState.SELECTED, SeriesState.IGNORED) and sr.state_reason


def test_one_structured_log_line_per_association(
    node: Node, chest_series, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level("INFO", logger="dicom_io.scp")
    assoc = associate(node, scu("LOGGER"))
    for path in chest_series.paths[:3]:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
    assoc.release()
    assert wait_for(lambda: any(r.msg == "association closed" for r in caplog.records))
    [record] = [r for r in caplog.records if r.msg == "association closed"]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["calling_ae"] == "LOGGER"
    assert fields["instances"] == 3 and fields["failures"] == 0 and fields["series"] == 1
    assert fields["bytes"] > 3 * 64 * 64 * 2
    assert fields["peer"].startswith("127.0.0.1:") and fields["duration_s"] >= 0


def test_node_on_postgresql(make_node, pg_url: str, chest_series) -> None:  # type: ignore[no-untyped-def]
    node = make_node(database_url=pg_url)
    assert node.db.engine.dialect.name == "postgresql"
    out = storescu(node.port, chest_series.paths[0].parent)
    assert out.returncode == 0 and "Store Failed" not in out.stderr
    assert wait_for(lambda: node_status(node.db)["series"]["selected"] == 1, timeout=10)
    assert node_status(node.db)["instances"] == 24
