"""De-identification of the retraining export: pseudonyms, per-patient date shifts, clean text.

The nightly export leaves the hospital's trust domain as training data, so what it writes must
not identify a patient (DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile),
while staying useful: the same patient, study and series must get the same pseudonym in every
export (a training set is split by patient, and a corrected report must land on the volume
its first version did), and dates must keep their intervals within a patient.

What the export writes and what this module does to it:

- Pixels and geometry only, never a DICOM header: the NIfTI holds HU values and the affine
  built from ImagePositionPatient, ImageOrientationPatient and PixelSpacing (patient
  coordinates, which the Basic Profile keeps). Every other attribute of the series is dropped,
  in particular all Basic Profile identifiers: PatientName, PatientID, IssuerOfPatientID,
  OtherPatientIDs(Sequence), OtherPatientNames, PatientBirthName, PatientMotherBirthName,
  PatientBirthDate, PatientBirthTime, PatientAddress, PatientTelephoneNumbers, MedicalRecordLocator,
  AccessionNumber, StudyID, AdmissionID, Requested/Performed/ScheduledProcedureStepID,
  ReferringPhysicianName, PerformingPhysicianName, NameOfPhysiciansReadingStudy,
  PhysiciansOfRecord, RequestingPhysician, OperatorsName, InstitutionName, InstitutionAddress,
  InstitutionalDepartmentName, StationName, DeviceSerialNumber, every date and time
  (StudyDate, SeriesDate, AcquisitionDate, ContentDate and their times), PatientAge, PatientSex,
  PatientSize, PatientWeight, descriptions and comments.
- Replaced by keyed pseudonyms (HMAC-SHA256 with the site secret, so nobody without the secret
  can recompute them from a known ID): PatientID -> ``pat-`` + 16 base32 characters (the
  volume's folder); StudyInstanceUID, SeriesInstanceUID (the ``volume_id``) and
  SOPInstanceUID (a snippet's ``sop_instance_uid``) -> ``2.25.`` UIDs.
- Report text (and each snippet, a clause of it) is scrubbed of the identifiers known from the
  DICOM header and the HL7 message (PID-3 IDs, PID-5 and PID-6 names, PID-7 birth date, PID-11
  address, PID-13/14 phones, PID-18/19/20 account, SSN, licence; placer and filler order numbers
  and the accession, OBR-2/3/18/19; PV1-19 visit number; physician names in PV1-7/8/9/17,
  OBR-16/28/32/33/34/35): names -> ``[name]``, IDs and accession numbers -> ``[id]``, UIDs ->
  ``[uid]``, addresses -> ``[address]``, phone numbers -> ``[phone]``, institution names ->
  ``[institution]``, e-mail addresses -> ``[email]``, the birth date -> ``[birth date]``. Phone
  numbers and names after a title (Dr, Prof, Mr, Mrs, Ms, Herr, Frau) are also found by pattern
  when no header names them, and any dotted numeric string of five or more parts is taken as a
  UID.
- Dates in the text are shifted by the patient's offset, -1 to -365 days, a keyed function of
  the patient pseudonym: ISO ``2024-03-05``, compact ``20240305``, ``05.03.2024``, ``3/5/2024``
  (month first unless the first number exceeds 12), ``5 March 2024``, ``March 5, 2024``,
  ``5. März 2024`` (English and German month names, full or abbreviated). Each is written back
  in its own format. Years alone, months without a day and times are kept.

Known limits (why the output is still reviewed before it leaves a site): a name that appears in
the text but in no header field and after no title is not found; an identifier shorter than
three characters is not removed (it would erase image numbers and sizes).
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import logging
import os
import re
import secrets
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Final

from reports.hl7_parse import Message
from reports.hl7_writer import unescape

__all__ = [
    "DICOM_ADDRESS_KEYWORDS",
    "DICOM_DATE_KEYWORDS",
    "DICOM_ID_KEYWORDS",
    "DICOM_INSTITUTION_KEYWORDS",
    "DICOM_NAME_KEYWORDS",
    "DICOM_PHONE_KEYWORDS",
    "DICOM_UID_KEYWORDS",
    "SECRET_FILE",
    "Identifiers",
    "Pseudonymizer",
    "identifiers_from_dicom",
    "identifiers_from_hl7",
    "load_secret",
    "scrub_text",
    "shift_dates",
]

log = logging.getLogger("radfinder_node.deid")

SECRET_FILE: Final = "deid_secret"
MIN_IDENTIFIER_LENGTH: Final = 3
MAX_SHIFT_DAYS: Final = 365

DICOM_NAME_KEYWORDS: Final = (
    "PatientName",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "ResponsiblePerson",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "OperatorsName",
)
DICOM_ID_KEYWORDS: Final = (
    "PatientID",
    "OtherPatientIDs",
    "MedicalRecordLocator",
    "AccessionNumber",
    "StudyID",
    "AdmissionID",
    "RequestedProcedureID",
    "PerformedProcedureStepID",
    "ScheduledProcedureStepID",
    "DeviceSerialNumber",
)
DICOM_UID_KEYWORDS: Final = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
)
DICOM_DATE_KEYWORDS: Final = ("PatientBirthDate",)
DICOM_ADDRESS_KEYWORDS: Final = ("PatientAddress", "InstitutionAddress")
DICOM_PHONE_KEYWORDS: Final = ("PatientTelephoneNumbers",)
DICOM_INSTITUTION_KEYWORDS: Final = ("InstitutionName", "InstitutionalDepartmentName")
DICOM_KEYWORDS: Final = (
    DICOM_NAME_KEYWORDS
    + DICOM_ID_KEYWORDS
    + DICOM_UID_KEYWORDS
    + DICOM_DATE_KEYWORDS
    + DICOM_ADDRESS_KEYWORDS
    + DICOM_PHONE_KEYWORDS
    + DICOM_INSTITUTION_KEYWORDS
)


# ---------------------------------------------------------------------------------------------
# The site secret


def load_secret(configured: str | None, data_dir: Path) -> bytes:
    """The HMAC key: the configured one, else ``<data_dir>/deid_secret``, created on first use.

    Created with O_EXCL and mode 0600, so two processes starting at once agree on one secret
    and no other user can read it. Losing the file changes every pseudonym: back it up with the
    database.
    """
    if configured:
        return configured.encode("utf-8")
    path = Path(data_dir) / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            log.info("de-identification secret created", extra={"fields": {"path": str(path)}})
    value = path.read_text(encoding="ascii").strip()
    if len(value) < 32:
        raise ValueError(f"{path} holds no usable secret (at least 32 characters expected)")
    return value.encode("ascii")


# ---------------------------------------------------------------------------------------------
# Pseudonyms


@dataclass(frozen=True)
class Pseudonymizer:
    """Stable keyed pseudonyms and date shifts: equal inputs give equal outputs for one secret."""

    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise ValueError("the de-identification secret must have at least 16 bytes")

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self.secret, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()

    def patient(self, patient_id: str) -> str:
        """``pat-`` and 16 base32 characters (80 bits)."""
        code = base64.b32encode(self._digest("patient", patient_id)[:10]).decode("ascii")
        return f"pat-{code.lower()}"

    def uid(self, uid: str) -> str:
        """A ``2.25.`` UID (at most 44 characters) in place of any UID."""
        return f"2.25.{uuid.UUID(bytes=self._digest('uid', uid)[:16], version=4).int}"

    def shift_days(self, patient_pseudonym: str) -> int:
        """The patient's date offset, -1 to -365 days: keyed, so a pseudonym alone does not
        reveal it."""
        n = int.from_bytes(self._digest("date-shift", patient_pseudonym)[:8], "big")
        return -(1 + n % MAX_SHIFT_DAYS)


# ---------------------------------------------------------------------------------------------
# What identifies the patient


@dataclass(frozen=True)
class Identifiers:
    """Strings that identify a patient, gathered from the DICOM header and the HL7 message."""

    names: frozenset[str] = frozenset()
    ids: frozenset[str] = frozenset()
    uids: frozenset[str] = frozenset()
    birth_dates: frozenset[date] = frozenset()
    addresses: frozenset[str] = frozenset()
    phones: frozenset[str] = frozenset()
    institutions: frozenset[str] = frozenset()

    def __or__(self, other: Identifiers) -> Identifiers:
        return Identifiers(
            self.names | other.names,
            self.ids | other.ids,
            self.uids | other.uids,
            self.birth_dates | other.birth_dates,
            self.addresses | other.addresses,
            self.phones | other.phones,
            self.institutions | other.institutions,
        )


def _person_parts(value: str, component: str = "^") -> set[str]:
    """Family, given and middle names of a PN/XPN value (``Doe^Jane^M``); also ``Doe, Jane``."""
    out: set[str] = set()
    for group in value.split("="):  # PN: alphabetic=ideographic=phonetic
        parts = group.split(component)[:3]
        for part in parts:
            for word in re.split(r"[\s,]+", part):
                word = word.strip(".")
                if len(word) >= 2 and not word.isdigit():
                    out.add(word)
    return out


def _parse_date(value: str) -> date | None:
    digits = value.strip()[:8]
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        return None


def _address_parts(value: str, component: str = "^") -> set[str]:
    """Street lines, city and postal code of an address (XAD or DICOM free text)."""
    parts = value.split(component)
    keep = [parts[i] for i in (0, 1, 2, 4) if i < len(parts)] if len(parts) > 1 else [value]
    return {p.strip() for p in keep if len(p.strip()) >= MIN_IDENTIFIER_LENGTH}


def identifiers_from_dicom(header: Mapping[str, Sequence[str]]) -> Identifiers:
    """From DICOM attributes by keyword (each a list of values, as strings; see
    :data:`DICOM_KEYWORDS` for what is read)."""

    def values(keywords: Iterable[str]) -> list[str]:
        return [v for k in keywords for v in header.get(k, ()) if v and v.strip()]

    return Identifiers(
        names=frozenset(p for v in values(DICOM_NAME_KEYWORDS) for p in _person_parts(v)),
        ids=frozenset(v.strip() for v in values(DICOM_ID_KEYWORDS)),
        uids=frozenset(v.strip() for v in values(DICOM_UID_KEYWORDS)),
        birth_dates=frozenset(
            d for d in (_parse_date(v) for v in values(DICOM_DATE_KEYWORDS)) if d
        ),
        addresses=frozenset(
            p for v in values(DICOM_ADDRESS_KEYWORDS) for p in _address_parts(v, "^")
        ),
        phones=frozenset(v.strip() for v in values(DICOM_PHONE_KEYWORDS)),
        institutions=frozenset(v.strip() for v in values(DICOM_INSTITUTION_KEYWORDS)),
    )


# (segment, field) -> kind. XCN physician fields carry an ID first, then the name.
_HL7_FIELDS: Final[Mapping[str, Mapping[int, str]]] = {
    "PID": {
        2: "id",
        3: "id",
        4: "id",
        5: "name",
        6: "name",
        7: "birth",
        9: "name",
        11: "address",
        13: "phone",
        14: "phone",
        18: "id",
        19: "id",
        20: "id",
        21: "id",
    },
    "PD1": {4: "xcn"},
    "NK1": {2: "name", 4: "address", 5: "phone", 6: "phone"},
    "PV1": {7: "xcn", 8: "xcn", 9: "xcn", 17: "xcn", 19: "id", 50: "id"},
    "ORC": {2: "id", 3: "id", 4: "id", 10: "xcn", 11: "xcn", 12: "xcn"},
    "OBR": {
        2: "id",
        3: "id",
        16: "xcn",
        18: "id",
        19: "id",
        20: "id",
        28: "xcn",
        32: "xcn",
        33: "xcn",
        34: "xcn",
        35: "xcn",
    },
}


def identifiers_from_hl7(message: Message) -> Identifiers:
    """From the PID, PD1, NK1, PV1, ORC and OBR segments of an HL7 v2 message."""
    enc = message.header.encoding_characters or "^~\\&"
    component, repetition = enc[0], enc[1] if len(enc) > 1 else "~"
    subcomponent = enc[3] if len(enc) > 3 else "&"
    found: dict[str, set[str]] = {k: set() for k in ("name", "id", "address", "phone")}
    births: set[date] = set()
    for seg in message.segments:
        fields = _HL7_FIELDS.get(seg[0])
        if not fields:
            continue
        for number, kind in fields.items():
            if number >= len(seg) or not seg[number]:
                continue
            for rep in seg[number].split(repetition):
                value = unescape(rep.replace(subcomponent, " "))
                comps = value.split(component)
                if kind == "id":
                    if comps[0].strip():
                        found["id"].add(comps[0].strip())
                elif kind == "name":
                    found["name"] |= _person_parts(value, component)
                elif kind == "xcn":  # ID ^ family ^ given ^ middle
                    if comps[0].strip():
                        found["id"].add(comps[0].strip())
                    found["name"] |= _person_parts(component.join(comps[1:4]), component)
                elif kind == "birth":
                    d = _parse_date(comps[0])
                    if d:
                        births.add(d)
                elif kind == "address":
                    found["address"] |= _address_parts(value, component)
                elif kind == "phone" and comps[0].strip():
                    found["phone"].add(comps[0].strip())
    return Identifiers(
        names=frozenset(found["name"]),
        ids=frozenset(found["id"]),
        birth_dates=frozenset(births),
        addresses=frozenset(found["address"]),
        phones=frozenset(found["phone"]),
    )


# ---------------------------------------------------------------------------------------------
# Dates

_MONTHS: Final[Mapping[str, Sequence[str]]] = {
    "en": [calendar.month_name[i] for i in range(1, 13)],
    "de": [
        "Januar",
        "Februar",
        "März",
        "April",
        "Mai",
        "Juni",
        "Juli",
        "August",
        "September",
        "Oktober",
        "November",
        "Dezember",
    ],
}
_ABBREVIATIONS: Final[Mapping[str, Sequence[str]]] = {
    "en": ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"],
    "de": ["Jan", "Feb", "Mär", "Apr", "Mai", "Jun", "Jul", "Aug", "Sep", "Okt", "Nov", "Dez"],
}


@dataclass(frozen=True)
class _MonthWord:
    month: int
    lang: str
    abbreviated: bool


def _month_words() -> dict[str, _MonthWord]:
    out: dict[str, _MonthWord] = {}
    for lang in ("de", "en"):  # English wins where both spell a month alike
        for i, name in enumerate(_ABBREVIATIONS[lang]):
            out[name.lower()] = _MonthWord(i + 1, lang, True)
        for i, name in enumerate(_MONTHS[lang]):
            out[name.lower()] = _MonthWord(i + 1, lang, False)
    out["sept"] = _MonthWord(9, "en", True)
    out["maerz"] = _MonthWord(3, "de", False)
    return out


_MONTH_WORDS: Final = _month_words()
_MONTH_ALT: Final = "|".join(sorted(map(re.escape, _MONTH_WORDS), key=len, reverse=True))
_YEAR: Final = r"(?:19|20)\d\d"
_DATE_PATTERNS: Final = re.compile(
    rf"""
    (?P<iso>(?<![\d.-])(?P<iy>{_YEAR})-(?P<im>\d\d)-(?P<id>\d\d)(?![\d-]))
    | (?P<compact>(?<![\d.])(?P<cy>{_YEAR})(?P<cm>0[1-9]|1[0-2])
        (?P<cd>0[1-9]|[12]\d|3[01])(?![\d.]))
    | (?P<dot>(?<![\d.])(?P<dd>\d{{1,2}})\.(?P<dm>\d{{1,2}})\.(?P<dy>{_YEAR})(?![\d]|\.\d))
    | (?P<slash>(?<![\d/])(?P<s1>\d{{1,2}})/(?P<s2>\d{{1,2}})/(?P<sy>{_YEAR})(?![\d/]))
    | (?P<dmy>(?<![\w.])(?P<nd>\d{{1,2}})(?P<ndot>\.?)\s+(?P<nm>{_MONTH_ALT})(?P<nmdot>\.?)
        \s+(?P<ny>{_YEAR})(?!\d))
    | (?P<mdy>(?<!\w)(?P<mm>{_MONTH_ALT})(?P<mmdot>\.?)\s+(?P<md>\d{{1,2}})(?P<mcomma>,?)
        \s+(?P<my>{_YEAR})(?!\d))
    """,
    re.IGNORECASE | re.VERBOSE,
)


def _month_name(word: _MonthWord, month: int, original: str) -> str:
    table = _ABBREVIATIONS if word.abbreviated else _MONTHS
    name = table[word.lang][month - 1]
    return name.upper() if original.isupper() and len(original) > 1 else name


def _date_or_none(y: str, m: str, d: str) -> date | None:
    try:
        return date(int(y), int(m), int(d))
    except ValueError:
        return None


def _pad(value: int, padded: bool) -> str:
    return f"{value:02d}" if padded else str(value)


def _numeric_padding(*fields: str) -> bool:
    """Does a numeric date pad its day and month? ``05.01.`` and ``20.06.`` do (two digits
    each), ``5.1.`` and ``15/1/`` do not (a one-digit field says the writer does not pad)."""
    return all(len(f) == 2 for f in fields)


def _rewrite(m: re.Match[str], days: int, birth_dates: frozenset[date]) -> str:
    """One matched date, shifted (or the birth date removed); the match itself if not a date."""
    g = m.group

    def shifted(d: date | None, render: Callable[[date], str]) -> str:
        if d is None:
            return m.group(0)
        if d in birth_dates:
            return "[birth date]"
        return render(d + timedelta(days=days))

    if g("iso"):
        return shifted(_date_or_none(g("iy"), g("im"), g("id")), lambda d: d.isoformat())
    if g("compact"):
        return shifted(_date_or_none(g("cy"), g("cm"), g("cd")), lambda d: d.strftime("%Y%m%d"))
    if g("dot"):
        dd, dm = g("dd"), g("dm")
        pad = _numeric_padding(dd, dm)
        return shifted(
            _date_or_none(g("dy"), dm, dd),
            lambda d: f"{_pad(d.day, pad)}.{_pad(d.month, pad)}.{d.year}",
        )
    if g("slash"):
        a, b = g("s1"), g("s2")
        pad = _numeric_padding(a, b)
        if int(a) > 12:  # day first
            return shifted(
                _date_or_none(g("sy"), b, a),
                lambda d: f"{_pad(d.day, pad)}/{_pad(d.month, pad)}/{d.year}",
            )
        return shifted(
            _date_or_none(g("sy"), a, b),
            lambda d: f"{_pad(d.month, pad)}/{_pad(d.day, pad)}/{d.year}",
        )
    if g("dmy"):
        word = _MONTH_WORDS[g("nm").lower()]
        nd = g("nd")
        return shifted(
            _date_or_none(g("ny"), str(word.month), nd),
            lambda d: (
                f"{_pad(d.day, nd.startswith('0'))}{g('ndot')} "
                f"{_month_name(word, d.month, g('nm'))}{g('nmdot')} {d.year}"
            ),
        )
    word = _MONTH_WORDS[g("mm").lower()]
    md = g("md")
    return shifted(
        _date_or_none(g("my"), str(word.month), md),
        lambda d: (
            f"{_month_name(word, d.month, g('mm'))}{g('mmdot')} {_pad(d.day, md.startswith('0'))}"
            f"{g('mcomma')} {d.year}"
        ),
    )


def shift_dates(text: str, days: int, birth_dates: frozenset[date] = frozenset()) -> str:
    """Every full date in ``text`` moved by ``days`` in its own format; birth dates removed."""
    return _DATE_PATTERNS.sub(lambda m: _rewrite(m, days, birth_dates), text)


# ---------------------------------------------------------------------------------------------
# Text

_EMAIL: Final = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_ANY_UID: Final = re.compile(r"(?<![\w.])\d+(?:\.\d+){4,}(?!\w|\.\d)")
_PHONE_CONTEXT: Final = re.compile(
    r"(?P<head>\b(?:tel|phone|telephone|telefon|fax|mobile|mobil|handy|cell)\b\.?\s*(?:no\.?|nr\.?)?"
    r"\s*[:.]?\s*)(?P<number>\+?[\d(][\d ()/.-]{5,}\d)",
    re.IGNORECASE,
)
_PHONE_SHAPE: Final = re.compile(
    r"(?<![\w.+/])(?:\+\d{1,3}[ .-]?(?:\(0?\d{1,4}\)[ .-]?)?\d{2,5}(?:[ .-]?\d{2,5}){1,3}"
    r"|\(\d{3}\)\s?\d{3}-\d{4}|\d{3}-\d{3}-\d{4})(?![\w/])"
)
_TITLE: Final = r"(?:Dr|Prof|Mrs|Mr|Ms|Herr|Frau)\b\.?"
_TITLED_NAME: Final = re.compile(
    rf"\b(?P<titles>{_TITLE}(?:\s+(?:{_TITLE}|med\.|rer\.\s?nat\.|h\.\s?c\.))*)\s+"
    r"(?P<name>[A-ZÄÖÜ][\w'-]+(?:\s+[A-ZÄÖÜ][\w'-]+)?)"
)


def _literal_pattern(values: Iterable[str]) -> re.Pattern[str] | None:
    """One case-insensitive alternation of the values, longest first, not inside a longer
    word."""
    kept = sorted(
        {v for v in values if len(v.strip()) >= MIN_IDENTIFIER_LENGTH}, key=len, reverse=True
    )
    if not kept:
        return None
    body = "|".join(re.escape(v.strip()) for v in kept)
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _phone_pattern(phones: Iterable[str]) -> re.Pattern[str] | None:
    """Known numbers however they are spaced: each digit may be followed by separators."""
    numbers = sorted({_digits(p) for p in phones if len(_digits(p)) >= 5}, key=len, reverse=True)
    if not numbers:
        return None
    sep = r"[\s()./-]*"
    body = "|".join(sep.join(n) for n in numbers)
    return re.compile(rf"(?<!\d)\+?(?:{body})(?!\d)")


def _rules(ids: Identifiers) -> list[tuple[re.Pattern[str], str]]:
    """Known values, most specific first: UIDs before IDs (an ID may be a UID's tail), phone
    numbers and addresses before names (a street may be named after a person)."""
    candidates = [
        (_EMAIL, "[email]"),
        (_literal_pattern(ids.uids), "[uid]"),
        (_ANY_UID, "[uid]"),
        (_literal_pattern(ids.ids), "[id]"),
        (_phone_pattern(ids.phones), "[phone]"),
        (_literal_pattern(ids.addresses), "[address]"),
        (_literal_pattern(ids.institutions), "[institution]"),
        (_literal_pattern(ids.names), "[name]"),
    ]
    return [(p, r) for p, r in candidates if p is not None]


def scrub_text(text: str, identifiers: Identifiers, shift_days: int) -> str:
    """``text`` without the patient's identifiers and with its dates shifted (module docstring).

    Known values go first (longest first, so "Jane Doe-Smith" is not left as "-Smith"), then
    the patterns, then the dates: an ID that looks like a date (20240105) is removed, not
    shifted.
    """
    out = text
    for pattern, replacement in _rules(identifiers):
        out = pattern.sub(replacement, out)
    out = _PHONE_CONTEXT.sub(lambda m: f"{m.group('head')}[phone]", out)
    out = _PHONE_SHAPE.sub("[phone]", out)
    out = _TITLED_NAME.sub(lambda m: f"{m.group('titles')} [name]", out)
    return shift_dates(out, shift_days, identifiers.birth_dates)
