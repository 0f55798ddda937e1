"""The findings SR: validated by dciodvfy, read by dsrdump, and read back by our own parser."""

from __future__ import annotations

import datetime as dt
import io
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread

from dicom_io.results import OWN_SCHEME, AlgorithmInfo, Code, FindingResult
from dicom_io.sr import build_sr, read_sr_probabilities
from dicom_io.synthetic import write_ct_series, write_enhanced_ct
from dicom_io.uids import uid_from_key

needs_dcmtk = pytest.mark.skipif(
    shutil.which("dciodvfy") is None or shutil.which("dsrdump") is None,
    reason="dicom3tools dciodvfy and dcmtk dsrdump are required",
)

ALGORITHM = AlgorithmInfo(
    name="RadFinder test", version="0.3.1", parameters={"engine": "onnxruntime", "bundle": "t"}
)
WHEN = dt.datetime(2025, 3, 4, 5, 6, 7)
SLICES = 16

# Codes as in engines/bundle.py LABEL_CODES; "Hiatal hernia" and "Atelectasis" use the
# project's own scheme, and the two calcifications share one finding code on purpose.
_VASC = Code("237897009", "SCT", "Vascular Calcification")


@dataclass(frozen=True)
class CT:
    paths: tuple[Path, ...]
    headers: Sequence[Dataset]
    study_uid: str
    sop_uids: tuple[str, ...]


