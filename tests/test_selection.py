"""Series selection: conditions, rules, preference, configuration, and real scanners' headers."""

from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError

from dicom_io.selection import (
    DEFAULT_SELECTION,
    Condition,
    Decision,
    Preference,
    Rule,
    SeriesSummary,
    evaluate,
    kernel_class,
    kernel_softness,
    orientation_label,
    rules_from_config,
    select_series,
    summary_from_headers,
)
from dicom_io.synthetic import ct_datasets, enhanced_ct_dataset

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real"
LUNG_DX = REAL / "lung-pet-ct-dx" / "Lung-PET-CT-Dx" / "manifest-1675442780019" / "Lung-PET-CT-Dx"
QA_CT = REAL / "dcm_qa_ct"

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
CHEST: dict[str, Any] = {
    "Modality": "CT",
    "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
    "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
    "BodyPartExamined": "CHEST",
    "StudyDescription": "CT Chest",
    "SeriesDescription": "Chest 1.0 B30f",
    "SliceThickness": 1.0,
    "ConvolutionKernel": "B30f",
    "ImageOrientationPatient": AXIAL,
    "SeriesNumber": 2,
}


def summary(uid: str = "1.2.3", study: str = "1.2", n: int = 100, **attrs: Any) -> SeriesSummary:
    """A chest series with ``attrs`` overriding; ``None`` removes an attribute."""
    merged = {**CHEST, **attrs}
    return SeriesSummary(study, uid, n, {k: v for k, v in merged.items() if v is not None})


def check(condition: Condition, s: SeriesSummary) -> tuple[bool, str]:
    return evaluate(Rule("r", all=(condition,)), s)


def default_rules() -> tuple[list[Rule], Preference]:
    return rules_from_config(DEFAULT_SELECTION)


# --- conditions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "attrs", "ok"),
    [
        # regex: case-insensitive search, any value of a multi-valued attribute
        (Condition("SeriesDescription", regex="chest"), {}, True),
        (Condition("SeriesDescription", regex="^CHEST"), {}, True),
        (Condition("SeriesDescription", regex="lung"), {}, False),
        (Condition("ImageType", regex="^AX"), {}, True),
        (Condition("ImageType", regex="LOCALIZER"), {}, False),
        # min / max: inclusive, numbers given as text too
        (Condition("SliceThickness", min=1.0, max=1.0), {}, True),
        (Condition("SliceThickness", max=3), {"SliceThickness": "5.00"}, False),
        (Condition("SliceThickness", min=0.5, max=3), {"SliceThickness": "1.25"}, True),
        (Condition("SliceThickness", min=1), {"SliceThickness": "thin"}, False),
        # in: case-insensitive text, numeric equality, any of a multi-valued attribute
        (Condition("Modality", in_=("ct",)), {}, True),
        (Condition("Modality", in_=("CT",)), {"Modality": "SR"}, False),
        (Condition("SeriesNumber", in_=(2, 3)), {"SeriesNumber": "2"}, True),
        (Condition("ImageType", in_=("AXIAL", "HELIX")), {}, True),
        # not_in: no value may be excluded
        (Condition("ImageType", not_in=("LOCALIZER",)), {}, True),
        (
            Condition("ImageType", not_in=("LOCALIZER",)),
            {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
            False,
        ),
        # contains_all: every listed value present
        (Condition("ImageType", contains_all=("ORIGINAL", "PRIMARY")), {}, True),
        (
            Condition("ImageType", contains_all=("ORIGINAL", "PRIMARY")),
            {"ImageType": ["DERIVED", "PRIMARY"]},
            False,
        ),
        # missing or empty fails unless allowed
        (Condition("BodyPartExamined", regex="CHEST"), {"BodyPartExamined": None}, False),
        (Condition("BodyPartExamined", regex="CHEST"), {"BodyPartExamined": ""}, False),
        (Condition("ImageType", not_in=("LOCALIZER",)), {"ImageType": []}, False),
        (
            Condition("BodyPartExamined", regex="CHEST", allow_missing=True),
            {"BodyPartExamined": None},
            True,
        ),
        (
            Condition("BodyPartExamined", regex="CHEST", allow_missing=True),
            {"BodyPartExamined": "HEAD"},
            False,
        ),
        # pseudo attributes
        (Condition("orientation", in_=("AXIAL",)), {}, True),
        (Condition("orientation", in_=("AXIAL",)), {"ImageOrientationPatient": None}, False),
        (Condition("kernel_softness", min=60), {}, True),
        (Condition("kernel_softness", min=60), {"ConvolutionKernel": "B70f"}, False),
        (Condition("n_frames", min=200), {"NumberOfFrames": 3}, True),
    ],
)
def test_condition(condition: Condition, attrs: dict[str, Any], ok: bool) -> None:
    matched, reason = check(condition, summary(**attrs))
    assert matched is ok, reason
    if not ok:
        assert condition.attribute in reason


