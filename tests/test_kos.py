"""Key Object Selection: validated, read by dsrdump, references exactly the key slices."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, dcmread
from test_sr import (
    ALGORITHM,
    CT,
    WHEN,
    chest_hu,
    dciodvfy,
    dsrdump,
    make_ct,
    needs_dcmtk,
    sample_findings,
    save,
)

from dicom_io.key_images import LUNG_WINDOW, render_key_images, window_to_u8
from dicom_io.kos import build_kos, key_object_description, kos_referenced_sop_uids
from dicom_io.results import FindingResult
from dicom_io.uids import uid_from_key


def kos_for(ct: CT, findings: Sequence[FindingResult], key: str = "job-1") -> Dataset | None:
    return build_kos(
        findings,
        ct.headers,
        series_uid=uid_from_key(f"{key}/kos-series"),
        sop_uid=uid_from_key(f"{key}/kos"),
        series_number=902,
        algorithm=ALGORITHM,
        content_datetime=WHEN,
    )


@pytest.fixture
def ct(tmp_path: Path) -> CT:
    return make_ct(tmp_path)


def expected_keys(findings: Sequence[FindingResult]) -> list[str]:
    out: list[str] = []
    for f in findings:
        if f.present and f.key_sop_instance_uid and f.key_sop_instance_uid not in out:
            out.append(f.key_sop_instance_uid)
    return out


@needs_dcmtk
@pytest.mark.integration
def test_kos_validates_and_references_exactly_the_key_slices(ct: CT, tmp_path: Path) -> None:
    findings = sample_findings(ct.sop_uids)
    kos = kos_for(ct, findings)
    assert kos is not None
    path = save(kos, tmp_path / "kos.dcm")

    assert dciodvfy(path)[0].strip() == "KeyObjectSelectionDocument"
    text = dsrdump(path)
    assert '<CONTAINER:(,,"Of Interest")' in text and "TID 2010" in text
    assert text.count('IMAGE:(,,"Source")') == 3  # four present findings on three slices

    back = dcmread(path)
    keys = expected_keys(findings)
    assert keys == [ct.sop_uids[4], ct.sop_uids[9], ct.sop_uids[12]]
    assert kos_referenced_sop_uids(back) == keys
    title = back.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113000", "DCM")
    assert back.StudyInstanceUID == ct.study_uid
    assert back.SeriesInstanceUID == uid_from_key("job-1/kos-series")
    assert back.Modality == "KO"
    # Evidence of a KOS is what it references, nothing more.
    evidence = [
        ref.ReferencedSOPInstanceUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    ]
    assert sorted(evidence) == sorted(keys)
    assert any(
        e.get("ManufacturerModelName") == ALGORITHM.name for e in back.ContributingEquipmentSequence
    )

    description = next(
        str(i.TextValue)
        for i in back.ContentSequence
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "113012"
    )
    for f in findings:
        assert (f.label in description) is f.present
    # Two findings on one slice share its clause, named by the image number a reader cites.
    number = ct.headers[9].InstanceNumber
    assert f"Atelectasis (0.69), Lung nodule (0.75): image {number}" in description
    assert description in text


def test_no_present_finding_means_no_kos(ct: CT) -> None:
    absent = [f for f in sample_findings(ct.sop_uids) if not f.present]
    assert absent
    assert kos_for(ct, absent) is None


def test_same_job_same_kos_bytes(ct: CT) -> None:
    findings = sample_findings(ct.sop_uids)
    a, b = kos_for(ct, findings), kos_for(ct, findings)
    assert a is not None and b is not None
    first, second = io.BytesIO(), io.BytesIO()
    a.save_as(first, enforce_file_format=True)
    b.save_as(second, enforce_file_format=True)
    assert first.getvalue() == second.getvalue()


def test_key_slice_outside_evidence_is_refused(ct: CT) -> None:
    findings = sample_findings(ct.sop_uids)
    with pytest.raises(ValueError, match="Coronary artery wall calcification: key slice"):
        build_kos(
            findings,
            ct.headers[:10],
            series_uid=uid_from_key("x/s"),
            sop_uid=uid_from_key("x/k"),
            series_number=902,
        )
    assert "instance 2.25." in key_object_description(findings, [*ct.headers[:4], *ct.headers[5:]])


def test_key_image_sheet(ct: CT, tmp_path: Path) -> None:
    """The demo's PNG: one captioned tile per key slice, windowed as asked."""
    hu = chest_hu()
    findings = sample_findings(ct.sop_uids)
    index = {uid: z for z, uid in enumerate(ct.sop_uids)}
    captions: dict[str, list[str]] = {}
    for f in findings:
        if f.present and f.key_sop_instance_uid:
            captions.setdefault(f.key_sop_instance_uid, []).append(f"{f.label} {f.probability:.2f}")
    slices = [(hu[index[uid]], "; ".join(names)) for uid, names in captions.items()]

    out = render_key_images(slices, tmp_path / "demo" / "key-images.png")
    assert out == tmp_path / "demo" / "key-images.png"
    assert [p.name for p in out.parent.iterdir()] == ["key-images.png"]  # no temp file left
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "L"
        sheet = np.asarray(img)
    assert sheet.shape == (256 + 4 * 17 + 8 + 8 + 8, 3 * (256 + 8) + 8)  # one row, 3 tiles
    # Tile 1 (pleural effusion slice): lung black-ish, body grey, air black, in the wide window.
    tile = sheet[8 : 8 + 256, 8 : 8 + 256]
    centre = tile[128, 128]
    assert abs(int(centre) - int(window_to_u8(np.array(40.0), (-1000.0, 400.0)))) <= 2
    assert tile[0, 0] == 0
    # Captions are drawn (white text under each tile).
    assert sheet[8 + 256 + 2 :, :].max() == 255

    lung = render_key_images(slices[:1], tmp_path / "lung.png", window=LUNG_WINDOW)
    with Image.open(lung) as img:
        assert img.size == (256 + 16, 256 + 4 * 17 + 8 + 8 + 8)
    with pytest.raises(ValueError, match="no key slices"):
        render_key_images([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="2-D HU array"):
        render_key_images([(hu, "volume")], tmp_path / "x.png")
    with pytest.raises(ValueError, match="high > low"):
        render_key_images(slices, tmp_path / "x.png", window=(400.0, -1000.0))
    assert window_to_u8(
        np.array([-2000.0, -1000.0, -300.0, 400.0, 900.0]), (-1000.0, 400.0)
    ).tolist() == [
        0,
        0,
        127,
        255,
        255,
    ]
