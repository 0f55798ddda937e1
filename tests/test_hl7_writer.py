"""ORU^R01 writer: a third-party parser (hl7apy) must read back exactly what was meant."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hl7apy.parser import parse_message  # type: ignore[import-untyped]

from engines.data.reports import write_report
from reports.hl7_writer import (
    STUDY_UID_OBSERVATION,
    escape,
    mllp_frame,
    oru_r01,
    unescape,
)

WHEN = datetime(2024, 3, 5, 14, 30, 0)
TEXT = (
    "FINDINGS:\n"
    "A 8 mm nodule in the right upper lobe (series 2, image 45).\n"
    "\n"
    "Odd characters: a|b ^c &d ~e \\f, Größe 5 mm.\n"
    "IMPRESSION:\n"
    "Nodule."
)


def message(report: Any = TEXT, **overrides: Any) -> bytes:
    args: dict[str, Any] = {
        "accession_number": "ACC123",
        "patient_id": "PID-9",
        "patient_name": "Doe^Jane^Q",
        "study_uid": "1.2.826.0.1.3680043.8.498.1",
        "placer_order": "PO-77",
        "filler_order": None,
        "observation_datetime": WHEN,
        "sending_facility": "GENERAL HOSPITAL",
        "control_id": "MSG0001",
    }
    args.update(overrides)
    return oru_r01(report, **args)


def parsed(raw: bytes, find_groups: bool = False) -> Any:
    return parse_message(raw.decode("utf-8"), find_groups=find_groups)


def text_obx(msg: Any) -> list[Any]:
    return [obx for obx in msg.obx if obx.obx_2.value == "TX"]


def test_parses_and_carries_the_keys() -> None:
    raw = message()
    assert b"\n" not in raw and raw.endswith(b"\r")
    msg = parsed(raw)
    assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert msg.msh.msh_10.value == "MSG0001"
    assert msg.msh.msh_4.to_er7() == "GENERAL HOSPITAL"
    assert msg.msh.msh_12.to_er7() == "2.5.1"
    assert msg.pid.pid_3.to_er7().split("^")[0] == "PID-9"
    assert msg.pid.pid_5.to_er7() == "Doe^Jane^Q"
    assert msg.obr.obr_18.value == "ACC123"
    assert msg.obr.obr_3.to_er7() == "ACC123"  # filler order defaults to the accession
    assert msg.obr.obr_2.to_er7() == "PO-77" and msg.orc.orc_2.to_er7() == "PO-77"
    assert msg.obr.obr_25.value == "F"
    assert msg.obr.obr_7.to_er7() == "20240305143000"


def test_report_lines_come_back_in_order() -> None:
    msg = parsed(message())
    lines = [unescape(obx.obx_5.to_er7()) for obx in text_obx(msg)]
    assert lines == TEXT.split("\n")
    assert [int(obx.obx_1.value) for obx in msg.obx] == list(range(1, len(msg.obx) + 1))
    assert {obx.obx_11.value for obx in msg.obx} == {"F"}


def test_study_uid_observation() -> None:
    msg = parsed(message())
    (uid_obx,) = [obx for obx in msg.obx if obx.obx_2.value == "HD"]
    assert uid_obx.obx_3.to_er7() == STUDY_UID_OBSERVATION
    assert uid_obx.obx_5.to_er7() == "1.2.826.0.1.3680043.8.498.1"
    none = parsed(message(study_uid=None))
    assert [obx.obx_2.value for obx in none.obx] == ["TX"] * len(TEXT.split("\n"))


def test_structure_validates_against_hl7apy_251() -> None:
    msg = parsed(message(), find_groups=True)
    assert msg.validate()
    assert [c.name for c in msg.children] == ["MSH", "ORU_R01_PATIENT_RESULT"]


def test_sections_get_their_codes_and_sub_ids() -> None:
    sections = {
        "ClinicalInformation_EN": "Cough.",
        "Technique_EN": "Non-contrast chest CT.",
        "Findings_EN": "Nodule (series 2, image 45).\nNo effusion.",
        "Impressions_EN": "Nodule.",
    }
    msg = parsed(message(sections, filler_order="F-1", result_status="C"))
    rows = [
        (o.obx_3.to_er7().split("^")[0], o.obx_4.to_er7(), o.obx_5.to_er7()) for o in text_obx(msg)
    ]
    assert rows == [
        ("55752-0", "1", "Cough."),
        ("55111-9", "2", "Non-contrast chest CT."),
        ("59776-5", "3", "Nodule (series 2, image 45)."),
        ("59776-5", "3", "No effusion."),
        ("19005-8", "4", "Nodule."),
    ]
    assert msg.obr.obr_3.to_er7() == "F-1" and msg.obr.obr_18.value == "ACC123"
    assert msg.obr.obr_25.value == "C" and {o.obx_11.value for o in msg.obx} == {"C"}


@dataclass
class Nodule:
    label: str = "Lung nodule"
    label_index: int = 9
    side: str | None = "right"
    lobe: str | None = "RUL"
    size_mm: float = 8.0
    center_voxel: tuple[int, int, int] = (30, 20, 20)
    z_extent: tuple[int, int] = (28, 33)
    extra: dict[str, Any] = field(default_factory=dict)


def test_a_synthetic_report_round_trips() -> None:
    report = write_report([Nodule()], seed=4, n_slices=60, series_number=2, language="de")
    msg = parsed(message(report.text))
    assert "\n".join(unescape(o.obx_5.to_er7()) for o in text_obx(msg)) == report.text.rstrip("\n")


def test_escaping_and_dates() -> None:
    for text in ("a|b^c&d~e\\f", "\\F\\ literal", "plain", "Über"):
        assert unescape(escape(text)) == text
    aware = WHEN.replace(tzinfo=timezone(timedelta(hours=-5, minutes=-30)))
    msg = parsed(message(observation_datetime=aware))
    assert msg.obr.obr_7.to_er7() == "20240305143000-0530"


def test_same_input_same_bytes_and_bad_input_refused() -> None:
    assert message() == message()
    with pytest.raises(ValueError, match="result_status"):
        message(result_status="Z")
    with pytest.raises(ValueError, match="control_id"):
        message(control_id="")


def test_mllp_frame() -> None:
    raw = message()
    framed = mllp_frame(raw)
    assert framed == b"\x0b" + raw + b"\x1c\r"
    with pytest.raises(ValueError):
        mllp_frame(b"MSH|\x1c")