def test_condition_reasons_name_value_and_test() -> None:
    s = summary(Modality="SR", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], n=1)
    assert (
        check(Condition("Modality", in_=("CT",)), s)[1] == "rule 'r': Modality 'SR' not in ['CT']"
    )
    assert (
        "contains excluded 'LOCALIZER'"
        in check(Condition("ImageType", not_in=("LOCALIZER",)), s)[1]
    )
    assert "n_instances 1 < min 20" in check(Condition("n_instances", min=20), s)[1]
    assert (
        "BodyPartExamined is missing"
        in check(Condition("BodyPartExamined", regex="x"), summary(BodyPartExamined=None))[1]
    )


def test_n_instances_and_n_frames() -> None:
    classic = summary(n=64)
    enhanced = summary(n=1, NumberOfFrames=300)
    assert check(Condition("n_instances", min=20), classic)[0]
    assert not check(Condition("n_instances", min=20), enhanced)[0]
    assert check(Condition("n_frames", min=20), classic)[0]
    assert check(Condition("n_frames", min=20), enhanced)[0]


@pytest.mark.parametrize(
    ("iop", "label"),
    [
        (AXIAL, "AXIAL"),
        ([1, 0, 0, 0, 0, -1], "CORONAL"),
        ([0, 1, 0, 0, 0, -1], "SAGITTAL"),
        ([1, 0, 0, 0, 0.9483237, -0.3173047], "AXIAL"),  # 18.5 degree gantry tilt
        ([1, 0, 0, 0, 0.7071068, -0.7071068], "OBLIQUE"),
        ([1, 0, 0], None),
        (None, None),
    ],
)
def test_orientation_label(iop: list[float] | None, label: str | None) -> None:
    assert orientation_label(iop) == label


@pytest.mark.parametrize(
    ("kernel", "cls"),
    [
        ("B30f", "soft"),
        ("B40f", "soft"),
        ("Br38f", "soft"),
        (["Br38f", "3"], "soft"),
        ("I30f", "soft"),
        ("B45f", "medium"),
        ("B50f", "sharp"),
        ("B70f", "sharp"),
        ("I70f", "sharp"),
        ("STANDARD", "soft"),
        ("SOFT", "soft"),
        ("STD+", "soft"),
        ("LUNG", "sharp"),
        ("BONE", "sharp"),
        ("A", "soft"),
        ("B", "soft"),
        ("C", "soft"),
        ("UB", "soft"),
        ("L", "sharp"),
        ("D", "sharp"),
        ("YA", "sharp"),
        ("FC07", "soft"),
        ("FC52", "sharp"),
        ("mystery", None),
        (None, None),
    ],
)
def test_kernel_classes(kernel: Any, cls: str | None) -> None:
    assert kernel_class(kernel) == cls


def test_kernel_softness_orders_within_vendor() -> None:
    scores = [kernel_softness(k) for k in ("B20f", "B30f", "B45f", "B70f")]
    assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]


# --- rules --------------------------------------------------------------------------------------


def test_rule_all_lists_every_failure() -> None:
    rules, _ = default_rules()
    s = summary(
        Modality="CT",
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        ImageOrientationPatient=[0, 1, 0, 0, 0, -1],
        n=1,
    )
    ok, reason = evaluate(rules[0], s)
    assert not ok
    assert reason.startswith("rule 'chest-ct': ")
    assert "contains excluded 'LOCALIZER'" in reason
    assert "orientation 'SAGITTAL' not in ['AXIAL']" in reason
    assert "n_frames 1 < min 20" in reason


