"""Synthetic reports: every citation's truth must hold exactly, or a miner learns lies.

Findings come from the real phantom generator when it exists (``generate_phantom``), otherwise
from small stand-ins of the same shape, so these tests run before and after it lands.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from engines.data import phantoms
from engines.data.reports import (
    CITATION_FORMS,
    REPORT_LABELS,
    Citation,
    FindingLike,
    Report,
    write_report,
)
from standins import StandInFinding

REAL_PHANTOM_SEEDS = 8
LUNG_LOBES = ("RUL", "RML", "RLL", "LUL", "LLL", "upper", "lower", None)


def stand_in_findings(seed: int, n_slices: int, k: int | None = None) -> list[StandInFinding]:
    """Random findings with extents anywhere in the volume, some elongated, some one slice."""
    rng = random.Random(seed)
    count = rng.randint(0, 6) if k is None else k
    out = []
    for _ in range(count):
        index = rng.randrange(len(REPORT_LABELS))
        first = rng.randrange(n_slices)
        last = min(n_slices - 1, first + rng.choice((0, 1, 2, 5, 20)))
        out.append(
            StandInFinding(
                label=REPORT_LABELS[index],
                label_index=index,
                side=rng.choice(("left", "right", "bilateral", None)),
                lobe=rng.choice(LUNG_LOBES),
                size_mm=rng.choice((0.0, 2.5, 6.0, 8.0, 11.0, 23.0)),
                center_voxel=(rng.randint(first, last), 40, 30),
                z_extent=(first, last),
            )
        )
    return out


@functools.cache
def findings_for(seed: int, n_slices: int) -> tuple[FindingLike, ...]:
    """Real phantom findings for a few seeds (kept fast), stand-ins for the rest."""
    generate = getattr(phantoms, "generate_phantom", None)
    if generate is None or seed >= REAL_PHANTOM_SEEDS:
        return tuple(stand_in_findings(seed, n_slices))
    phantom = generate((n_slices, 48, 48), (5.0, 7.0, 7.0), seed=seed)
    return tuple(phantom.findings)


def numbered_from_top(n: int) -> Callable[[int], int]:
    return lambda z: n - z


def check_citation(report: Report, c: Citation, finding: FindingLike, image_of: Any) -> None:
    span = report.text[c.start : c.end]
    f_start, f_end = report.findings_span(c)
    assert report.findings[f_start:f_end] == span
    for image in c.images:
        assert re.search(rf"(?<!\d){image}(?!\d)", span), (span, c)
    if c.series is not None:
        assert str(c.series) in span
    assert c.image == c.images[0] and c.z_index == c.z_indices[0]
    assert c.finding_label == finding.label
    first, last = finding.z_extent
    for z, image in zip(c.z_indices, c.images, strict=True):
        assert first <= z <= last
        assert image == image_of(z)
    assert c.sentence_start <= c.start < c.end <= c.sentence_end
    # No other digits glued to a citation: nothing a miner could take for part of it.
    assert not re.search(r"\d", report.text[max(0, c.start - 3) : c.start])
    assert not re.search(r"\d", report.text[c.end : c.end + 3])


@pytest.mark.parametrize("language", ["en", "de"])
def test_every_citation_points_where_its_truth_says(language: str) -> None:
    seen = 0
    for seed in range(120):
        n = 40 + seed % 50
        findings = findings_for(seed, n)
        image_of = numbered_from_top(n) if seed % 2 else (lambda z: z + 1)
        report = write_report(
            findings,
            seed=seed,
            n_slices=n,
            series_number=2 + seed % 300,
            instance_number_of_z=image_of if seed % 2 else None,
            language=language,
            cite_probability=1.0,
        )
        assert report.text[report.findings_offset :].startswith(report.findings)
        for c in report.citations:
            check_citation(report, c, findings[c.finding_index], image_of)
        # Every located finding is cited when the probability is 1.
        assert sorted(c.finding_index for c in report.citations) == list(range(len(findings)))
        seen += len(report.citations)
    assert seen > 100


def test_snippet_is_the_sentence_without_its_citation() -> None:
    for seed in range(60):
        findings = stand_in_findings(seed, 64, k=4)
        report = write_report(findings, seed=seed, n_slices=64, series_number=3)
        for c in report.citations:
            sentence = report.text[c.sentence_start : c.sentence_end]
            citation = report.text[c.start : c.end]
            prefix = 0
            while prefix < len(c.snippet) and c.snippet[prefix] == sentence[prefix]:
                prefix += 1
            rest = c.snippet[prefix:]
            assert sentence.endswith(rest)
            removed = sentence[prefix : len(sentence) - len(rest)]
            assert citation in removed and len(removed) - len(citation) <= len(" between ")
            assert c.snippet.endswith(".") and "  " not in c.snippet


def test_same_seed_same_report_other_seed_other_report() -> None:
    findings = stand_in_findings(7, 64, k=5)
    a = write_report(findings, seed=11, n_slices=64, series_number=2)
    b = write_report(findings, seed=11, n_slices=64, series_number=2)
    c = write_report(findings, seed=12, n_slices=64, series_number=2)
    assert a == b
    assert a.text != c.text


def test_absent_labels_are_negated_and_present_ones_are_not() -> None:
    findings = [
        StandInFinding("Lung nodule", 9, "right", "RUL", 8.0, (30, 20, 20), (29, 31)),
        StandInFinding("Pleural effusion", 12, "left", None, 14.0, (8, 20, 20), (2, 15)),
    ]
    for seed in range(20):
        report = write_report(
            findings, seed=seed, n_slices=60, series_number=2, present_labels={"Emphysema"}
        )
        present = {"Lung nodule", "Pleural effusion", "Emphysema"}
        assert set(report.negations) == set(REPORT_LABELS) - present
        for sentence in report.negations.values():
            assert sentence in report.findings
        assert "Heart size is normal." in report.negations.values() or any(
            "cardiomegaly" in s.lower() or "heart" in s.lower() for s in report.negations.values()
        )
        assert "Emphysema" not in {c.finding_label for c in report.citations}
    normal = write_report([], seed=1, n_slices=60, series_number=2)
    assert set(normal.negations) == set(REPORT_LABELS) and normal.citations == []
    assert "No pleural effusion" in normal.findings or "No pleural effusion" in " ".join(
        normal.negations.values()
    )


def test_every_form_is_used_in_both_languages() -> None:
    elongated = [StandInFinding("Atelectasis", 8, "left", "LLL", 20.0, (20, 9, 9), (10, 30))]
    for language, forms in CITATION_FORMS.items():
        used = set()
        for seed in range(300):
            report = write_report(
                elongated, seed=seed, n_slices=80, series_number=5, language=language
            )
            used |= {c.form for c in report.citations}
        assert used == set(forms), set(forms) - used


def test_report_reads_like_ct_rate() -> None:
    texts = [
        write_report(stand_in_findings(s, 64), seed=s, n_slices=64, series_number=2).text
        for s in range(80)
    ]
    first = texts[0]
    for heading in ("CLINICAL INFORMATION:", "TECHNIQUE:", "FINDINGS:", "IMPRESSION:"):
        assert heading in first
    assert "Non-contrast chest CT" in " ".join(texts) and "1.5 mm" in " ".join(texts)
    joined = " ".join(texts)
    # Distractors a miner must learn to ignore exist somewhere: levels, dates, counts, sizes.
    assert re.search(r"\bT\d+\b", joined)
    assert re.search(r"\b\d{2}\.\d{2}\.\d{4}\b", joined)
    assert re.search(r"contains \d small calculi", joined)
    assert re.search(r"\b\d+ mm\b", joined)


def test_german_reports() -> None:
    findings = [StandInFinding("Lung nodule", 9, "left", "LUL", 9.0, (30, 20, 20), (28, 33))]
    texts = []
    for seed in range(30):
        report = write_report(findings, seed=seed, n_slices=64, series_number=3, language="de")
        assert report.language == "de"
        assert "BEFUND:" in report.text and "BEURTEILUNG:" in report.text
        assert "undherd" in report.findings and "im linken Oberlappen" in report.findings
        texts.append(report.text)
        for c in report.citations:
            span = report.text[c.start : c.end]
            assert not re.search(r"\b(image|series|section)\b", span, re.IGNORECASE)
    joined = " ".join(texts)
    assert "Serie 3, Bild" in joined or "Serie 3 Bild" in joined
    assert "Kein Pleuraerguss." in joined and "ö" in joined


def test_real_phantom_findings_when_available() -> None:
    generate = getattr(phantoms, "generate_phantom", None)
    if generate is None:
        pytest.skip("engines.data.phantoms.generate_phantom not written yet")
    for seed in range(3):
        phantom = generate((48, 64, 64), (5.0, 5.0, 5.0), seed=seed)
        present = {REPORT_LABELS[i] for i in np.flatnonzero(np.asarray(phantom.labels))}
        report = write_report(
            phantom.findings, seed=seed, n_slices=48, series_number=2, present_labels=present
        )
        assert set(report.negations) == set(REPORT_LABELS) - present
        for c in report.citations:
            check_citation(report, c, phantom.findings[c.finding_index], lambda z: z + 1)


def test_labels_agree_with_the_label_module() -> None:
    labels = pytest.importorskip("engines.data.labels")
    assert tuple(labels.LABELS) == REPORT_LABELS


def test_every_label_can_be_written_without_size_or_side() -> None:
    """Diffuse findings have no size and some no side; each label must still have a sentence."""
    for language in ("en", "de"):
        for index, label in enumerate(REPORT_LABELS):
            bare = StandInFinding(label, index, None, None, 0.0, (5, 5, 5), (5, 5))
            for seed in range(15):
                report = write_report(
                    [bare],
                    seed=seed,
                    n_slices=10,
                    series_number=2,
                    language=language,
                    cite_probability=1.0,
                )
                assert label not in report.negations and len(report.citations) == 1


def test_bad_input_is_refused() -> None:
    bad = [StandInFinding("Pneumothorax", 0, None, None, 1.0, (1, 1, 1), (0, 2))]
    with pytest.raises(ValueError, match="unknown labels"):
        write_report(bad, seed=1, n_slices=10, series_number=2)
    with pytest.raises(ValueError, match="language"):
        write_report([], seed=1, n_slices=10, series_number=2, language="fr")


def test_every_citation_lands_on_a_slice_that_shows_its_finding() -> None:
    """With the real generator: the cited slice holds voxels of the cited finding's mask."""
    from engines.data.labels import LABELS
    from engines.data.phantoms import generate_phantom

    checked = 0
    for seed in range(4):
        phantom = generate_phantom((48, 96, 96), (5.0, 3.5, 3.5), seed=seed, labels=list(LABELS))
        report = write_report(
            phantom.findings, seed=seed, n_slices=48, series_number=2, cite_probability=1.0
        )
        by_label = {f.label: f for f in phantom.findings}
        for c in report.citations:
            mask = by_label[c.finding_label].full_mask(phantom.hu.shape)
            for z in c.z_indices:
                assert mask[z].any(), (seed, c.finding_label, z)
                checked += 1
    assert checked >= 40
