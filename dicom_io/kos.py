"""Key images as a Key Object Selection document (TID 2010), titled "Of Interest" (DCM 113000).

A KOS is what most PACS viewers show as bookmarks or "key images" next to the study, so the
reader lands on the slice of each present finding without opening the SR. The Key Object
Description names the findings (and the probability) each key slice shows, because a viewer
displays that text and nothing else of the document.

Only the key slices are evidence here: PS3.3 C.17.6.2.1 makes the Current Requested Procedure
Evidence Sequence of a KOS the set of instances it references, nothing more.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Final

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_io.results import AlgorithmInfo, FindingResult
from dicom_io.sr import algorithm_equipment, evidence_by_uid, key_datasets, pin_creation_times
from dicom_io.uids import is_valid_uid

__all__ = [
    "KOS_SERIES_DESCRIPTION",
    "OF_INTEREST",
    "build_kos",
    "key_object_description",
    "kos_referenced_sop_uids",
]

OF_INTEREST: Final = codes.DCM.OfInterest
KOS_SERIES_DESCRIPTION: Final = "RadFinder key images"
# Key Object Description is UT, but viewers show it in one line; keep it readable.
_DESCRIPTION_MAX: Final = 1024


def key_object_description(findings: Sequence[FindingResult], evidence: Sequence[Dataset]) -> str:
    """One clause per key slice: the findings it shows with their probabilities.

    Findings sharing a key slice share its clause, so a reader sees that one image carries both.
    The image number (InstanceNumber) is named where the header has it, as radiologists cite it.
    """
    index = evidence_by_uid(evidence)
    by_slice: dict[str, list[str]] = {}
    for f in findings:
        if f.present and f.key_sop_instance_uid is not None:
            by_slice.setdefault(f.key_sop_instance_uid, []).append(
                f"{f.label} ({f.probability:.2f})"
            )
    clauses = []
    for uid, names in by_slice.items():
        number = index[uid].get("InstanceNumber") if uid in index else None
        where = f"image {number}" if number not in (None, "") else f"instance {uid}"
        clauses.append(f"{', '.join(names)}: {where}")
    text = "AI key images. " + "; ".join(clauses)
    return text if len(text) <= _DESCRIPTION_MAX else text[: _DESCRIPTION_MAX - 3] + "..."


def build_kos(
    findings: Sequence[FindingResult],
    evidence: Sequence[Dataset],
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    instance_number: int = 1,
    algorithm: AlgorithmInfo | None = None,
    institution_name: str | None = None,
    content_datetime: dt.datetime | None = None,
) -> Dataset | None:
    """The KOS bookmarking every present finding's key slice, or None when there is none.

    None rather than an empty document: TID 2010 requires at least one referenced object, and a
    "key images" entry that opens to nothing would only cost the reader a click. The SR still
    records every label, absent ones included. With ``algorithm``, Contributing Equipment names
    it, as in the SR.
    """
    for name, uid in (("series_uid", series_uid), ("sop_uid", sop_uid)):
        if not is_valid_uid(uid):
            raise ValueError(f"{name} is not a valid UID: {uid!r}")
    keys = key_datasets(findings, evidence)
    if not keys:
        return None
    studies = {str(ds.StudyInstanceUID) for ds in keys}
    if len(studies) != 1:
        raise ValueError(f"key slices must come from one study, got {sorted(studies)}")
    content = hd.ko.KeyObjectSelection(
        document_title=OF_INTEREST,
        referenced_objects=keys,
        description=key_object_description(findings, evidence),
    )
    when = content_datetime or dt.datetime.now()
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=keys,
        content=content,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=algorithm.manufacturer if algorithm else "radfinder-node",
        manufacturer_model_name=algorithm.name if algorithm else None,
        software_versions=algorithm.version if algorithm else None,
        contributing_equipment=[algorithm_equipment(algorithm)] if algorithm else None,
        institution_name=institution_name,
        series_description=KOS_SERIES_DESCRIPTION,
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )
    pin_creation_times(kos, when)
    return kos


def kos_referenced_sop_uids(ds: Dataset) -> list[str]:
    """SOP Instance UIDs the document's content references, in document order."""
    if ds.get("ValueType") != "CONTAINER":
        raise ValueError("not a structured document: root content item is not a CONTAINER")
    out = []
    for item in ds.get("ContentSequence") or []:
        if item.get("ValueType") in ("IMAGE", "COMPOSITE") and item.get("ReferencedSOPSequence"):
            out.append(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    return out