def test_rule_any_falls_back_to_descriptions() -> None:
    rules, _ = default_rules()
    s = summary(BodyPartExamined=None, StudyDescription="Thx routine", SeriesDescription="5mm")
    ok, reason = evaluate(rules[0], s)
    assert ok and reason == "rule 'chest-ct' matched on StudyDescription 'Thx routine'"
    ok, reason = evaluate(
        rules[0],
        summary(BodyPartExamined="HEAD", StudyDescription="Head", SeriesDescription="Brain"),
    )
    assert not ok
    assert "none of the 'any' conditions hold" in reason
    assert "BodyPartExamined 'HEAD' does not match" in reason


def test_rule_without_any_needs_only_all() -> None:
    rule = Rule("ct", all=(Condition("Modality", in_=("CT",)),))
    assert evaluate(rule, summary(BodyPartExamined="HEAD"))[0]


# --- preference and selection -------------------------------------------------------------------


def test_thinnest_wins() -> None:
    rules, pref = default_rules()
    thick = summary("1.1", SliceThickness=5.0, ConvolutionKernel="B30f")
    thin = summary("1.2", SliceThickness=1.0, ConvolutionKernel="B70f")
    decisions = select_series([thick, thin], rules, pref)
    assert [d.selected for d in decisions] == [False, True]
    assert decisions[0].reason == "not preferred: study has thinner series 1.2 (1 mm < 5 mm)"
    assert decisions[1].reason == (
        "selected by rule 'chest-ct' (preferred: thinnest, soft kernel, most instances); "
        "matched on BodyPartExamined 'CHEST'"
    )


@pytest.mark.parametrize(("sharp", "soft"), [("B70f", "B40f"), ("LUNG", "STANDARD"), ("L", "B")])
def test_equal_thickness_soft_kernel_wins(sharp: str, soft: str) -> None:
    rules, pref = default_rules()
    a = summary("1.1", ConvolutionKernel=sharp, SeriesNumber=2)
    b = summary("1.2", ConvolutionKernel=soft, SeriesNumber=3)
    decisions = select_series([a, b], rules, pref)
    assert [d.selected for d in decisions] == [False, True]
    assert "softer-kernel series 1.2" in decisions[0].reason
    assert f"{soft!r} soft vs {sharp!r} sharp" in decisions[0].reason


def test_then_more_instances_then_lower_series_number() -> None:
    rules, pref = default_rules()
    few, many = summary("1.1", n=40, SeriesNumber=2), summary("1.2", n=80, SeriesNumber=3)
    decisions = select_series([few, many], rules, pref)
    assert [d.selected for d in decisions] == [False, True]
    assert "more instances (80 > 40)" in decisions[0].reason
    first, second = summary("1.1", SeriesNumber=5), summary("1.2", SeriesNumber=4)
    decisions = select_series([first, second], rules, pref)
    assert [d.selected for d in decisions] == [False, True]
    assert "lower SeriesNumber (4 < 5)" in decisions[0].reason


def test_missing_thickness_ranks_last() -> None:
    rules, pref = default_rules()
    unknown = summary("1.1", SliceThickness=None, ConvolutionKernel="B20f")
    known = summary("1.2", SliceThickness=3.0, ConvolutionKernel="B70f")
    decisions = select_series([unknown, known], rules, pref)
    assert [d.selected for d in decisions] == [False, True]


def test_one_decision_per_series_in_input_order_one_per_study() -> None:
    rules, pref = default_rules()
    inputs = [
        summary("1.1", study="A", SliceThickness=5.0),
        summary("1.2", study="B", Modality="SR"),
        summary("1.3", study="A", SliceThickness=1.0),
        summary("1.4", study="B", SliceThickness=2.0),
        summary("1.5", study="C", n=3),
    ]
    decisions = select_series(inputs, rules, pref)
    assert [d.series_uid for d in decisions] == [s.series_uid for s in inputs]
    assert all(isinstance(d, Decision) and d.reason for d in decisions)
    assert {d.series_uid for d in decisions if d.selected} == {"1.3", "1.4"}
    by_uid = {d.series_uid: d.reason for d in decisions}
    assert by_uid["1.2"] == "not a candidate: rule 'chest-ct': Modality 'SR' not in ['CT']"
    assert by_uid["1.5"] == "not a candidate: rule 'chest-ct': n_frames 3 < min 20"


