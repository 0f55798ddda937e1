"""HL7 parsing and ACKs: the real dcm4che messages, generated ORUs in every version, bad input."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from hl7apy.parser import parse_message as apy_parse  # type: ignore[import-untyped]

from conftest import REAL
from reports.hl7_parse import (
    ErrorCode,
    HL7Error,
    ack_wanted,
    build_ack,
    parse_message,
    read_header,
)
from reports.hl7_writer import oru_r01

DCM4CHE = REAL / "dcm4che"
HL7_DIR = DCM4CHE / "dcm4che-assembly" / "src" / "etc" / "testdata" / "hl7"
VERSIONS = ["2.3", "2.3.1", "2.4", "2.5", "2.5.1"]
NOW = datetime(2026, 3, 1, 12, 0, 0)
REPORT = (
    "Findings:\n"
    "There is a 6 mm nodule in the right upper lobe (series 3, image 45).\n"
    "\n"
    "Pipes | carets ^ ampersands & tildes ~ backslashes \\ survive.\n"
    "Deutsch: Rundherd im Unterlappen rechts (Serie 3, Bild 112), Größe 8 mm."
)


def real(name: str) -> bytes:
    path = DCM4CHE / name if (DCM4CHE / name).exists() else HL7_DIR / name
    return path.read_bytes()


def oru(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "accession_number": "ACC123",
        "patient_id": "P1",
        "patient_name": "Doe^Jane",
        "study_uid": "1.2.826.0.1.3680043.8.498.77",
        "placer_order": "PO1",
        "filler_order": None,
        "observation_datetime": datetime(2026, 1, 5, 10, 0),
        "sending_facility": "HOSP",
        "control_id": "MSG1",
    }
    args.update(overrides)
    report = args.pop("report", REPORT)
    return oru_r01(report, **args)  # type: ignore[arg-type]


# --- the real messages ------------------------------------------------------------------------

EXPECTED_HEADERS = {
    "ORU^R01_MESA_v231_from_commit_0814382.hl7": ("ORU", "R01", "2.3.1", "MESA4b141a5c"),
    "ORU^R01-SR.hl7": ("ORU", "R01", "2.5.1", "1001129"),
    "ORU^R01-CDA.hl7": ("ORU", "R01", "2.5.1", "1001127"),
    "ORU^R01-PDF.hl7": ("ORU", "R01", "2.5.1", "1001128"),
    "ADT^A31-UpdatePersonInfo.hl7": ("ADT", "A31", "2.5.1", "100212"),
    "ADT^A31-UpdatePersonInfo-Veterinary.hl7": ("ADT", "A31", "2.5.1", "1002121"),
    "ADT^A40-PatientMerge.hl7": ("ADT", "A40", "2.5.1", "1002122"),
    "ADT^A47-ChangePatientID.hl7": ("ADT", "A47", "2.5.1", "1002123"),
    "OMG^O19-GeneralClinicalOrder-Eyecare.hl7": ("OMG", "O19", "2.5.1", "1001124"),
    "OMI^O23-ImagingOrder.hl7": ("OMI", "O23", "2.5.1", "1001125"),
    "ORM^O01-GeneralOrder.hl7": ("OMI", "O23", "2.5.1", "1001126"),  # its MSH-9 says OMI
    "SIU^S12-NewAppointmentBooking.hl7": ("SIU", "S12", "2.5.1", "1001127"),
}


def test_every_shared_message_is_covered() -> None:
    names = {p.name for p in DCM4CHE.rglob("*.hl7")}
    assert names == set(EXPECTED_HEADERS)


@pytest.mark.parametrize("name", sorted(EXPECTED_HEADERS))
def test_real_message_headers(name: str) -> None:
    message = parse_message(real(name))
    h = message.header
    assert (h.message_type, h.trigger_event, h.version, h.control_id) == EXPECTED_HEADERS[name]
    assert (message.report is not None) == (h.message_type == "ORU")
    ack = apy_parse(build_ack(h, "AA", control_id="A1", now=NOW).decode(), find_groups=False)
    assert ack.msa.msa_1.value == "AA"
    assert ack.msa.msa_2.value == h.control_id
    assert ack.msh.msh_9.to_er7() == f"ACK^{h.trigger_event}^ACK"
    assert ack.msh.msh_12.value == h.version
    assert ack.msh.msh_5.to_er7() == h.sending_application  # the ACK goes back to the sender


def test_mesa_v231_report_text_and_study_uid() -> None:
    report = parse_message(real("ORU^R01_MESA_v231_from_commit_0814382.hl7")).report
    assert report is not None
    assert report.study_uids == ("1.113654.1.2001.30.2.2",)
    assert (report.placer_field1, report.filler_order_number) == ("ACC1", "B601Z")
    assert report.patient_id == "P33"
    assert report.text_source == "obx"
    assert report.text is not None
    lines = report.text.split("\n")
    # TX observations in order; coded (CE) values are not report text
    assert lines[0] == "The right kidney is slightly enlarged, but otherwise normal"
    assert lines[1].startswith("There is a small mass in the left lung measuring approximately")
    assert "Follow-up with CT of the Abdomen without contrast is recommended in 6 months." in lines
    assert len(lines) == 9
    assert "C65.2" not in report.text and "1.113654" not in report.text


def test_sr_report_has_text_and_no_uid_lines() -> None:
    report = parse_message(real("ORU^R01-SR.hl7")).report
    assert report is not None
    assert report.study_uids == ("1.2.392.200036.9125.0.198811291108.7",)
    assert report.placer_field1 == "AccessionNumber"
    assert report.filler_order_number == "FillerOrderNumberImagingServiceRequest"
    assert report.result_status == "F"
    assert report.text is not None and "Series Instance UID" not in report.text
    assert report.text.startswith("The right kidney is slightly enlarged")
    assert "1.2.392" not in report.text


def test_cda_report_narrative_is_extracted() -> None:
    raw = real("ORU^R01-CDA.hl7")
    assert b"\r\n" in raw  # CRLF segment endings, as shipped
    report = parse_message(raw).report
    assert report is not None
    assert report.study_uids == (
        "2.16.840.1.113669.632.20.540351.10004609971",
        "1.2.392.200036.9125.0.198811291108.7",
    )
    assert report.text_source == "cda"
    assert report.unminable_reason is None
    assert report.text is not None
    assert "There is a new round density at the left hilus,superiorly (diameter about 45mm)." in (
        report.text
    )
    assert "Round density in left superior hilus" in report.text
    assert "Suspected lung tumor" in report.text
    assert "<" not in report.text and "custodian" not in report.text  # no markup, no comments
    (doc,) = report.documents
    assert doc.kind == "cda" and doc.data.startswith(b'<?xml version="1.0"')
    assert doc.data.rstrip().endswith(b"</ClinicalDocument>")  # '&amp;' did not cut it


def test_pdf_report_is_kept_raw_with_the_reason() -> None:
    report = parse_message(real("ORU^R01-PDF.hl7")).report
    assert report is not None
    assert report.text is None and report.text_source is None
    assert report.unminable_reason == "report is a PDF document; its text cannot be mined"
    (doc,) = report.documents
    assert doc.kind == "pdf" and doc.media_type == "application/pdf"
    assert doc.data.startswith(b"%PDF-1.3")
    assert doc.data.rstrip().endswith(b"%%EOF")  # the base64 wrapped over two lines is whole


# --- generated ORUs ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("ending", ["\r", "\n", "\r\n"])
def test_generated_oru_round_trips_in_every_version_and_ending(version: str, ending: str) -> None:
    raw = oru(version=version, result_status="C")
    raw = raw.replace(b"\r", ending.encode())
    message = parse_message(raw)
    assert message.header.version == version
    assert message.header.charset == "utf-8"
    report = message.report
    assert report is not None
    assert report.text == REPORT
    assert report.study_uids == ("1.2.826.0.1.3680043.8.498.77",)
    assert (report.placer_field1, report.filler_order_number) == ("ACC123", "ACC123")
    assert report.result_status == "C"
    assert report.patient_id == "P1"


def test_sections_are_joined_in_order() -> None:
    sections = {"Findings": "Nodule (series 2, image 10).", "Impression": "Nodule.\nNo effusion."}
    report = parse_message(oru(report=sections)).report
    assert report is not None
    assert report.text == "Nodule (series 2, image 10).\nNodule.\nNo effusion."


def _replace_obx(raw: bytes, obx: list[str]) -> bytes:
    segments = [s for s in raw.decode().split("\r") if s and not s.startswith("OBX")]
    return ("\r".join(segments + obx) + "\r").encode()


def test_formatted_text_repetitions_and_a_multi_line_value() -> None:
    obx = [
        "OBX|1|FT|18782-3^Report^LN||"
        "Line one\\.br\\Line two\\H\\ bold\\N\\ \\X0A\\Line three||||||F",
        "OBX|2|TX|18782-3^Report^LN||Rep A~Rep B||||||F",
        "OBX|3|TX|18782-3^Report^LN||First line of one value\nsecond line\r\nthird line||||||F",
        "OBX|4|ST|18782-3^Report^LN||Last.||||||F",
    ]
    report = parse_message(_replace_obx(oru(), obx)).report
    assert report is not None
    assert report.text == (
        "Line one\nLine two bold \nLine three\nRep A\nRep B\n"
        "First line of one value\nsecond line\nthird line\nLast."
    )


def test_study_uid_from_zds_and_from_a_ui_observation() -> None:
    base = oru(study_uid=None)
    with_zds = base.replace(b"\rOBX|1|", b"\rZDS|1.2.3.4.5^RIS^Application^DICOM\rOBX|1|", 1)
    report = parse_message(with_zds).report
    assert report is not None and report.study_uids == ("1.2.3.4.5",)
    ui = _replace_obx(base, ["OBX|1|UI|^Study Instance UID||1.2.3.9||||||F"])
    report = parse_message(ui).report
    assert report is not None and report.study_uids == ("1.2.3.9",) and report.text is None
    assert report.unminable_reason is not None and "no report text" in report.unminable_reason


def test_latin1_declared_charset_is_decoded() -> None:
    text = "MSH|^~\\&|RIS|H|||||ORU^R01|L1|P|2.4||||||8859/1\rOBR|1||A1||||||||||||||A1\r"
    text += "OBX|1|TX|x||Größere Läsion||||||F\r"
    message = parse_message(text.encode("latin-1"))
    assert message.header.charset == "latin-1"
    assert message.report is not None and message.report.text == "Größere Läsion"


def test_non_oru_has_no_report() -> None:
    message = parse_message(real("ADT^A40-PatientMerge.hl7"))
    assert message.report is None
    assert [s[0] for s in message.segments] == ["MSH", "PID", "NTE", "MRG"]


# --- bad input --------------------------------------------------------------------------------

MSH = "MSH|^~\\&|RIS|HOSP|RF|RF|20260101||ORU^R01|X9|P|2.5.1"
BAD = [
    (b"", ErrorCode.SEGMENT_SEQUENCE, "AE", "does not start with an MSH"),
    (b"PID|1\rOBR|1\r", ErrorCode.SEGMENT_SEQUENCE, "AE", "does not start with an MSH"),
    (b"\x00\x01\x02\xff\xfe binary", ErrorCode.SEGMENT_SEQUENCE, "AE", "does not start"),
    (b"MSHX^~\\&|A\r", ErrorCode.DATA_TYPE, "AE", "no valid field separator"),
    (b"MSH|ab|RIS\r", ErrorCode.DATA_TYPE, "AE", "encoding characters are invalid"),
    (b"MSH|^~\\&|RIS|HOSP|||||ORU^R01||P|2.5.1\rOBR|1\r", ErrorCode.REQUIRED_FIELD_MISSING, "AE",
     "MSH-10"),
    (b"MSH|^~\\&|RIS|HOSP||||||X1|P|2.5.1\r", ErrorCode.REQUIRED_FIELD_MISSING, "AE", "MSH-9"),
    (b"MSH|^~\\&|RIS|HOSP|||||ORU^R01|X2|P|2.2\r", ErrorCode.UNSUPPORTED_VERSION, "AR",
     "version 2.2"),
    (b"MSH|^~\\&|RIS|HOSP|||||ORU^R01|X3|P|\r", ErrorCode.UNSUPPORTED_VERSION, "AR", "(none)"),
    (f"{MSH}\rPID|1\r".encode(), ErrorCode.SEGMENT_SEQUENCE, "AE", "no OBR"),
    (f"{MSH}\rOBR|1\r{MSH}\rOBR|1\r".encode(), ErrorCode.SEGMENT_SEQUENCE, "AE", "more than one"),
    ((MSH + "||||||UNICODE UTF-8\rOBX|1|TX|||caf\xe9\r").encode("latin-1"),
     ErrorCode.DATA_TYPE, "AE", "not valid UNICODE UTF-8"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "code", "ack", "words"), BAD)
def test_malformed_messages_raise_with_code_and_ack(
    raw: bytes, code: ErrorCode, ack: str, words: str
) -> None:
    with pytest.raises(HL7Error) as info:
        parse_message(raw)
    assert info.value.code == code
    assert info.value.ack == ack
    assert words in info.value.reason


def test_bad_encapsulated_data_is_accepted_with_the_reason() -> None:
    raw = _replace_obx(oru(), ["OBX|1|ED|18748-4^Report^LN||^Application^PDF^Base64^@@@@||||||F"])
    report = parse_message(raw).report
    assert report is not None and report.text is None
    assert report.unminable_reason is not None and "not valid Base64" in report.unminable_reason
    xml = "^Text^XML^A^<ClinicalDocument><component><x></ClinicalDocument>"
    report = parse_message(_replace_obx(oru(), [f"OBX|1|ED|x||{xml}||||||F"])).report
    assert report is not None and report.unminable_reason is not None
    assert "not well-formed XML" in report.unminable_reason
    bomb = '^Text^XML^A^<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>'
    report = parse_message(_replace_obx(oru(), [f"OBX|1|ED|x||{bomb}||||||F"])).report
    assert report is not None and report.unminable_reason is not None
    assert "DTD or entity" in report.unminable_reason


# --- ACKs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_error_ack_carries_reason_in_msa_and_err(version: str) -> None:
    header = read_header(oru(version=version, control_id="C77"))
    error = HL7Error(
        "report cannot be linked: no accession | no UID ^ & ~ \\",
        ErrorCode.REQUIRED_FIELD_MISSING,
        header=header,
        location="OBR^1^18",
    )
    raw = build_ack(header, "AE", control_id="ACK1", now=NOW, error=error)
    ack = apy_parse(raw.decode(), find_groups=False)
    assert ack.msh.msh_10.value == "ACK1"
    assert ack.msh.msh_7.to_er7() == "20260301120000"
    assert ack.msh.msh_9.to_er7() == ("ACK^R01" if version == "2.3" else "ACK^R01^ACK")
    assert ack.msa.msa_1.value == "AE"
    assert ack.msa.msa_2.value == "C77"
    assert ack.msa.msa_3.value.startswith("report cannot be linked: no accession")
    err = ack.err.to_er7()
    assert "101" in err and "Required field missing" in err and "OBR" in err
    if version in ("2.5", "2.5.1"):
        assert ack.err.err_4.to_er7() == "E"
        assert "report cannot be linked" in ack.err.err_8.to_er7()
    # one segment each: the reason's delimiters did not break the message structure
    assert [line[:3] for line in raw.decode().split("\r")] == ["MSH", "MSA", "ERR", ""]


def test_ack_without_a_readable_header() -> None:
    error = HL7Error("message does not start with an MSH segment", ErrorCode.SEGMENT_SEQUENCE)
    raw = build_ack(None, "AE", control_id="A2", now=NOW, error=error)
    ack = apy_parse(raw.decode(), find_groups=False)
    assert ack.msa.msa_1.value == "AE" and ack.msa.msa_2.value == ""
    assert ack.msh.msh_12.value == "2.5.1"


def test_enhanced_mode_gets_commit_codes_and_its_conditions() -> None:
    raw = oru().replace(b"|P|2.5.1|||", b"|P|2.5.1|||AL|NE", 1)
    header = read_header(raw)
    assert (header.accept_ack_type, header.application_ack_type) == ("AL", "NE")
    ack = apy_parse(build_ack(header, "AA", control_id="A3", now=NOW).decode())
    assert ack.msa.msa_1.value == "CA"
    original = read_header(oru())
    assert ack_wanted(original, True) and ack_wanted(original, False)
    never = read_header(oru().replace(b"|P|2.5.1|||", b"|P|2.5.1|||NE", 1))
    assert not ack_wanted(never, True) and not ack_wanted(never, False)
    errors = read_header(oru().replace(b"|P|2.5.1|||", b"|P|2.5.1|||ER", 1))
    assert not ack_wanted(errors, True) and ack_wanted(errors, False)


def test_generated_message_files_from_synth_parse(tmp_path: Path) -> None:
    from radfinder_node.synth import synth_hl7

    (path,) = synth_hl7(tmp_path, 1, 0, (40, 32, 32), (2.5, 5.0, 5.0))
    report = parse_message(path.read_bytes()).report
    assert report is not None and report.text
    assert report.placer_field1.startswith("SYN") and len(report.study_uids) == 1


def test_acks_of_one_feed_differ_only_where_they_must() -> None:
    first = build_ack(read_header(oru(control_id="C1")), "AA", control_id="A1", now=NOW)
    second_header = read_header(oru(control_id="C|2"))  # the writer escapes it: C\F\2
    assert second_header.control_id == "C|2"
    later = datetime(2026, 3, 1, 12, 0, 5)
    second = build_ack(second_header, "AA", control_id="A2", now=later)
    a, b = apy_parse(first.decode()), apy_parse(second.decode())
    assert (a.msa.msa_2.value, b.msa.msa_2.to_er7()) == ("C1", "C\\F\\2")
    assert (a.msh.msh_10.value, b.msh.msh_10.value) == ("A1", "A2")
    assert (a.msh.msh_7.to_er7(), b.msh.msh_7.to_er7()) == ("20260301120000", "20260301120005")
    assert first.split(b"\r")[0].split(b"|")[:6] == second.split(b"\r")[0].split(b"|")[:6]
