"""The synthetic CT-RATE world: names, tables, NIfTI geometry and the citation truth agree.

Phantoms come from ``generate_phantom`` when it exists, else from a stand-in of the same shape
(module level, so worker processes can unpickle it).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import pytest

from engines.data import phantoms
from engines.data.ctrate import (
    LABEL_COLUMNS,
    METADATA_COLUMNS,
    REPORT_COLUMNS,
    TRUTH_FIELDS,
    CTRateItem,
    CTRateManifest,
    centred_affine,
    read_volume,
    synthesize_ctrate,
    volume_path,
    volume_seed,
    write_ctrate,
)
from engines.data.phantoms import basic_chest_phantom
from engines.data.reports import REPORT_LABELS, write_report
from standins import StandInFinding, StandInPhantom

SHAPE = (16, 32, 32)
SPACING = (6.0, 9.0, 9.0)


def stand_in_phantom(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], *, seed: int
) -> StandInPhantom:
    rng = random.Random(seed)
    findings = []
    for _ in range(rng.randint(0, 4)):
        index = rng.randrange(len(REPORT_LABELS))
        first = rng.randrange(shape[0])
        last = min(shape[0] - 1, first + rng.choice((0, 2, 6)))
        findings.append(
            StandInFinding(
                REPORT_LABELS[index],
                index,
                rng.choice(("left", "right", None)),
                rng.choice(("upper", "lower", None)),
                rng.choice((0.0, 7.0, 12.0)),
                (rng.randint(first, last), 10, 10),
                (first, last),
            )
        )
    labels = np.zeros(len(REPORT_LABELS), dtype=np.int8)
    for f in findings:
        labels[f.label_index] = 1
    affine = centred_affine(shape, spacing)
    affine[:3, 3] += (1.5, -2.0, 40.0)  # not centred, so origin handling is tested
    return StandInPhantom(
        basic_chest_phantom(shape, spacing, seed=seed),
        spacing,
        affine,
        findings,
        labels,
        {"sex": rng.choice("MF"), "age": rng.randint(30, 80)},
    )


def factory() -> Any:
    return getattr(phantoms, "generate_phantom", None) or stand_in_phantom


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> CTRateManifest:
    root = tmp_path_factory.mktemp("ctrate")
    return synthesize_ctrate(
        root, 6, 123, SHAPE, SPACING, split="train", workers=2, phantom_factory=factory()
    )


def test_layout_and_table_headers(world: CTRateManifest) -> None:
    root = world.root
    assert world.volumes == tuple(f"train_{i}_a_1.nii.gz" for i in range(1, 7))
    assert (root / "train/train_3/train_3_a/train_3_a_1.nii.gz").is_file()
    assert world.reports_csv == root / "radiology_text_reports" / "train_reports.csv"
    assert world.labels_csv == root / "multi_abnormality_labels" / "train_predicted_labels.csv"
    assert world.metadata_csv == root / "metadata" / "train_metadata.csv"
    for path, columns in (
        (world.reports_csv, REPORT_COLUMNS),
        (world.labels_csv, LABEL_COLUMNS),
        (world.metadata_csv, METADATA_COLUMNS),
    ):
        header, rows = read_csv(path)
        assert tuple(header) == tuple(columns)
        assert [r["VolumeName"] for r in rows] == list(world.volumes)
    assert len(METADATA_COLUMNS) == 44 and LABEL_COLUMNS[1:] == REPORT_LABELS
    _, labels = read_csv(world.labels_csv)
    assert all(r[c] in ("0", "1") for r in labels for c in REPORT_LABELS)


def test_nifti_geometry_matches_metadata(world: CTRateManifest) -> None:
    _, metadata = read_csv(world.metadata_csv)
    for meta in metadata:
        name = meta["VolumeName"]
        patient = int(name.split("_")[1])
        image = cast(nib.Nifti1Image, nib.load(volume_path(world.root, "train", patient)))
        assert image.get_data_dtype() == np.int16
        assert image.shape == (SHAPE[1], SHAPE[2], SHAPE[0])  # rows, columns, slices
        row, col = (float(v) for v in meta["XYSpacing"].strip("[]").split(","))
        assert image.header.get_zooms() == pytest.approx((row, col, float(meta["ZSpacing"])))
        assert (row, col, float(meta["ZSpacing"])) == pytest.approx(
            (SPACING[1], SPACING[2], SPACING[0])
        )
        assert nib.aff2axcodes(image.affine) == ("P", "L", "S")
        assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
        # Voxel (row 0, col 0, slice 0) sits at ImagePositionPatient (LPS -> RAS flips x, y).
        ipp = [float(v) for v in meta["ImagePositionPatient"].strip("[]").split(",")]
        assert image.affine[:3, 3] == pytest.approx([-ipp[0], -ipp[1], ipp[2]])
        assert (meta["Rows"], meta["Columns"], meta["NumberofSlices"]) == (
            str(SHAPE[1]),
            str(SHAPE[2]),
            str(SHAPE[0]),
        )
        # No header scaling: CT-RATE loaders apply the metadata's slope and intercept.
        assert image.header.get_slope_inter() == (None, None)
        hu, spacing = read_volume(volume_path(world.root, "train", patient), meta)
        assert hu.shape == SHAPE and spacing == pytest.approx(SPACING)
        assert float(hu.min()) > -1100 and float(hu.max()) < 3100


def test_pixels_survive_exactly(tmp_path: Path) -> None:
    phantom = stand_in_phantom(SHAPE, SPACING, seed=5)
    report = write_report(phantom.findings, seed=5, n_slices=SHAPE[0], series_number=2)
    item = CTRateItem(
        1, phantom.hu, SPACING, report, phantom.labels.tolist(), affine=phantom.affine
    )
    manifest = write_ctrate(tmp_path, [item], "valid")
    assert manifest.volumes == ("valid_1_a_1.nii.gz",)
    assert manifest.reports_csv.name == "validation_reports.csv"
    assert manifest.labels_csv.name == "valid_predicted_labels.csv"
    assert manifest.metadata_csv.name == "validation_metadata.csv"
    _, (meta,) = read_csv(manifest.metadata_csv)
    hu, _ = read_volume(volume_path(tmp_path, "valid", 1), meta)
    assert np.array_equal(hu, np.rint(phantom.hu))
    # CT-CLIP style: slope * get_fdata() + intercept, then transpose(2, 0, 1).
    raw = cast(nib.Nifti1Image, nib.load(volume_path(tmp_path, "valid", 1))).get_fdata()
    clip_style = (float(meta["RescaleSlope"]) * raw + float(meta["RescaleIntercept"])).transpose(
        2, 0, 1
    )
    assert np.array_equal(clip_style, hu)
    _, (labels,) = read_csv(manifest.labels_csv)
    assert [int(labels[c]) for c in REPORT_LABELS] == phantom.labels.tolist()
    _, (reports,) = read_csv(manifest.reports_csv)
    assert reports["Findings_EN"] == report.findings


def test_truth_agrees_with_reports_labels_and_geometry(world: CTRateManifest) -> None:
    _, reports = read_csv(world.reports_csv)
    _, labels = read_csv(world.labels_csv)
    _, metadata = read_csv(world.metadata_csv)
    findings = {r["VolumeName"]: r["Findings_EN"] for r in reports}
    label_rows = {r["VolumeName"]: r for r in labels}
    meta = {r["VolumeName"]: r for r in metadata}
    lines = [json.loads(line) for line in world.truth_jsonl.read_text().splitlines()]
    assert len(lines) == world.n_citations
    for t in lines:
        assert tuple(t) == TRUTH_FIELDS
        text = findings[t["VolumeName"]]
        assert text[t["findings_start"] : t["findings_end"]] == t["citation"]
        assert str(t["image"]) in t["citation"] and t["citation"] not in t["snippet"]
        assert label_rows[t["VolumeName"]][t["label"]] == "1"
        m = meta[t["VolumeName"]]
        z0 = float(m["ImagePositionPatient"].strip("[]").split(",")[2])
        assert t["z_mm"] == pytest.approx(z0 + t["z_index"] * float(m["ZSpacing"]))
        assert 0 <= t["z_index"] < t["n_slices"]
        n = t["n_slices"]
        expected = [
            n - z if t["instance_numbering"] == "superior" else z + 1 for z in t["z_indices"]
        ]
        assert sorted(expected) == t["images"]


def test_tables_hold_what_each_phantom_was(world: CTRateManifest) -> None:
    """Regenerate each volume's phantom from its seed: labels and pixels must be that phantom's."""
    _, labels = read_csv(world.labels_csv)
    _, metadata = read_csv(world.metadata_csv)
    for i, (row, meta) in enumerate(zip(labels, metadata, strict=True)):
        phantom = factory()(SHAPE, SPACING, seed=volume_seed(123, i))
        assert [int(row[c]) for c in REPORT_LABELS] == np.asarray(phantom.labels).tolist()
        hu, _ = read_volume(volume_path(world.root, "train", i + 1), meta)
        assert np.array_equal(hu, np.rint(phantom.hu))


def test_same_world_whatever_the_worker_count(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    one = synthesize_ctrate(
        tmp_path / "one",
        4,
        9,
        SHAPE,
        SPACING,
        workers=1,
        phantom_factory=factory(),
        progress=lambda d, n: calls.append((d, n)),
    )
    two = synthesize_ctrate(
        tmp_path / "two", 4, 9, SHAPE, SPACING, workers=2, phantom_factory=factory()
    )
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    files_one = sorted(p.relative_to(one.root) for p in one.root.rglob("*") if p.is_file())
    files_two = sorted(p.relative_to(two.root) for p in two.root.rglob("*") if p.is_file())
    assert files_one == files_two and len(files_one) == 4 + 4
    for rel in files_one:
        assert (one.root / rel).read_bytes() == (two.root / rel).read_bytes(), rel
    other = synthesize_ctrate(
        tmp_path / "other", 1, 10, SHAPE, SPACING, workers=1, phantom_factory=factory()
    )
    _, (a, *_) = read_csv(one.reports_csv)
    _, (b,) = read_csv(other.reports_csv)
    assert a["Findings_EN"] != b["Findings_EN"] or a["Technique_EN"] != b["Technique_EN"]


def test_decoded_volume_cache_gives_the_same_samples(world: CTRateManifest, tmp_path: Path) -> None:
    """Training with a decoded-volume cache sees exactly the samples it would without one; the
    cache holds integral HU losslessly as int16 and is re-read from its own file."""
    from engines.datasets import ManifestDataset
    from engines.presets import AugmentConfig, ModelSpaceConfig

    space = ModelSpaceConfig(spacing_mm=SPACING, shape=SHAPE)
    aug = AugmentConfig(flip_prob=0.5, flip_axes=("x",))
    plain = ManifestDataset.from_ctrate(world.root, space, augment=aug, seed=3)
    cached = ManifestDataset.from_ctrate(
        world.root, space, augment=aug, seed=3, volume_cache=tmp_path / "vc"
    )
    for epoch in (0, 1):  # the first epoch fills the cache, the second reads it
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(plain)):
            a, b = plain[i], cached[i]
            assert np.array_equal(a.image.numpy(), b.image.numpy())
            assert a.snippet_tokens == b.snippet_tokens
    files = sorted((tmp_path / "vc").glob("*.npy"))
    assert len(files) == len(plain)
    assert all(np.load(f, mmap_mode="r").dtype == np.int16 for f in files)
    assert not list((tmp_path / "vc").glob("*.tmp"))