def test_all_candidates_when_not_one_per_study() -> None:
    rules, pref = default_rules()
    decisions = select_series(
        [summary("1.1", SliceThickness=5.0), summary("1.2")], rules, pref, one_per_study=False
    )
    assert all(d.selected for d in decisions)
    assert decisions[0].reason == "selected by rule 'chest-ct'; matched on BodyPartExamined 'CHEST'"


def test_several_rules_any_one_makes_a_candidate() -> None:
    rules = [
        Rule("chest", all=(Condition("BodyPartExamined", in_=("CHEST",)),)),
        Rule("lung-protocol", all=(Condition("ProtocolName", regex="lung"),)),
    ]
    s = summary(BodyPartExamined="ABDOMEN", ProtocolName="Low-dose lung screening")
    (decision,) = select_series([s], rules, Preference())
    assert decision.selected and "'lung-protocol'" in decision.reason
    (decision,) = select_series([summary(BodyPartExamined="HEAD")], rules, Preference())
    assert not decision.selected
    assert "rule 'chest'" in decision.reason and "rule 'lung-protocol'" in decision.reason


def test_custom_preference_keys() -> None:
    rules, pref = rules_from_config({"prefer": [["Rows", "desc"], "thinnest"]})
    small = summary("1.1", Rows=256, SliceThickness=1.0)
    big = summary("1.2", Rows=512, SliceThickness=5.0)
    decisions = select_series([small, big], rules, pref)
    assert [d.selected for d in decisions] == [False, True]
    assert "ranked first by Rows desc (512 vs 256)" in decisions[0].reason


# --- configuration ------------------------------------------------------------------------------


def test_default_config_parses_as_documented() -> None:
    rules, pref = default_rules()
    assert [r.name for r in rules] == ["chest-ct"]
    assert len(rules[0].all) == 5 and len(rules[0].any) == 4
    assert pref.keys == (
        ("SliceThickness", "asc"),
        ("kernel_softness", "desc"),
        ("n_instances", "desc"),
    )
    # Accepts the whole document too, and omitted keys take their defaults.
    assert rules_from_config({"selection": DEFAULT_SELECTION})[0] == rules
    assert rules_from_config({"one_per_study": False}) == (rules, pref)


def test_config_from_toml_text() -> None:
    import tomllib

    data = tomllib.loads(
        """
[selection]
one_per_study = true
prefer = ["thinnest", "soft_kernel"]
[[selection.rules]]
name = "chest-ct"
all = [ {attribute="Modality", in=["CT"]},
        {attribute="ImageType", contains_all=["ORIGINAL","PRIMARY"], not_in=["LOCALIZER"]},
        {attribute="n_instances", min=20, max=2000} ]
any = [ {attribute="BodyPartExamined", regex="CHEST", allow_missing=false} ]
"""
    )
    rules, pref = rules_from_config(data["selection"])
    assert rules[0].all[1] == Condition(
        "ImageType", contains_all=("ORIGINAL", "PRIMARY"), not_in=("LOCALIZER",)
    )
    assert rules[0].all[2].min == 20 and rules[0].all[2].max == 2000
    assert pref.keys == (("SliceThickness", "asc"), ("kernel_softness", "desc"))


