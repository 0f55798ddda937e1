"""The findings as a Comprehensive 3D SR: TID 1500 Measurement Report, as IHE AI Results asks.

A PACS or viewer that knows TID 1500 shows every label's result without knowing this product, so
the document uses only the template's own structure: one TID 1501 measurement group per label,
holding

- the disease concept as the NAME of a qualitative evaluation whose value is Present
  (SCT 52101004) or Absent (SCT 272519000). Not "Finding" (DCM 121071) as the name: the
  template has its own Finding row, and readers that know it read such an item back empty;
- the probability as a NUM "Probability" (DCM 122157) in UCUM "1";
- the algorithm (TID 4019: name, version, parameters, the label's threshold among them);
- for a present finding, the key slice as the group's source image.

The observer is the algorithm as a device (TID 1004), and Contributing Equipment names it, so a
reader can tell machine output from a radiologist's. Labels coded in a private scheme
(``99RADFINDER``) are declared in the Coding Scheme Identification Sequence, as PS3.3 C.12.1
requires for any scheme not in PS3.16 Table 8-1.

The SR joins the source study in its own series; every source header is evidence (Current
Requested Procedure Evidence), since the whole series was read. Only the key slices go into the
Image Library, which needs Rows, Columns and the plane attributes on those headers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Final

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_io.results import OWN_SCHEME, OWN_SCHEME_NAME, AlgorithmInfo, Code, FindingResult
from dicom_io.uids import is_valid_uid, uid_from_key

__all__ = [
    "PROBABILITY",
    "SR_SERIES_DESCRIPTION",
    "algorithm_equipment",
    "build_sr",
    "evidence_by_uid",
    "key_datasets",
    "pin_creation_times",
    "read_sr_probabilities",
]

PROBABILITY: Final = CodedConcept("122157", "DCM", "Probability")
PRESENT: Final = CodedConcept("52101004", "SCT", "Present")
ABSENT: Final = CodedConcept("272519000", "SCT", "Absent")
SR_SERIES_DESCRIPTION: Final = "RadFinder AI results"
_UNIT_ONE: Final = CodedConcept("1", "UCUM", "no units")
# CID 100 has no chest-specific CT entry; "CT unspecified body region" is its CT concept.
_PROCEDURE: Final = codes.cid100.CTUnspecifiedBodyRegion
# Coding schemes of PS3.16 Table 8-1 this module can emit; anything else is declared.
_STANDARD_SCHEMES: Final = frozenset(
    {"DCM", "SCT", "SRT", "LN", "UCUM", "RADLEX", "NCIt", "FMA", "UMLS", "ICD10", "MDC"}
)
# Codes the parser keys on.
_IMAGING_MEASUREMENTS: Final = ("126010", "DCM")
_MEASUREMENT_GROUP: Final = ("125007", "DCM")
_TRACKING_IDENTIFIER: Final = ("112039", "DCM")
_PRESENCE: Final = {("52101004", "SCT"): True, ("272519000", "SCT"): False}


def _concept(code: Code) -> CodedConcept:
    return CodedConcept(code.value, code.scheme, code.meaning, code.scheme_version)


def _coding_schemes(findings: Iterable[FindingResult]) -> list[CodingSchemeIdentificationItem]:
    """One declaration per non-standard scheme used, in first-use order."""
    seen: dict[str, Code] = {}
    for f in findings:
        for code in (f.code, f.finding_site):
            if code is not None and code.scheme not in _STANDARD_SCHEMES:
                seen.setdefault(code.scheme, code)
    items = []
    for scheme, code in seen.items():
        if scheme == OWN_SCHEME:
            items.append(
                CodingSchemeIdentificationItem(
                    designator=scheme,
                    name=OWN_SCHEME_NAME,
                    version=code.scheme_version,
                    responsible_organization="radfinder-node",
                )
            )
        else:
            items.append(CodingSchemeIdentificationItem(designator=scheme))
    return items


def _check_inputs(findings: Sequence[FindingResult], evidence: Sequence[Dataset]) -> None:
    if not findings:
        raise ValueError("an SR needs at least one finding")
    if not evidence:
        raise ValueError("an SR needs the source headers as evidence")
    labels = [f.label for f in findings]
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise ValueError(f"labels must be unique, repeated: {', '.join(duplicates)}")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in evidence}
    if len(studies) != 1 or not is_valid_uid(next(iter(studies))):
        raise ValueError(f"evidence must come from exactly one study, got {sorted(studies)}")


def evidence_by_uid(evidence: Sequence[Dataset]) -> dict[str, Dataset]:
    """Index source headers by SOP Instance UID; a header without one is refused by name."""
    out: dict[str, Dataset] = {}
    for i, ds in enumerate(evidence):
        uid = str(ds.get("SOPInstanceUID", ""))
        if not is_valid_uid(uid) or "SOPClassUID" not in ds:
            raise ValueError(f"evidence item {i} lacks a valid SOPInstanceUID/SOPClassUID")
        out.setdefault(uid, ds)
    return out


def key_datasets(findings: Sequence[FindingResult], evidence: Sequence[Dataset]) -> list[Dataset]:
    """The source header of every present finding's key slice, unique, in finding order.

    A key slice that is not among the evidence is an error: referencing an instance that the
    document does not list as evidence is invalid DICOM, and it means the findings were computed
    on another series.
    """
    index = evidence_by_uid(evidence)
    out: dict[str, Dataset] = {}
    for f in findings:
        uid = f.key_sop_instance_uid
        if not f.present or uid is None or uid in out:
            continue
        if uid not in index:
            raise ValueError(f"{f.label}: key slice {uid} is not one of the evidence instances")
        out[uid] = index[uid]
    return list(out.values())


def _library_images(keys: Sequence[Dataset]) -> list[Dataset]:
    """Key slices that can carry TID 1604 descriptors (single-frame cross-sectional images)."""
    needed = ("Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient")
    out = []
    for ds in keys:
        missing = [k for k in needed if k not in ds]
        if "PerFrameFunctionalGroupsSequence" in ds:
            continue  # enhanced multi-frame: plane attributes live per frame, not at top level
        if missing:
            raise ValueError(
                f"key slice {ds.SOPInstanceUID} lacks {', '.join(missing)}: read the source "
                "headers with stop_before_pixels, not specific_tags"
            )
        out.append(ds)
    return out


def _group(
    f: FindingResult,
    algorithm: AlgorithmInfo,
    keys: dict[str, Dataset],
    sop_uid: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[*algorithm.parameter_strings(), f"threshold={f.threshold:.6g}"],
        manufacturer=algorithm.manufacturer,
    )
    sources = None
    if f.present and f.key_sop_instance_uid is not None:
        key = keys[f.key_sop_instance_uid]
        sources = [
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=key.SOPClassUID,
                referenced_sop_instance_uid=key.SOPInstanceUID,
            )
        ]
    sites = None
    if f.finding_site is not None:
        sites = [hd.sr.FindingSite(anatomic_location=_concept(f.finding_site))]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid_from_key(f"{sop_uid}/tracking/{f.label}"), identifier=f.label
        ),
        algorithm_id=algorithm_id,
        finding_sites=sites,
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=float(f.probability), unit=_UNIT_ONE)
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=_concept(f.code), value=PRESENT if f.present else ABSENT
            )
        ],
        source_images=sources,
    )


def algorithm_equipment(algorithm: AlgorithmInfo) -> hd.ContributingEquipment:
    """Contributing Equipment naming the algorithm, so PACS tell machine output from a human's."""
    return hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        contribution_description="Findings computed by the algorithm",
    )


