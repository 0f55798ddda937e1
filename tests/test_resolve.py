"""Resolution of mined references against a study received over C-STORE (SQLite and PostgreSQL).

The study is written by dicom_io.synthetic_study (scout series 1, chest series 2 numbered from
the top, abdomen series 3), sent by dcmtk's storescu to a running node, and the references come
from the report generator whose truth says which z index every citation points at. So a passing
test means: the text, the mined (series, image), the database rows and the spool file headers
all agree with where the finding is.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import func, select

from conftest import small_phantom, storescu, wait_for
from dicom_io.synthetic_study import SyntheticStudy, write_study
from engines.data.reports import REPORT_LABELS, write_report
from radfinder_node.database import Database
from radfinder_node.models import Instance, Series, SeriesState, Study
from radfinder_node.node import Node
from radfinder_node.resolve import SeriesRow, primary_series, resolve_references
from radfinder_node.timeutil import utcnow
from reports.mining import ImageReference, find_references
from standins import StandInFinding

SLICES = 24
SPACING = (2.5, 5.0, 5.0)
ORIGIN = (-157.5, -157.5, -212.5)  # first slice at z = -212.5 mm


def z_of(index: int) -> float:
    return ORIGIN[2] + index * SPACING[0]


def received_study(node: Node, tmp_path: Path) -> tuple[SyntheticStudy, int]:
    """Write the study, send it with storescu, wait until every instance is a row."""
    hu, spacing = small_phantom(SLICES)
    study = write_study(
        tmp_path / "study",
        hu,
        spacing,
        seed=7,
        accession_number="ACC7",
        patient_id="P7",
        patient_name="Resolve^Test",
        with_scout=True,
        with_non_chest=True,
        numbering="superior",
        origin=ORIGIN,
        shuffle=True,
    )
    assert node.port is not None
    out = storescu(node.port, tmp_path / "study")
    assert out.returncode == 0, out.stderr

    def all_stored() -> bool:
        with node.db.transaction() as s:
            return s.scalar(select(func.count(Instance.id))) == len(study.paths)

    assert wait_for(all_stored, timeout=60)
    with node.db.transaction() as s:
        study_id = s.scalar(select(Study.id).where(Study.study_uid == study.study_uid))
    assert study_id is not None
    return study, int(study_id)


def generated_report(study: SyntheticStudy, seed: int) -> tuple[str, list[tuple[int, int]]]:
    """A report of findings spread over the chest series, cited at their true slices, and for
    each citation (instance number, z index) from the generator's truth."""
    rng = random.Random(seed)
    findings = []
    for _ in range(6):
        i = rng.randrange(len(REPORT_LABELS))
        first = rng.randrange(SLICES - 3)
        findings.append(
            StandInFinding(
                REPORT_LABELS[i], i, "right", "RUL", 6.0, (first + 1, 30, 30), (first, first + 2)
            )
        )
    report = write_report(
        findings,
        seed=seed,
        n_slices=SLICES,
        series_number=2,
        instance_number_of_z=study.instance_number_of_z,
        cite_probability=1.0,
        language=rng.choice(("en", "de")),
    )
    truth = [
        (img, z) for c in report.citations for img, z in zip(c.images, c.z_indices, strict=True)
    ]
    return report.text, truth


@pytest.mark.slow
@pytest.mark.integration
def test_references_resolve_to_the_true_slice_and_z(
    make_node: Callable[..., Node], db_url: str, tmp_path: Path
) -> None:
    node = make_node(database_url=db_url)
    study, study_id = received_study(node, tmp_path)

    def chest_selected() -> bool:
        with node.db.transaction() as s:
            state = s.scalar(select(Series.state).where(Series.series_number == 2))
            return bool(state == SeriesState.SELECTED)

    assert wait_for(chest_selected, timeout=30)
    checked = 0
    for seed in range(4):
        text, truth = generated_report(study, seed)
        refs = find_references(text)
        assert [r.image for r in refs] == [img for img, _ in truth]
        with node.db.transaction() as s:
            resolutions = resolve_references(s, study_id, refs, node.settings.spool_dir)
        for res, (image, z_index) in zip(resolutions, truth, strict=True):
            assert res.reason is None, res
            assert res.ref.image == image
            assert res.sop_instance_uid == study.sop_uid_of_z(z_index)
            assert res.series_uid == study.chest.series_uid
            assert res.z_mm == pytest.approx(z_of(z_index), abs=0.01)
            checked += 1
    assert checked >= 12

    # Without a series, "image N" means the selected chest series; numbered from the top, so
    # image 1 is the most superior slice.
    bare = find_references("Nodule on image 1. Effusion (Section No: 24/24).")
    with node.db.transaction() as s:
        top, bottom = resolve_references(s, study_id, bare, node.settings.spool_dir)
    assert top.sop_instance_uid == study.sop_uid_of_z(SLICES - 1)
    assert top.z_mm == pytest.approx(z_of(SLICES - 1), abs=0.01)
    assert bottom.sop_instance_uid == study.sop_uid_of_z(0)
    assert bottom.z_mm == pytest.approx(z_of(0), abs=0.01)


