"""HL7 v2 ORU^R01 radiology results: the message a RIS sends when a report is signed.

The node's HL7 listener, its report linking and the snippet miner must be exercised on messages
shaped like a real RIS's, so this writer follows what IHE Radiology and common RIS send:

- ORC/OBR carry the placer and filler order numbers; the accession number is OBR-18 (Placer
  Field 1, where IHE Scheduled Workflow puts it) and, unless a separate filler order number is
  given, also OBR-3 (many RIS use the accession as filler order number).
- OBR-25 and every OBX-11 carry the result status (F final, C corrected, P preliminary).
- The report is one TX OBX per line, in order, so that the line structure survives; a report
  given as sections gets one OBX-4 sub-id per section and a LOINC section code in OBX-3.
- The Study Instance UID travels in an OBX with observation id ``113014^DICOM Study^DCM`` and
  value type HD (OBX-5 holds the UID as the HD's first component), the reference IHE uses to tie
  a report to its DICOM study.

Text is escaped (``\\F\\``, ``\\S\\``, ``\\T\\``, ``\\R\\``, ``\\E\\``), segments end with a
carriage return, and the message is UTF-8 (declared in MSH-18) so German reports keep umlauts.
Pure functions of their arguments: no clock, no randomness, no engines or DICOM imports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Final

__all__ = [
    "FIELD_SEPARATOR",
    "MLLP_END",
    "MLLP_START",
    "SECTION_CODES",
    "STUDY_UID_OBSERVATION",
    "escape",
    "hl7_datetime",
    "mllp_frame",
    "oru_r01",
    "unescape",
]

FIELD_SEPARATOR: Final = "|"
_ENCODING_CHARACTERS: Final = "^~\\&"
MLLP_START: Final = b"\x0b"
MLLP_END: Final = b"\x1c\r"

# LOINC report section codes (the ones DICOM PS3.20 and HL7 CDA imaging reports use), keyed by a
# normalised section name; text that is not split into sections is a whole radiology report.
SECTION_CODES: Final[Mapping[str, str]] = {
    "clinicalinformation": "55752-0^Clinical information^LN",
    "technique": "55111-9^Current imaging procedure descriptions^LN",
    "findings": "59776-5^Procedure findings^LN",
    "impressions": "19005-8^Radiology Imaging study [Impression] (narrative)^LN",
    "impression": "19005-8^Radiology Imaging study [Impression] (narrative)^LN",
}
_WHOLE_REPORT: Final = "18782-3^Radiology Study observation (narrative)^LN"
STUDY_UID_OBSERVATION: Final = "113014^DICOM Study^DCM"
_RESULT_STATUSES: Final = frozenset({"F", "C", "P", "X", "A", "R", "S", "I", "O"})


def escape(text: str) -> str:
    """HL7 v2 escape of one field value (escape character first, so nothing is escaped twice)."""
    return (
        text.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("&", "\\T\\")
        .replace("~", "\\R\\")
    )


def unescape(text: str) -> str:
    """Inverse of :func:`escape` (hl7apy returns field values still escaped)."""
    table = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}
    out: list[str] = []
    i = 0
    while i < len(text):
        end = text.find("\\", i + 1) if text[i] == "\\" else -1
        if end > i and text[i + 1 : end] in table:
            out.append(table[text[i + 1 : end]])
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def hl7_datetime(value: datetime | date) -> str:
    """DTM as YYYYMMDDHHMMSS (+ZZZZ when the datetime knows its zone); a date as YYYYMMDD."""
    if not isinstance(value, datetime):
        return value.strftime("%Y%m%d")
    text = value.strftime("%Y%m%d%H%M%S")
    offset = value.utcoffset()
    if offset is not None:
        minutes = int(offset.total_seconds()) // 60
        sign = "+" if minutes >= 0 else "-"
        text += f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    return text


def _segment(name: str, fields: Mapping[int, str]) -> str:
    """A segment from field number -> already escaped value; missing fields stay empty."""
    values = [""] * (max(fields) + 1)
    values[0] = name
    for number, value in fields.items():
        values[number] = value
    while len(values) > 2 and not values[-1]:
        values.pop()
    return FIELD_SEPARATOR.join(values)


def _components(value: str) -> str:
    """Escape each ``^``-separated component of a composite given in HL7 form ("Doe^John")."""
    return "^".join(escape(part) for part in value.split("^"))


def _section_code(name: str) -> str:
    key = "".join(ch for ch in name.lower() if ch.isalpha())
    for suffix in ("en", "de"):
        if key not in SECTION_CODES and key.endswith(suffix):
            key = key[: -len(suffix)]
    return SECTION_CODES.get(key, _WHOLE_REPORT)


def _report_blocks(report: str | Mapping[str, str]) -> list[tuple[str, list[str]]]:
    """(observation id, lines) per block: one block for plain text, one per section otherwise."""
    if isinstance(report, str):
        return [(_WHOLE_REPORT, report.rstrip("\n").split("\n"))]
    return [(_section_code(name), text.rstrip("\n").split("\n")) for name, text in report.items()]


def _obx(
    set_id: int,
    value_type: str,
    observation_id: str,
    sub_id: str,
    value: str,
    status: str,
    when: str,
) -> str:
    return _segment(
        "OBX",
        {
            1: str(set_id),
            2: value_type,
            3: observation_id,
            4: sub_id,
            5: value,
            11: status,
            14: when,
        },
    )


def _observations(
    report: str | Mapping[str, str], study_uid: str | None, status: str, when: str
) -> list[str]:
    segments: list[str] = []
    if study_uid:
        segments.append(_obx(1, "HD", STUDY_UID_OBSERVATION, "", escape(study_uid), status, when))
    for block, (code, lines) in enumerate(_report_blocks(report), start=1):
        for line in lines:
            set_id = len(segments) + 1
            segments.append(_obx(set_id, "TX", code, str(block), escape(line), status, when))
    return segments


def oru_r01(
    report: str | Mapping[str, str],
    *,
    accession_number: str,
    patient_id: str,
    patient_name: str,
    study_uid: str | None,
    placer_order: str,
    filler_order: str | None,
    observation_datetime: datetime,
    sending_facility: str,
    control_id: str,
    result_status: str = "F",
    version: str = "2.5.1",
    sending_application: str = "RIS",
    receiving_application: str = "RADFINDER",
    receiving_facility: str = "RADFINDER",
    message_datetime: datetime | None = None,
    procedure: Sequence[str] = ("CTCHEST", "CT chest without contrast", "L"),
    patient_sex: str = "",
    patient_birth_date: date | None = None,
    patient_class: str = "O",
    processing_id: str = "P",
) -> bytes:
    """One ORU^R01 message, segments separated by ``\\r``, UTF-8 encoded.

    ``report`` is the full text (one TX OBX per line) or a mapping of section name to text
    (CT-RATE's ``ClinicalInformation_EN`` ... ``Impressions_EN`` or plain names; LOINC codes for
    the four known sections). ``patient_name`` is an HL7 XPN ("Family^Given"), each component
    escaped. ``filler_order`` defaults to the accession number. ``message_datetime`` defaults to
    ``observation_datetime`` so that equal inputs give equal bytes.
    """
    if result_status not in _RESULT_STATUSES:
        raise ValueError(f"result_status must be one of {sorted(_RESULT_STATUSES)}")
    if not control_id:
        raise ValueError("control_id must not be empty: it is the message's idempotency key")
    when = hl7_datetime(observation_datetime)
    sent = hl7_datetime(message_datetime or observation_datetime)
    filler = filler_order or accession_number
    msh = FIELD_SEPARATOR.join(
        [
            "MSH",
            _ENCODING_CHARACTERS,
            escape(sending_application),
            escape(sending_facility),
            escape(receiving_application),
            escape(receiving_facility),
            sent,
            "",
            "ORU^R01^ORU_R01",
            escape(control_id),
            processing_id,
            version,
            "",
            "",
            "",
            "",
            "",
            "UNICODE UTF-8",
        ]
    )
    pid = _segment(
        "PID",
        {
            1: "1",
            3: f"{escape(patient_id)}^^^^MR",
            5: _components(patient_name),
            7: hl7_datetime(patient_birth_date) if patient_birth_date else "",
            8: escape(patient_sex),
        },
    )
    pv1 = _segment("PV1", {1: "1", 2: escape(patient_class)})
    orc = _segment("ORC", {1: "RE", 2: escape(placer_order), 3: escape(filler), 5: "CM", 9: sent})
    obr = _segment(
        "OBR",
        {
            1: "1",
            2: escape(placer_order),
            3: escape(filler),
            4: "^".join(escape(p) for p in procedure),
            7: when,
            18: escape(accession_number),
            22: when,
            24: "CT",
            25: result_status,
        },
    )
    segments = [msh, pid, pv1, orc, obr, *_observations(report, study_uid, result_status, when)]
    return ("\r".join(segments) + "\r").encode("utf-8")


def mllp_frame(msg: bytes) -> bytes:
    """Wrap a message for MLLP: start block, message, end block and carriage return."""
    if MLLP_START in msg or b"\x1c" in msg:
        raise ValueError("message contains MLLP framing bytes")
    return MLLP_START + msg + MLLP_END