def build_sr(
    findings: Sequence[FindingResult],
    evidence: Sequence[Dataset],
    algorithm: AlgorithmInfo,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    instance_number: int = 1,
    device_observer_uid: str,
    institution_name: str | None = None,
    content_datetime: dt.datetime | None = None,
) -> Dataset:
    """The SR for one job's findings (see the module docstring for its structure).

    ``evidence`` are the source series' headers (``dcmread(..., stop_before_pixels=True)``), all
    of one study; the SR takes patient and study from them. Pass ``content_datetime`` to make the
    document byte-for-byte reproducible; otherwise highdicom stamps the current time.
    """
    _check_inputs(findings, evidence)
    for name, uid in (("series_uid", series_uid), ("sop_uid", sop_uid)):
        if not is_valid_uid(uid):
            raise ValueError(f"{name} is not a valid UID: {uid!r}")
    if not is_valid_uid(device_observer_uid):
        raise ValueError(f"device_observer_uid is not a valid UID: {device_observer_uid!r}")
    keys = key_datasets(findings, evidence)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid,
            name=algorithm.name,
            manufacturer_name=algorithm.manufacturer,
            model_name=f"{algorithm.name} {algorithm.version}"[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_PROCEDURE,
        imaging_measurements=[
            _group(f, algorithm, {str(k.SOPInstanceUID): k for k in keys}, sop_uid)
            for f in findings
        ],
        referenced_images=_library_images(keys) or None,
    )
    when = content_datetime or dt.datetime.now()
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        series_description=SR_SERIES_DESCRIPTION,
        institution_name=institution_name,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[algorithm_equipment(algorithm)],
        coding_schemes=_coding_schemes(findings) or None,
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )
    pin_creation_times(sr, when)
    return sr