def chest_hu(slices: int = SLICES, size: int = 48) -> np.ndarray:
    """Air, a water-density body and two lungs: enough anatomy for windows and captions."""
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    body = ((yy - c) / (0.42 * size)) ** 2 + ((xx - c) / (0.47 * size)) ** 2 <= 1
    lung_l = ((yy - c) / (0.3 * size)) ** 2 + ((xx - 0.3 * size) / (0.14 * size)) ** 2 <= 1
    lung_r = ((yy - c) / (0.3 * size)) ** 2 + ((xx - 0.7 * size) / (0.14 * size)) ** 2 <= 1
    plane = np.where(body, 40.0, -1000.0)
    plane[lung_l | lung_r] = -850.0
    vol = np.repeat(plane[None].astype(np.float32), slices, axis=0)
    vol[slices // 2, int(c) - 2 : int(c) + 2, int(0.3 * size) : int(0.3 * size) + 4] = 60.0
    return vol


def make_ct(tmp: Path, seed: str = "sr-test", **options: object) -> CT:
    series = write_ct_series(tmp / "ct", chest_hu(), (2.5, 0.8, 0.8), seed=seed, **options)  # type: ignore[arg-type]
    headers = [dcmread(p, stop_before_pixels=True) for p in series.paths]
    return CT(series.paths, headers, series.study_uid, series.sop_uids)


def sample_findings(sop_uids: Sequence[str]) -> list[FindingResult]:
    """Present and absent, private and standard codes, a shared key slice, a shared code."""
    return [
        FindingResult(
            "Pleural effusion",
            Code("60046008", "SCT", "Pleural effusion"),
            0.9125,
            0.5,
            True,
            sop_uids[4],
            -8.75,
        ),
        FindingResult(
            "Hiatal hernia",
            Code("RF006", OWN_SCHEME, "Hiatal hernia"),
            0.125,
            0.4,
            False,
            None,
            None,
        ),
        FindingResult(
            "Atelectasis",
            Code("RF009", OWN_SCHEME, "Atelectasis"),
            0.6875,
            0.45,
            True,
            sop_uids[9],
            3.75,
        ),
        FindingResult(
            "Lung nodule",
            Code("27925004", "SCT", "Nodule"),
            0.75,
            0.5,
            True,
            sop_uids[9],
            3.75,
            finding_site=Code("39607008", "SCT", "Lung"),
        ),
        FindingResult(
            "Arterial wall calcification",
            _VASC,
            0.0625,
            0.5,
            False,
            None,
            None,
            finding_site=Code("51114001", "SCT", "Artery"),
        ),
        FindingResult(
            "Coronary artery wall calcification",
            _VASC,
            0.5625,
            0.5,
            True,
            sop_uids[12],
            11.25,
            finding_site=Code("41801008", "SCT", "Coronary artery"),
        ),
    ]


def sr_for(ct: CT, findings: Sequence[FindingResult], key: str = "job-1") -> Dataset:
    return build_sr(
        findings,
        ct.headers,
        ALGORITHM,
        series_uid=uid_from_key(f"{key}/sr-series"),
        sop_uid=uid_from_key(f"{key}/sr"),
        series_number=901,
        device_observer_uid=uid_from_key("device/test"),
        institution_name="Test Hospital",
        content_datetime=WHEN,
    )


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's messages; fails the test on any Error line (warnings are printed)."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    for ln in lines:
        print(f"dciodvfy {path.name}: {ln}")
    errors = [ln for ln in lines if ln.startswith("Error")]
    assert not errors, "\n".join(errors)
    return lines


def dsrdump(path: Path) -> str:
    proc = subprocess.run(
        ["dsrdump", "-v", "+Pt", "+Pl", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert not [ln for ln in proc.stderr.splitlines() if ln.startswith(("E:", "F:"))], proc.stderr
    return proc.stdout


def _walk(items: Sequence[Dataset]) -> list[Dataset]:
    out = []
    for item in items:
        out.append(item)
        out.extend(_walk(item.get("ContentSequence") or []))
    return out


def _groups(sr: Dataset) -> dict[str, Dataset]:
    imaging = next(
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"
    )
    out = {}
    for group in imaging.ContentSequence:
        tracking = next(
            i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112039"
        )
        out[str(tracking.TextValue)] = group
    return out


@pytest.fixture
def ct(tmp_path: Path) -> CT:
    return make_ct(tmp_path)


@needs_dcmtk
@pytest.mark.integration
def test_sr_validates_and_dsrdump_shows_every_label(ct: CT, tmp_path: Path) -> None:
    findings = sample_findings(ct.sop_uids)
    path = save(sr_for(ct, findings), tmp_path / "sr.dcm")

    lines = dciodvfy(path)
    assert lines[0].strip() == "Comprehensive3DSR"
    text = dsrdump(path)
    assert '"Imaging Measurement Report"' in text and "TID 1500" in text
    for f in findings:
        assert f'TEXT:(,,"Tracking Identifier")="{f.label}"' in text
        state = '(52101004,SCT,"Present")' if f.present else '(272519000,SCT,"Absent")'
        assert f'CODE:(,,"{f.code.meaning}")={state}' in text
        assert f'NUM:(,,"Probability")="{f.probability}" (1,UCUM,"no units")' in text
    assert '"Algorithm Name")="RadFinder test"' in text
    assert '"Algorithm Version")="0.3.1"' in text
    assert '"Algorithm Parameters")="engine=onnxruntime"' in text
    assert '"Device Observer UID")="' + uid_from_key("device/test") + '"' in text
    assert text.count('IMAGE:(,,"Source of Measurement")') == 4  # one per present finding


def test_probabilities_round_trip(ct: CT, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    findings = [
        FindingResult(
            f.label,
            f.code,
            float(rng.random()),  # full float64 precision, as a model produces
            f.threshold,
            f.present,
            f.key_sop_instance_uid,
            f.key_z_mm,
            f.finding_site,
        )
        for f in sample_findings(ct.sop_uids)
    ]
    back = read_sr_probabilities(dcmread(save(sr_for(ct, findings), tmp_path / "sr.dcm")))
    assert list(back) == [f.label for f in findings]  # both calcifications kept apart
    for f in findings:
        prob, present = back[f.label]
        assert present is f.present
        assert prob == pytest.approx(f.probability, abs=1e-9)


def test_structure_follows_tid_1500_and_ihe_air(ct: CT, tmp_path: Path) -> None:
    findings = sample_findings(ct.sop_uids)
    sr = dcmread(save(sr_for(ct, findings), tmp_path / "sr.dcm"))

    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.StudyInstanceUID == ct.study_uid
    assert sr.SeriesInstanceUID == uid_from_key("job-1/sr-series")
    assert sr.SeriesInstanceUID != ct.headers[0].SeriesInstanceUID
    assert sr.SOPInstanceUID == uid_from_key("job-1/sr")
    assert sr.PatientID == ct.headers[0].PatientID
    assert sr.Modality == "SR" and sr.CompletionFlag == "COMPLETE"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.InstitutionName == "Test Hospital"

    # Private scheme declared as PS3.3 C.12.1 requires; standard ones are not.
    declared = {i.CodingSchemeDesignator: i for i in sr.CodingSchemeIdentificationSequence}
    assert set(declared) == {OWN_SCHEME}
    assert declared[OWN_SCHEME].CodingSchemeResponsibleOrganization == "radfinder-node"

    equipment = [
        e
        for e in sr.ContributingEquipmentSequence
        if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
        and e.get("ManufacturerModelName") == "RadFinder test"
    ]
    assert len(equipment) == 1
    assert equipment[0].ManufacturerModelName == "RadFinder test"
    assert equipment[0].SoftwareVersions == "0.3.1"

    # Every source slice is evidence; the key slices are the only images in the tree.
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == set(ct.sop_uids)

    items = _walk(sr.ContentSequence)
    finding_named = [
        i
        for i in items
        if "ConceptNameCodeSequence" in i
        and i.ConceptNameCodeSequence[0].CodeValue == "121071"  # "Finding"
    ]
    assert finding_named == []

    groups = _groups(sr)
    assert list(groups) == [f.label for f in findings]
    for f in findings:
        content = groups[f.label].ContentSequence
        codes_ = [i for i in content if i.ValueType == "CODE" and "ConceptCodeSequence" in i]
        evaluation = [
            i for i in codes_ if i.ConceptCodeSequence[0].CodeValue in ("52101004", "272519000")
        ]
        assert len(evaluation) == 1
        name = evaluation[0].ConceptNameCodeSequence[0]
        assert (name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning) == (
            f.code.value,
            f.code.scheme,
            f.code.meaning,
        )
        value = evaluation[0].ConceptCodeSequence[0]
        assert value.CodeValue == ("52101004" if f.present else "272519000")
        assert value.CodingSchemeDesignator == "SCT"

        num = [i for i in content if i.ValueType == "NUM"]
        assert len(num) == 1
        unit = num[0].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
        assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")

        params = [
            str(i.TextValue)
            for i in content
            if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "111002"
        ]
        assert params == ["bundle=t", "engine=onnxruntime", f"threshold={f.threshold:g}"]

        images = [
            i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for i in content
            if i.ValueType == "IMAGE"
        ]
        assert images == ([f.key_sop_instance_uid] if f.present else [])

        sites = [
            i.ConceptCodeSequence[0].CodeValue
            for i in codes_
            if i.ConceptNameCodeSequence[0].CodeValue == "363698007"
        ]
        assert sites == ([f.finding_site.value] if f.finding_site else [])


def test_same_job_same_bytes(ct: CT) -> None:
    """A job that runs twice writes the same object, so PACS keeps one copy."""
    findings = sample_findings(ct.sop_uids)
    first, second = io.BytesIO(), io.BytesIO()
    sr_for(ct, findings).save_as(first, enforce_file_format=True)
    sr_for(ct, findings).save_as(second, enforce_file_format=True)
    assert first.getvalue() == second.getvalue()
    other = sr_for(ct, findings, key="job-2")
    assert other.SOPInstanceUID != dcmread(io.BytesIO(first.getvalue())).SOPInstanceUID


def test_uid_from_key_is_deterministic_and_valid() -> None:
    from dicom_io.uids import is_valid_uid

    a, b = uid_from_key("series-1/bundle-1.0/sr"), uid_from_key("series-1/bundle-1.0/kos")
    assert a == uid_from_key("series-1/bundle-1.0/sr")
    assert a != b
    assert a.startswith("2.25.") and is_valid_uid(a) and is_valid_uid(b)
    with pytest.raises(ValueError):
        uid_from_key("")


@pytest.mark.slow
@needs_dcmtk
@pytest.mark.integration
def test_all_bundle_label_codes_validate(ct: CT, tmp_path: Path) -> None:
    """The 18 production labels with their real codes (engines/bundle.py)."""
    from engines.bundle import LABEL_CODES

    rng = np.random.default_rng(18)
    findings = []
    for n, (label, (code, site)) in enumerate(LABEL_CODES.items()):
        p = float(rng.random())
        present = p >= 0.5
        findings.append(
            FindingResult(
                label,
                Code(code.value, code.scheme, code.meaning),
                p,
                0.5,
                present,
                ct.sop_uids[n % SLICES] if present else None,
                None,
                Code(site.value, site.scheme, site.meaning) if site else None,
            )
        )
    path = save(sr_for(ct, findings), tmp_path / "sr18.dcm")
    dciodvfy(path)
    dsrdump(path)
    back = read_sr_probabilities(dcmread(path))
    assert len(back) == 18
    assert {k: v[1] for k, v in back.items()} == {f.label: f.present for f in findings}


@needs_dcmtk
@pytest.mark.integration
def test_enhanced_ct_evidence(tmp_path: Path) -> None:
    """A multi-frame source: the key slice is the one instance, no image library entry."""
    series = write_enhanced_ct(tmp_path / "enh.dcm", chest_hu(), (2.5, 0.8, 0.8), seed="enh")
    header = dcmread(series.paths[0], stop_before_pixels=True)
    findings = [
        FindingResult(
            "Pleural effusion",
            Code("60046008", "SCT", "Pleural effusion"),
            0.8,
            0.5,
            True,
            series.sop_uids[0],
            0.0,
        )
    ]
    sr = build_sr(
        findings,
        [header],
        ALGORITHM,
        series_uid=uid_from_key("enh/sr-series"),
        sop_uid=uid_from_key("enh/sr"),
        series_number=901,
        device_observer_uid=uid_from_key("device/test"),
        content_datetime=WHEN,
    )
    path = save(sr, tmp_path / "sr.dcm")
    dciodvfy(path)
    assert "Image Library" not in dsrdump(path)
    assert read_sr_probabilities(dcmread(path)) == {"Pleural effusion": (0.8, True)}


def test_bad_inputs_are_refused_by_name(ct: CT, tmp_path: Path) -> None:
    findings = sample_findings(ct.sop_uids)
    with pytest.raises(ValueError, match=r"Pleural effusion: key slice .* not one of the evidence"):
        build_sr(
            findings,
            ct.headers[5:],
            ALGORITHM,
            series_uid=uid_from_key("x/s"),
            sop_uid=uid_from_key("x/i"),
            series_number=9,
            device_observer_uid=uid_from_key("d"),
        )
    with pytest.raises(ValueError, match="repeated: Hiatal hernia"):
        sr_for(ct, [*findings, findings[1]])
    other = make_ct(tmp_path / "other", seed="other-study")
    with pytest.raises(ValueError, match="exactly one study"):
        build_sr(
            findings,
            [*ct.headers, other.headers[0]],
            ALGORITHM,
            series_uid=uid_from_key("x/s"),
            sop_uid=uid_from_key("x/i"),
            series_number=9,
            device_observer_uid=uid_from_key("d"),
        )
    with pytest.raises(ValueError, match="sop_uid is not a valid UID"):
        build_sr(
            findings,
            ct.headers,
            ALGORITHM,
            series_uid=uid_from_key("x/s"),
            sop_uid="1.02.3",
            series_number=9,
            device_observer_uid=uid_from_key("d"),
        )
    with pytest.raises(ValueError, match="probability must be a number in"):
        FindingResult("X", Code("1", "SCT", "X"), 1.5, 0.5, True, None, None)
    with pytest.raises(ValueError, match="probability must be a number in"):
        FindingResult("X", Code("1", "SCT", "X"), float("nan"), 0.5, True, None, None)
    with pytest.raises(ValueError, match="absent finding has no key slice"):
        FindingResult("X", Code("1", "SCT", "X"), 0.1, 0.5, False, ct.sop_uids[0], None)
    with pytest.raises(ValueError, match="lacks its probability or presence"):
        sr = sr_for(ct, findings)
        group = _groups(sr)["Atelectasis"]
        group.ContentSequence = [i for i in group.ContentSequence if i.ValueType != "NUM"]
        read_sr_probabilities(sr)
    with pytest.raises(ValueError, match="not an SR document"):
        read_sr_probabilities(ct.headers[0])