def _with(path: str, value: Any) -> dict[str, Any]:
    """DEFAULT_SELECTION with one value replaced; path like 'rules.0.all.1'."""
    data = copy.deepcopy(DEFAULT_SELECTION)
    *parents, last = path.split(".")
    node: Any = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"rulez": []}, "unknown key(s) 'rulez'"),
        (
            _with("rules.0.colour", "red"),
            "selection.rules[0] ('chest-ct'): unknown key(s) 'colour'",
        ),
        (
            _with("rules.0.all.0", {"attribute": "Modality", "equals": "CT"}),
            "selection.rules[0] ('chest-ct').all[0]: unknown key(s) 'equals'",
        ),
        (_with("rules.0.any.0", {"attribute": "BodyPartExamined", "regex": "("}), "bad regex '('"),
        (
            _with("rules.0.all.0", {"attribute": "Modalty", "in": ["CT"]}),
            "unknown attribute 'Modalty'",
        ),
        (_with("rules.0.all.0", {"attribute": "Modality"}), "has no test"),
        (
            _with("rules.0.all.0", {"attribute": "Modality", "in": "CT"}),
            "all[0].in: expected a list",
        ),
        (
            _with("rules.0.all.0", {"attribute": "n_instances", "min": "20"}),
            "min: expected a number",
        ),
        (
            _with("rules.0.all.0", {"attribute": "n_instances", "min": 9, "max": 2}),
            "greater than max",
        ),
        (
            _with("rules.0.all.0", {"attribute": "Modality", "in": ["CT"], "allow_missing": 1}),
            "allow_missing",
        ),
        ({"rules": [{"name": "x"}]}, "rule has no conditions"),
        ({"rules": [{"all": [{"attribute": "Modality", "in": ["CT"]}]}]}, "non-empty 'name'"),
        ({"rules": []}, "no series would ever be selected"),
        ({"rules": [DEFAULT_SELECTION["rules"][0]] * 2}, "duplicate rule names"),
        ({"prefer": ["thickest"]}, "unknown preference 'thickest'"),
        ({"prefer": [["SliceThickness", "up"]]}, "expected [attribute, 'asc'|'desc']"),
        ({"one_per_study": "yes"}, "one_per_study: expected true or false"),
        ({"rules": "chest"}, "selection.rules: expected a list"),
    ],
)
def test_bad_config_is_refused_with_a_clear_reason(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        rules_from_config(data)
    assert needle in str(excinfo.value)


def test_default_config_is_not_mutated_by_parsing() -> None:
    before = copy.deepcopy(DEFAULT_SELECTION)
    rules_from_config(DEFAULT_SELECTION)
    assert before == DEFAULT_SELECTION


# --- summaries from headers ---------------------------------------------------------------------


def test_synthetic_classic_and_enhanced_series_are_selected() -> None:
    hu = np.full((24, 8, 8), 40.0, dtype=np.float32)
    classic = summary_from_headers(list(ct_datasets(hu, (1.0, 0.7, 0.7), seed=1)))
    enhanced = summary_from_headers([enhanced_ct_dataset(hu, (1.0, 0.7, 0.7), seed=1)])
    assert classic.attributes["ImageOrientationPatient"] == AXIAL
    assert classic.attributes["SliceThickness"] == 1.0
    assert enhanced.n_instances == 1
    # Enhanced CT keeps orientation, thickness and kernel in its functional groups.
    assert enhanced.attributes["ImageOrientationPatient"] == AXIAL
    assert enhanced.attributes["ConvolutionKernel"] == "B30f"
    assert enhanced.attributes["NumberOfFrames"] == 24
    rules, pref = default_rules()
    decisions = select_series([classic], rules, pref) + select_series([enhanced], rules, pref)
    assert all(d.selected for d in decisions), [d.reason for d in decisions]


def test_summary_from_headers_refuses_mixed_or_empty_input() -> None:
    hu = np.zeros((2, 4, 4), dtype=np.float32)
    a = list(ct_datasets(hu, (1.0, 1.0, 1.0), seed=1))
    b = list(ct_datasets(hu, (1.0, 1.0, 1.0), seed=1, series_number=3))
    with pytest.raises(ValueError, match="several series"):
        summary_from_headers(a + b)
    with pytest.raises(ValueError, match="at least one"):
        summary_from_headers([])


# --- real headers -------------------------------------------------------------------------------

needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real test data not found at {REAL}")


def read_series(*dirs: Path) -> list[SeriesSummary]:
    """Summaries of every series whose files lie directly in ``dirs`` (DIRFILEs etc. skipped)."""
    by_series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for d in dirs:
        for path in sorted(p for p in d.iterdir() if p.is_file()):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except InvalidDicomError:
                continue
            if "SeriesInstanceUID" in ds and "SOPInstanceUID" in ds:
                by_series[str(ds.SeriesInstanceUID)].append(ds)
    return [summary_from_headers(v) for v in by_series.values()]


def decide(summaries: list[SeriesSummary]) -> dict[str, tuple[SeriesSummary, Decision]]:
    rules, pref = default_rules()
    return {
        s.series_uid: (s, d)
        for s, d in zip(summaries, select_series(summaries, rules, pref), strict=True)
    }


@needs_real
def test_lung_pet_ct_dx_a0001_picks_the_soft_kernel_without_body_part() -> None:
    study = LUNG_DX / "Lung_Dx-A0001" / "04-04-2007-NA-Chest-07990"
    results = decide(read_series(*sorted(study.iterdir())))
    assert len(results) == 2
    chosen = [(s, d) for s, d in results.values() if d.selected]
    assert len(chosen) == 1
    s, d = chosen[0]
    assert "BodyPartExamined" not in s.attributes  # empty in the real headers
    assert s.attributes["StudyDescription"] == "Chest"
    assert (s.attributes["ConvolutionKernel"], s.attributes["SliceThickness"]) == ("B", 5.0)
    assert d.reason.startswith("selected by rule 'chest-ct'")
    assert d.reason.endswith("matched on StudyDescription 'Chest'")  # the fallback did it
    (loser, why) = next((s, d) for s, d in results.values() if not d.selected)
    assert loser.attributes["ConvolutionKernel"] == "L"
    assert "softer-kernel" in why.reason and "'B' soft vs 'L' sharp" in why.reason


@needs_real
def test_lung_pet_ct_dx_a0002_picks_b40f() -> None:
    study = LUNG_DX / "Lung_Dx-A0002"
    results = decide(read_series(*sorted(p for p in study.glob("*/*") if p.is_dir())))
    kernels = {s.attributes["ConvolutionKernel"]: d for s, d in results.values()}
    assert set(kernels) == {"B40f", "B70f"}
    assert kernels["B40f"].selected and not kernels["B70f"].selected
    assert "'B40f' soft vs 'B70f' sharp" in kernels["B70f"].reason


@needs_real
def test_dcm_qa_ct_scout_summary_and_head_are_not_selected() -> None:
    philips = QA_CT / "Philips" / "S21610"
    results = decide(read_series(philips / "S1000", philips / "S2010", philips / "S4010"))
    by_number = {int(s.attributes["SeriesNumber"]): d for s, d in results.values()}
    assert set(by_number) == {100, 201, 401}
    assert not any(d.selected for d in by_number.values())
    scout = by_number[100].reason  # S1000
    assert "contains excluded 'LOCALIZER'" in scout and "orientation 'SAGITTAL'" in scout
    summary_sc = by_number[401].reason  # S4010 "Exam Summary", Secondary Capture
    assert "SOPClassUID '1.2.840.10008.5.1.4.1.1.7' not in" in summary_sc
    assert "lacks ['ORIGINAL', 'PRIMARY']" in summary_sc
    head = by_number[201].reason  # S2010, tilted head CT
    assert "none of the 'any' conditions hold" in head
    assert "BodyPartExamined 'BRAIN' does not match" in head


@needs_real
def test_dcm_qa_ct_other_head_cts_are_not_chest() -> None:
    results = decide(read_series(QA_CT / "GE", QA_CT / "Philips" / "S21570" / "S2010"))
    assert len(results) == 2
    for s, d in results.values():
        assert not d.selected
        body = s.attributes["BodyPartExamined"]
        assert f"BodyPartExamined {body!r} does not match" in d.reason


@needs_real
def test_empty_sop_class_falls_back_to_file_meta() -> None:
    (s,) = read_series(REAL / "totalsegmentator" / "example_ct_dicom")
    assert s.attributes["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.2"
    assert s.attributes["ConvolutionKernel"] == ["Br38f", "3"]
    (_, d) = decide([s])[s.series_uid]
    assert not d.selected and "BodyPartExamined 'PARTIALBODY' does not match" in d.reason