def pin_creation_times(ds: Dataset, when: dt.datetime) -> None:
    """Replace the wall-clock stamps highdicom adds (instance creation, its own Contributing
    Equipment item) with the document's content time, so that the same job with the same time
    writes the same bytes."""
    ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = when.strftime("%H%M%S.%f")
    for item in ds.get("ContributingEquipmentSequence") or []:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S.%f")


# ---------------------------------------------------------------------------------------------
# Reading back


def _name(item: Dataset) -> tuple[str, str]:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return ("", "")
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator))


def _children(item: Dataset) -> Sequence[Dataset]:
    return item.get("ContentSequence") or []


def _find(items: Iterable[Dataset], name: tuple[str, str], value_type: str) -> list[Dataset]:
    return [i for i in items if i.get("ValueType") == value_type and _name(i) == name]


def read_sr_probabilities(ds: Dataset) -> dict[str, tuple[float, bool]]:
    """Label -> (probability, present) from an SR written by :func:`build_sr`.

    Keyed by the group's Tracking Identifier, which is the label: two labels may share a
    finding code (and so a code meaning), never a label. Raises ValueError, naming the group,
    when a group lacks its probability or its Present/Absent evaluation.
    """
    if ds.get("ValueType") != "CONTAINER":
        raise ValueError("not an SR document: root content item is not a CONTAINER")
    containers = _find(_children(ds), _IMAGING_MEASUREMENTS, "CONTAINER")
    if not containers:
        raise ValueError("SR has no Imaging Measurements container (not TID 1500)")
    out: dict[str, tuple[float, bool]] = {}
    for n, group in enumerate(_find(_children(containers[0]), _MEASUREMENT_GROUP, "CONTAINER")):
        items = _children(group)
        tracking = _find(items, _TRACKING_IDENTIFIER, "TEXT")
        label = str(tracking[0].TextValue) if tracking else f"group {n + 1}"
        probability = None
        present = None
        for item in items:
            if item.get("ValueType") == "NUM" and _name(item) == ("122157", "DCM"):
                measured = item.get("MeasuredValueSequence")
                if measured:
                    probability = float(measured[0].NumericValue)
            elif item.get("ValueType") == "CODE" and item.get("ConceptCodeSequence"):
                value = item.ConceptCodeSequence[0]
                key = (str(value.CodeValue), str(value.CodingSchemeDesignator))
                if key in _PRESENCE:
                    present = _PRESENCE[key]
        if probability is None or present is None:
            raise ValueError(f"{label}: measurement group lacks its probability or presence")
        out[label] = (probability, present)
    return out
