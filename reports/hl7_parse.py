"""HL7 v2 messages in, facts and acknowledgements out: what the listener needs from an ORU^R01.

Division of labour, measured rather than assumed: hl7apy validates the MSH segment (field
structure, supported version) and builds every ACK (once per feed and outcome, see
:func:`build_ack`), so the envelope follows the standard's tables for each version. The body is
read by the small tokenizer below because hl7apy's full parse costs 80-100 ms for a 35-segment
report on this project's 2-core machine (object per component) and splits encapsulated documents
on ``&``, which every CDA carries as ``&amp;``.

Leniency is deliberate where real senders differ and harmless: CR, LF or CRLF segment endings;
a line that does not start with a segment id continues the previous segment (a value with a
raw line break, a base64 PDF wrapped by a mail-style encoder); empty lines are dropped.
Strictness is deliberate where guessing would corrupt data: no MSH, no control id, an
unsupported version or undecodable bytes raise :class:`HL7Error` with the HL7 error code and the
ACK code (AE for content, AR for what we do not support) the sender must get.

Pure functions: no clock (``now`` is a parameter), no I/O, no database.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal

from reports.cda import CDAError, cda_narrative, is_pdf
from reports.hl7_writer import escape

__all__ = [
    "SUPPORTED_VERSIONS",
    "AckCode",
    "Document",
    "ErrorCode",
    "HL7Error",
    "Header",
    "Message",
    "ReportContent",
    "ack_wanted",
    "build_ack",
    "parse_message",
    "read_header",
]

# hl7apy knows 2.1-2.8.2; reports are read from 2.3 on (2.3, 2.3.1, 2.4, 2.5, 2.5.1 are tested;
# the ORU fields used here did not change in 2.6-2.8).
SUPPORTED_VERSIONS: Final = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8")
_ERR_V25: Final = ("2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2")
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_TEXT_TYPES: Final = frozenset({"TX", "FT", "ST"})
_STUDY_UID_CODE: Final = "113014"
_CHARSETS: Final = {
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
}

AckCode = Literal["AA", "AE", "AR"]


class ErrorCode(enum.IntEnum):
    """HL7 table 0357 (message error condition codes) as used in ERR and MSA."""

    SEGMENT_SEQUENCE = 100
    REQUIRED_FIELD_MISSING = 101
    DATA_TYPE = 102
    TABLE_VALUE_NOT_FOUND = 103
    UNSUPPORTED_MESSAGE_TYPE = 200
    UNSUPPORTED_EVENT = 201
    UNSUPPORTED_PROCESSING_ID = 202
    UNSUPPORTED_VERSION = 203
    UNKNOWN_KEY = 204
    DUPLICATE_KEY = 205
    APPLICATION_RECORD_LOCKED = 206
    APPLICATION_INTERNAL_ERROR = 207

    @property
    def text(self) -> str:
        return _ERROR_TEXT[self]


_ERROR_TEXT: Final = {
    ErrorCode.SEGMENT_SEQUENCE: "Segment sequence error",
    ErrorCode.REQUIRED_FIELD_MISSING: "Required field missing",
    ErrorCode.DATA_TYPE: "Data type error",
    ErrorCode.TABLE_VALUE_NOT_FOUND: "Table value not found",
    ErrorCode.UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    ErrorCode.UNSUPPORTED_EVENT: "Unsupported event code",
    ErrorCode.UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    ErrorCode.UNSUPPORTED_VERSION: "Unsupported version id",
    ErrorCode.UNKNOWN_KEY: "Unknown key identifier",
    ErrorCode.DUPLICATE_KEY: "Duplicate key identifier",
    ErrorCode.APPLICATION_RECORD_LOCKED: "Application record locked",
    ErrorCode.APPLICATION_INTERNAL_ERROR: "Application internal error",
}


@dataclass(frozen=True)
class Header:
    """MSH, with composite fields kept as sent (``APP^1.2.3^ISO``) so they can be echoed."""

    field_separator: str
    encoding_characters: str
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    message_datetime: str
    message_type: str
    trigger_event: str
    message_structure: str
    control_id: str
    processing_id: str
    version: str
    accept_ack_type: str
    application_ack_type: str
    charset: str  # Python codec the bytes were decoded with

    @property
    def is_oru_r01(self) -> bool:
        return self.message_type == "ORU" and self.trigger_event == "R01"


class HL7Error(ValueError):
    """A message we cannot accept; ``header`` is set when the MSH could be read (for the ACK)."""

    def __init__(
        self,
        reason: str,
        code: ErrorCode,
        ack: AckCode = "AE",
        *,
        header: Header | None = None,
        location: str = "",
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.ack = ack
        self.header = header
        self.location = location  # ERL: segment^sequence^field, e.g. "OBR^1^18"

    def with_header(self, header: Header) -> HL7Error:
        return HL7Error(self.reason, self.code, self.ack, header=header, location=self.location)


@dataclass(frozen=True)
class Document:
    """An encapsulated (ED) observation, decoded to bytes and kept whole."""

    type_of_data: str
    data_subtype: str
    encoding: str
    data: bytes
    kind: Literal["cda", "pdf", "text", "other"]

    @property
    def media_type(self) -> str:
        if self.kind == "pdf":
            return "application/pdf"
        if self.kind == "cda":
            return "text/xml"
        sub = self.data_subtype.lower()
        return sub if "/" in sub else f"{self.type_of_data.lower() or 'application'}/{sub}"


@dataclass(frozen=True)
class ReportContent:
    """What an ORU^R01 says about its report (first OBR; observations of the whole message)."""

    patient_id: str
    placer_order_number: str
    filler_order_number: str  # OBR-3, first component
    placer_field1: str  # OBR-18, where IHE puts the accession number
    result_status: str  # OBR-25
    observation_datetime: str  # OBR-7
    study_uids: tuple[str, ...]
    text: str | None
    text_source: Literal["obx", "cda"] | None
    documents: tuple[Document, ...] = field(default=())
    unminable_reason: str | None = None


@dataclass(frozen=True)
class Message:
    header: Header
    segments: tuple[tuple[str, ...], ...]  # field lists; for MSH index n is MSH-(n+1)
    report: ReportContent | None  # set for ORU^R01


# --- tokenizing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Delimiters:
    field: str
    component: str
    repetition: str
    escape: str
    subcomponent: str


def _charset(declared: str) -> str:
    key = declared.split("~", 1)[0].strip().upper()
    return _CHARSETS.get(key, "")


def _decode(raw: bytes) -> tuple[str, str]:
    """Text and codec: MSH-18 when declared, else UTF-8, else Latin-1 (never fails)."""
    first = raw.split(b"\r", 1)[0].split(b"\n", 1)[0].decode("latin-1")
    declared = ""
    if first.startswith("MSH") and len(first) > 3:
        parts = first.split(first[3])
        declared = parts[17] if len(parts) > 17 else ""
    codec = _charset(declared)
    if codec:
        try:
            return raw.decode(codec), codec
        except UnicodeDecodeError as exc:
            raise HL7Error(
                f"message bytes are not valid {declared.strip()} (MSH-18) at byte {exc.start}",
                ErrorCode.DATA_TYPE,
                location="MSH^1^18",
            ) from exc
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "latin-1"


def _segment_lines(text: str, field_sep: str) -> list[str]:
    """Segments from any of CR, LF, CRLF; continuation lines re-joined with a line feed."""
    lines: list[str] = []
    for line in text.replace("\r\n", "\r").replace("\n", "\r").split("\r"):
        if not line.strip():
            continue
        head = line[:4]
        is_segment = _SEGMENT_ID.fullmatch(head[:3]) is not None and head[3:] in ("", field_sep)
        if is_segment or not lines:
            lines.append(line)
        else:
            lines[-1] += "\n" + line
    return lines


def _delimiters(msh: str) -> _Delimiters:
    if len(msh) < 5 or msh[3].isalnum() or msh[3] in " \t":
        raise HL7Error("MSH has no valid field separator", ErrorCode.DATA_TYPE)
    sep = msh[3]
    enc = msh[4:].split(sep, 1)[0]
    if not enc or any(c.isalnum() or c == sep for c in enc) or len(set(enc)) != len(enc):
        raise HL7Error(f"MSH-2 encoding characters are invalid: {enc!r}", ErrorCode.DATA_TYPE)
    padded = enc + "~\\&"[len(enc) - 1 :] if len(enc) < 4 else enc
    return _Delimiters(sep, padded[0], padded[1], padded[2], padded[3])


_FORMAT_COMMAND = re.compile(r"\.(br|sp|in|ti|sk|ce|fi|nf)\s*([+-]?\d*)", re.IGNORECASE)


def unescape(value: str, d: _Delimiters, codec: str = "latin-1") -> str:
    """HL7 escape sequences resolved: delimiters, hex bytes, line breaks; highlighting dropped."""
    e = d.escape
    if e not in value:
        return value
    out: list[str] = []
    i = 0
    while i < len(value):
        end = value.find(e, i + 1) if value[i] == e else -1
        if end < 0:
            out.append(value[i])
            i += 1
            continue
        seq = value[i + 1 : end]
        simple = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition, "E": e}
        if seq in simple:
            out.append(simple[seq])
        elif seq in ("H", "N") or seq[:1] in ("C", "M", "Z"):
            pass  # highlighting, character set switches, locally defined: no text
        elif seq[:1] == "X" and len(seq) % 2 == 1:
            try:
                out.append(bytes.fromhex(seq[1:]).decode(codec, errors="replace"))
            except ValueError:
                out.append(value[i : end + 1])
        elif (m := _FORMAT_COMMAND.fullmatch(seq)) is not None:
            command, count = m.group(1).lower(), m.group(2)
            if command == "br":
                out.append("\n")
            elif command == "sp":
                out.append("\n" * max(1, int(count) if count.lstrip("+-").isdigit() else 1))
        else:
            out.append(value[i : end + 1])  # not an escape: keep the text as sent
        i = end + 1
    return "".join(out)


def _field(fields: Sequence[str], n: int) -> str:
    return fields[n] if n < len(fields) else ""


def _component(raw: str, d: _Delimiters, n: int = 1, codec: str = "latin-1") -> str:
    """Component ``n`` (1-based) of the first repetition, unescaped and stripped."""
    first = raw.split(d.repetition, 1)[0]
    parts = first.split(d.component)
    return unescape(parts[n - 1], d, codec).strip() if n <= len(parts) else ""


def read_header(raw: bytes) -> Header:
    """The MSH of a message, validated with hl7apy; raises HL7Error (without header)."""
    return _read(raw)[0]


def _read(raw: bytes) -> tuple[Header, list[list[str]], _Delimiters]:
    text, codec = _decode(raw.lstrip(b"\xef\xbb\xbf \t\r\n\x00"))
    if not text.startswith("MSH"):
        raise HL7Error("message does not start with an MSH segment", ErrorCode.SEGMENT_SEQUENCE)
    d = _delimiters(text)
    lines = _segment_lines(text, d.field)
    segments = [line.split(d.field) for line in lines]
    msh = segments[0]

    def get(n: int, comp: int = 1) -> str:  # MSH-n: MSH-1 is the separator itself
        return _component(_field(msh, n - 1), d, comp, codec)

    def raw_field(n: int) -> str:
        return _field(msh, n - 1).split(d.repetition, 1)[0]

    header = Header(
        field_separator=d.field,
        encoding_characters=msh[1],
        sending_application=raw_field(3),
        sending_facility=raw_field(4),
        receiving_application=raw_field(5),
        receiving_facility=raw_field(6),
        message_datetime=get(7),
        message_type=get(9, 1).upper(),
        trigger_event=get(9, 2).upper(),
        message_structure=get(9, 3).upper(),
        control_id=get(10),
        processing_id=get(11),
        version=get(12),
        accept_ack_type=get(15).upper(),
        application_ack_type=get(16).upper(),
        charset=codec,
    )
    _validate_header(header, d, msh)
    if sum(1 for s in segments if s[0] == "MSH") > 1:
        raise HL7Error(
            "more than one MSH segment in one frame (batches are not accepted)",
            ErrorCode.SEGMENT_SEQUENCE,
            header=header,
        )
    return header, segments, d


def _validate_header(header: Header, d: _Delimiters, msh: list[str]) -> None:
    if not header.control_id:
        raise HL7Error(
            "MSH-10 message control id is missing",
            ErrorCode.REQUIRED_FIELD_MISSING,
            header=header,
            location="MSH^1^10",
        )
    if not header.message_type:
        raise HL7Error(
            "MSH-9 message type is missing",
            ErrorCode.REQUIRED_FIELD_MISSING,
            header=header,
            location="MSH^1^9",
        )
    if header.version not in SUPPORTED_VERSIONS:
        raise HL7Error(
            f"HL7 version {header.version or '(none)'} is not supported "
            f"(accepted: {', '.join(SUPPORTED_VERSIONS)})",
            ErrorCode.UNSUPPORTED_VERSION,
            "AR",
            header=header,
            location="MSH^1^12",
        )
    _hl7apy_check_msh(msh, header)


def _hl7apy_check_msh(msh: list[str], header: Header) -> None:
    """hl7apy parses the MSH; memoized on the MSH without MSH-7 and MSH-10, which are the only
    fields that change from message to message of one feed (a timestamp and an id)."""
    fields = list(msh)
    for n in (6, 9):  # MSH-7, MSH-10
        if n < len(fields):
            fields[n] = ""
    problem = _msh_problem(header.field_separator.join(fields), header.version, _hl7apy_key(header))
    if problem is not None:
        raise HL7Error(f"MSH segment is malformed: {problem}", ErrorCode.DATA_TYPE, header=header)


@functools.lru_cache(maxsize=256)
def _msh_problem(line: str, version: str, encoding: tuple[tuple[str, str], ...]) -> str | None:
    from hl7apy.exceptions import HL7apyException  # type: ignore[import-untyped]
    from hl7apy.parser import parse_segment  # type: ignore[import-untyped]

    try:
        parse_segment(line.replace("\n", " "), version=version, encoding_chars=dict(encoding))
    except (HL7apyException, ValueError, IndexError) as exc:
        return str(exc) or type(exc).__name__
    return None


def _hl7apy_key(header: Header) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(_hl7apy_encoding(header).items()))


def _hl7apy_encoding(header: Header) -> dict[str, str]:
    given = header.encoding_characters
    enc = given + "~\\&"[len(given) - 1 :] if len(given) < 4 else given
    chars = {
        "FIELD": header.field_separator,
        "COMPONENT": enc[0],
        "REPETITION": enc[1],
        "ESCAPE": enc[2],
        "SUBCOMPONENT": enc[3],
        "GROUP": "\r",
        "SEGMENT": "\r",
    }
    if len(enc) > 4:
        chars["TRUNCATION"] = enc[4]
    return chars


# --- the report ----------------------------------------------------------------------------


def parse_message(raw: bytes) -> Message:
    """Header always; for ORU^R01 also the report. Raises HL7Error with the ACK to send."""
    header, segments, d = _read(raw)
    report = _report(header, segments, d) if header.is_oru_r01 else None
    return Message(header, tuple(tuple(s) for s in segments), report)


def _report(header: Header, segments: list[list[str]], d: _Delimiters) -> ReportContent:
    codec = header.charset
    obr = next((s for s in segments if s[0] == "OBR"), None)
    if obr is None:
        raise HL7Error(
            "ORU^R01 has no OBR segment", ErrorCode.SEGMENT_SEQUENCE, header=header, location="OBR"
        )
    pid = next((s for s in segments if s[0] == "PID"), [])

    def comp(seg: Sequence[str], n: int, c: int = 1) -> str:
        return _component(_field(seg, n), d, c, codec)

    study_uids: list[str] = []
    lines: list[str] = []
    documents: list[Document] = []
    problems: list[str] = []
    for seg in segments:
        if seg[0] == "ZDS":
            _add_uid(study_uids, comp(seg, 1))
        if seg[0] != "OBX":
            continue
        value_type = comp(seg, 2).upper()
        code, name = comp(seg, 3, 1), comp(seg, 3, 2).lower()
        if code == _STUDY_UID_CODE or "study instance uid" in name:
            _add_uid(study_uids, comp(seg, 5))
            continue
        if "uid" in name:
            continue  # series / SOP instance UIDs: references, not report text
        if value_type in _TEXT_TYPES:
            reps = _field(seg, 5).split(d.repetition)
            lines.append("\n".join(unescape(r, d, codec) for r in reps))
        elif value_type == "ED":
            try:
                documents.append(_document(_field(seg, 5), d, codec))
            except HL7Error as exc:
                problems.append(exc.reason)

    text: str | None = "\n".join(lines) if lines else None
    source: Literal["obx", "cda"] | None = "obx" if text is not None else None
    unminable: str | None = None
    if text is None:
        text, unminable = _document_text(documents, problems)
        source = "cda" if text is not None else None
    return ReportContent(
        patient_id=comp(pid, 3),
        placer_order_number=comp(obr, 2),
        filler_order_number=comp(obr, 3),
        placer_field1=comp(obr, 18),
        result_status=comp(obr, 25).upper(),
        observation_datetime=comp(obr, 7),
        study_uids=tuple(study_uids),
        text=text,
        text_source=source,
        documents=tuple(documents),
        unminable_reason=unminable,
    )


def _add_uid(uids: list[str], value: str) -> None:
    value = value.strip().rstrip("\x00")
    if value and len(value) <= 64 and _UID.fullmatch(value) and value not in uids:
        uids.append(value)


def _document(raw: str, d: _Delimiters, codec: str) -> Document:
    """OBX-5 of type ED: source^type^subtype^encoding^data, the data taken raw (no splitting)."""
    parts = raw.split(d.component, 4)
    if len(parts) < 5:
        raise HL7Error("encapsulated data (ED) has fewer than 5 components", ErrorCode.DATA_TYPE)
    type_of_data, subtype, encoding = (unescape(p, d, codec).strip() for p in parts[1:4])
    payload = parts[4]
    enc = encoding.upper()
    try:
        if enc == "BASE64":
            # Line wrapping (whitespace) is tolerated, any other non-base64 byte is an error.
            data = base64.b64decode("".join(unescape(payload, d, codec).split()), validate=True)
        elif enc == "HEX":
            data = bytes.fromhex("".join(unescape(payload, d, codec).split()))
        else:  # "A" / "ASCII" / none: the text itself, HL7-escaped
            data = unescape(payload, d, codec).encode("utf-8")
    except (binascii.Error, ValueError) as exc:
        raise HL7Error(
            f"encapsulated data is not valid {encoding}: {exc}", ErrorCode.DATA_TYPE
        ) from exc
    if not data:
        raise HL7Error("encapsulated document is empty", ErrorCode.DATA_TYPE)
    low = f"{type_of_data}/{subtype}".lower()
    kind: Literal["cda", "pdf", "text", "other"]
    if "pdf" in low or is_pdf(data):
        kind = "pdf"
    elif "xml" in low or "cda" in low or data.lstrip()[:1] == b"<":
        kind = "cda"
    elif low.startswith("text") or "plain" in low:
        kind = "text"
    else:
        kind = "other"
    return Document(type_of_data, subtype, encoding, data, kind)


def _document_text(
    documents: Sequence[Document], problems: Sequence[str]
) -> tuple[str | None, str | None]:
    """Text from the first minable document, else the reason none could be mined."""
    reasons = list(problems)
    for doc in documents:
        if doc.kind == "cda":
            try:
                return cda_narrative(doc.data), None
            except CDAError as exc:
                reasons.append(exc.reason)
        elif doc.kind == "text":
            text = doc.data.decode("utf-8", errors="replace").strip()
            if text:
                return text, None
            reasons.append("encapsulated text document is empty")
        elif doc.kind == "pdf":
            reasons.append("report is a PDF document; its text cannot be mined")
        else:
            reasons.append(f"encapsulated document of type {doc.media_type} cannot be mined")
    if not reasons:
        reasons.append("message has no report text (no TX/FT/ST or encapsulated observation)")
    return None, "; ".join(reasons)


# --- acknowledgements ----------------------------------------------------------------------


def ack_wanted(header: Header | None, success: bool) -> bool:
    """Original mode always answers; enhanced mode follows MSH-15 (AL, NE, ER, SU)."""
    if header is None or not header.accept_ack_type:
        return True
    condition = header.accept_ack_type
    if condition == "NE":
        return False
    if condition == "ER":
        return not success
    if condition == "SU":
        return success
    return True


def _sanitize(text: str, limit: int) -> str:
    """Free text for MSA-3/ERR-8: one line, no HL7 delimiters (hl7apy escapes only some)."""
    cleaned = " ".join(re.sub(r"[|^~\\&#]", " ", text).split())
    return cleaned[:limit]


def build_ack(
    header: Header | None,
    code: AckCode,
    *,
    control_id: str,
    now: datetime,
    error: HL7Error | None = None,
    application: str = "RADFINDER",
    facility: str = "RADFINDER",
) -> bytes:
    """The ACK for ``header``'s message, built with hl7apy in the sender's version.

    Original mode answers AA/AE/AR; a sender that asked for enhanced mode (MSH-15 set) gets the
    commit codes CA/CE/CR, because we commit before answering and send no application ACK.
    ``header`` is None when not even the MSH could be read: MSA-2 is then empty.

    hl7apy builds the message once per feed and outcome (sender, version, trigger, code, error);
    the three values that differ per message (MSH-7, MSH-10, MSA-2) are then set in the ER7,
    because building an hl7apy message costs more than everything else the listener does.
    """
    version = header.version if header and header.version in SUPPORTED_VERSIONS else "2.5.1"
    if header is not None and header.accept_ack_type:
        ack_code = {"AA": "CA", "AE": "CE", "AR": "CR"}[code]
    else:
        ack_code = code
    segments = list(
        _ack_template(
            version,
            header.receiving_application
            if header and header.receiving_application
            else (application),
            header.receiving_facility if header and header.receiving_facility else facility,
            header.sending_application if header else "",
            header.sending_facility if header else "",
            header.trigger_event if header else "",
            (header.processing_id if header else "") or "P",
            ack_code,
            None if error is None else (error.reason, int(error.code), error.location),
        )
    )
    msh = segments[0].split("|")
    msh[6] = now.strftime("%Y%m%d%H%M%S")
    msh[9] = escape(control_id)
    segments[0] = "|".join(msh)
    msa = segments[1].split("|")  # MSA|code|0[|reason]: MSA-2 was built as a placeholder
    msa[2] = escape(header.control_id) if header else ""
    segments[1] = "|".join(msa)
    codec = header.charset if header else "utf-8"
    return ("\r".join(segments) + "\r").encode(codec, errors="replace")


@functools.lru_cache(maxsize=256)
def _ack_template(
    version: str,
    sending_application: str,
    sending_facility: str,
    receiving_application: str,
    receiving_facility: str,
    trigger: str,
    processing_id: str,
    ack_code: str,
    error: tuple[str, int, str] | None,
) -> tuple[str, ...]:
    """The ACK's segments as hl7apy writes them, with MSH-7, MSH-10 and MSA-2 left to fill."""
    from hl7apy.core import Message as ApyMessage  # type: ignore[import-untyped]
    from hl7apy.core import Segment

    ack = ApyMessage("ACK", version=version)
    msh = ack.msh
    msh.msh_3 = sending_application
    msh.msh_4 = sending_facility
    msh.msh_5 = receiving_application
    msh.msh_6 = receiving_facility
    msh.msh_7 = "0"
    if version == "2.3":
        msh.msh_9 = f"ACK^{trigger}" if trigger else "ACK"
    else:
        msh.msh_9 = f"ACK^{trigger}^ACK" if trigger else "ACK^^ACK"
    msh.msh_10 = "0"
    msh.msh_11 = processing_id
    msh.msh_12 = version
    ack.msa.msa_1 = ack_code
    ack.msa.msa_2 = "0"
    if error is not None:
        reason, number, location = error
        code = ErrorCode(number)
        ack.msa.msa_3 = _sanitize(reason, 80)
        err = Segment("ERR", version=version)
        hl7_code = f"{int(code)}^{code.text}^HL70357"
        if version in _ERR_V25:
            if location:
                err.err_2 = location
            err.err_3 = hl7_code
            err.err_4 = "E"
            err.err_8 = _sanitize(reason, 250)
        else:  # ERR-1 (ELD): segment^sequence^field position^code&text&table
            where = [*location.split("^"), "", "", ""][:3]
            err.err_1 = "^".join([*where, hl7_code.replace("^", "&")])
        ack.add(err)
    return tuple(str(ack.to_er7()).split("\r"))