@pytest.mark.integration
def test_unresolvable_references_are_kept_with_the_reason(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = make_node()
    study, study_id = received_study(node, tmp_path)
    text = (
        "Nodule (series 9, image 3). Effusion (series 2, image 99). "
        "Scout (series 1, image 1). Mass (series 3, image 4). Plaque (series 2, image 5)."
    )
    refs = find_references(text)
    assert [(r.series, r.image) for r in refs] == [(9, 3), (2, 99), (1, 1), (3, 4), (2, 5)]
    with node.db.transaction() as s:
        lost = s.scalar(
            select(Instance.path).where(Instance.sop_uid == study.sop_uid_of_z(SLICES - 5))
        )
    assert lost is not None
    (node.settings.spool_dir / lost).unlink()  # image 5 of series 2 (numbered from the top)

    with node.db.transaction() as s:
        res = resolve_references(s, study_id, refs, node.settings.spool_dir)
    assert len(res) == len(refs) and [r.ref for r in res] == refs
    missing_series, missing_image, scout, abdomen, no_file = res
    assert missing_series.sop_instance_uid is None
    assert "series 9 is not in the study" in (missing_series.reason or "")
    assert "image 99 not in series 2" in (missing_image.reason or "")
    assert scout.sop_instance_uid is None and "not axial" in (scout.reason or "")
    assert abdomen.reason is None and abdomen.series_uid == study.non_chest[0].series_uid
    assert abdomen.sop_instance_uid == study.non_chest[0].sop_uids[3]
    assert no_file.sop_instance_uid is None and "spool file missing" in (no_file.reason or "")
    assert no_file.series_uid == study.chest.series_uid


@pytest.mark.integration
def test_without_a_selected_series_the_axial_series_with_most_instances_is_primary(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = make_node(quiet_period_s=3600)  # nothing completes, so nothing is selected
    study, study_id = received_study(node, tmp_path)
    with node.db.transaction() as s:
        states = set(s.scalars(select(Series.state)).all())
        assert states == {SeriesState.RECEIVING}
        (res,) = resolve_references(
            s, study_id, find_references("Nodule (image 3)."), node.settings.spool_dir
        )
    assert res.series_uid == study.chest.series_uid  # 24 axial slices beat 8 abdominal ones
    assert res.sop_instance_uid == study.sop_uid_of_z(SLICES - 3)


def _row(
    number: int, n: int, *, state: SeriesState = SeriesState.COMPLETE, **attrs: object
) -> SeriesRow:
    axial = {
        "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
    }
    return SeriesRow(number, f"1.2.{number}", number, state, {**axial, **attrs}, n)


def test_primary_series_rules() -> None:
    scout = _row(
        1,
        400,
        ImageOrientationPatient=[1, 0, 0, 0, 0, -1],
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
    )
    thin, thick = _row(2, 300), _row(3, 60)
    coronal = _row(4, 500, ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    axial_scout = _row(5, 900, ImageType="ORIGINAL\\PRIMARY\\LOCALIZER")
    assert primary_series([scout, thick, thin, coronal, axial_scout]) == thin
    assert primary_series([replace(thick, state=SeriesState.SELECTED), thin]) == replace(
        thick, state=SeriesState.SELECTED
    )
    assert primary_series([_row(7, 300), _row(6, 300)]) == _row(6, 300)
    assert primary_series([scout, coronal]) is None


def test_no_references_no_queries(tmp_path: Path) -> None:
    # Nothing to resolve must not touch the session at all (a report without citations).
    assert resolve_references(None, 1, [], tmp_path) == []  # type: ignore[arg-type]


def test_reference_without_series_and_no_axial_series(db_url: str, tmp_path: Path) -> None:
    db = Database(db_url)
    try:
        with db.transaction() as s:
            study = Study(study_uid="1.2.3", created_at=utcnow())
            s.add(study)
            s.flush()
            refs = [ImageReference(None, 4, "Nodule.", 0, 7), ImageReference(2, 4, "Mass.", 9, 25)]
            bare, numbered = resolve_references(s, study.id, refs, tmp_path)
    finally:
        db.dispose()
    assert bare.sop_instance_uid is None and "no axial series" in (bare.reason or "")
    assert numbered.sop_instance_uid is None
    assert "series 2 is not in the study" in (numbered.reason or "")
