"""Training manifest: schema round trip, validation, pixels, and the CT-RATE reader."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import pytest

from engines.data.ctrate import (
    CTRateManifest,
    centred_affine,
    csv_paths,
    nifti_affine,
    read_volume,
    stored_values,
    synthesize_ctrate,
)
from engines.data.labels import LABELS
from engines.data.phantoms import basic_chest_phantom
from engines.manifest import (
    MANIFEST_VERSION,
    ManifestError,
    ManifestRow,
    Snippet,
    load_volume,
    read_ctrate,
    read_manifest,
    save_npz_volume,
    write_manifest,
)
from engines.preprocess import to_model_space
from engines.presets import ModelSpaceConfig
from standins import StandInFinding as _Finding
from standins import StandInPhantom as _Phantom


def row(**kw: Any) -> ManifestRow:
    base: dict[str, Any] = {
        "volume_id": "1.2.840.1",
        "volume_path": "volumes/a.npz",
        "volume_format": "npz",
        "spacing": (2.5, 0.7, 0.7),
        "report": "Findings: A nodule in the right upper lobe (series 3, image 45).",
        "labels": tuple([-1] * 9 + [1] + [0] * 8),
        "snippets": (
            Snippet(
                "A nodule in the right upper lobe (series 3, image 45).",
                -120.5,
                "1.2.840.1.45",
                "Lung nodule",
            ),
            Snippet("Effusion.", 10.0),
        ),
        "affine": tuple(tuple(float(v) for v in r) for r in np.diag([0.7, 0.7, 2.5, 1.0])),
        "rescale": (1.0, -1024.0),
        "geometry_source": "dicom",
        "split": "train",
        "source": "node",
    }
    base.update(kw)
    return ManifestRow(**base)


# --- schema ---------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    rows = [row(), row(volume_id="2", affine=None, rescale=None, snippets=(), split=None)]
    path = tmp_path / "m.jsonl"
    assert write_manifest(path, rows) == 2
    assert list(read_manifest(path)) == rows
    first = json.loads(path.read_text().splitlines()[0])
    assert first["manifest_version"] == MANIFEST_VERSION
    assert first["labels"][9] == 1 and first["snippets"][0]["z_mm"] == -120.5


def good_json() -> dict[str, Any]:
    return row().to_json()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"manifest_version": 2}, "not supported"),
        ({"labels": [0] * 17}, "18 entries"),
        ({"labels": [2] + [0] * 17}, "1, 0 or -1"),
        ({"labels": [True] + [0] * 17}, "integers"),
        ({"spacing": [1.0, 0.0, 1.0]}, "positive"),
        ({"spacing": [1.0, 1.0]}, "3 positive"),
        ({"volume_format": "dicom"}, "volume_format"),
        ({"volume_id": ""}, "volume_id"),
        ({"affine": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}, "4x4"),
        ({"affine": [[0] * 4] * 3 + [[0, 0, 0, 1]]}, "invertible"),
        ({"rescale": [0.0, -1024.0]}, "slope"),
        ({"snippets": [{"text": "x", "z_mm": float("nan")}]}, "finite"),
        ({"snippets": [{"text": " ", "z_mm": 1.0}]}, "non-empty"),
        ({"snippets": [{"text": "x", "z_mm": 1.0, "label": "Nodule"}]}, "18 labels"),
        ({"snippets": [{"text": "x", "z_mm": 1.0, "slice": 4}]}, "unknown snippet keys"),
        ({"snippets": [{"text": "x"}]}, "z_mm"),
        ({"colour": "red"}, "unknown keys"),
    ],
)
def test_validation_errors(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        ManifestRow.from_json({**good_json(), **change})


def test_missing_keys_and_file_positions(tmp_path: Path) -> None:
    bad = good_json()
    del bad["report"]
    with pytest.raises(ManifestError, match="missing keys"):
        ManifestRow.from_json(bad)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(good_json()) + "\n\n" + json.dumps(bad) + "\n")
    rows = read_manifest(path)
    assert next(rows) == row()
    with pytest.raises(ManifestError, match=r"m\.jsonl:3: missing keys"):
        next(rows)
    path.write_text("{not json\n")
    with pytest.raises(ManifestError, match=r":1: not JSON"):
        list(read_manifest(path))
    with pytest.raises(ManifestError):
        row(labels=(0,) * 17)  # rows are validated on construction too


def test_npz_volume_with_rescale(tmp_path: Path) -> None:
    stored = (np.arange(2 * 3 * 4).reshape(2, 3, 4) * 10).astype(np.int16)
    (tmp_path / "volumes").mkdir()
    save_npz_volume(tmp_path / "volumes" / "a.npz", stored)
    vol = load_volume(row(), tmp_path)
    np.testing.assert_array_equal(vol.hu, stored.astype(np.float32) - 1024)
    assert vol.hu.dtype == np.float32 and vol.spacing == (2.5, 0.7, 0.7)
    assert vol.affine is not None and vol.affine[2, 2] == 2.5
    as_hu = load_volume(row(rescale=None, affine=None), tmp_path)
    np.testing.assert_array_equal(as_hu.hu, stored)
    assert as_hu.affine is None
    with pytest.raises(ValueError, match="relative"):
        load_volume(row())


# --- CT-RATE --------------------------------------------------------------------------------

SHAPE = (12, 24, 24)
SPACING = (5.0, 12.0, 12.0)


def _phantom(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], *, seed: int
) -> _Phantom:
    rng = random.Random(seed)
    findings = []
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(LABELS))
        first = rng.randrange(shape[0] - 3)
        findings.append(
            _Finding(LABELS[i], i, "left", "upper", 8.0, (first + 1, 10, 10), (first, first + 2))
        )
    labels = np.zeros(len(LABELS), dtype=np.int8)
    for f in findings:
        labels[f.label_index] = 1
    affine = centred_affine(shape, spacing)
    affine[:3, 3] += (1.5, -2.0, 40.0)
    hu = basic_chest_phantom(shape, spacing, seed=seed)
    return _Phantom(hu, spacing, affine, findings, labels, {"sex": "F", "age": 50})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> CTRateManifest:
    root = tmp_path_factory.mktemp("ctrate")
    return synthesize_ctrate(
        root, 3, 7, SHAPE, SPACING, split="train", workers=1, phantom_factory=_phantom
    )


def truth(world: CTRateManifest) -> list[dict[str, Any]]:
    return [json.loads(x) for x in world.truth_jsonl.read_text().splitlines() if x.strip()]


def test_ctrate_rows(world: CTRateManifest, tmp_path: Path) -> None:
    rows = list(read_ctrate(world.root, "train"))
    assert [r.volume_id for r in rows] == list(world.volumes)
    lines = truth(world)
    assert sum(len(r.snippets) for r in rows) == len(lines) == world.n_citations > 0
    for r in rows:
        assert r.volume_format == "ctrate-nifti" and r.source == "ctrate" and r.split == "train"
        assert r.spacing == SPACING and r.rescale == (1.0, -1024.0)
        assert r.geometry_source == "nifti-header"
        assert r.report.startswith("Findings: ")
        assert set(r.labels) <= {0, 1} and len(r.labels) == 18
        p = _phantom(SHAPE, SPACING, seed=_seed_of(world, r.volume_id))
        assert r.labels == tuple(int(v) for v in p.labels)
        np.testing.assert_allclose(np.asarray(r.affine), p.affine, atol=1e-4)
        vol = load_volume(r)
        np.testing.assert_array_equal(vol.hu, np.rint(p.hu))
        for s in r.snippets:
            assert s.label in LABELS and "image" not in s.text.lower()
    # the rows survive a trip through a manifest file unchanged
    write_manifest(tmp_path / "ct.jsonl", rows)
    assert list(read_manifest(tmp_path / "ct.jsonl")) == rows


def _seed_of(world: CTRateManifest, name: str) -> int:
    from engines.data.ctrate import volume_seed

    return volume_seed(7, world.volumes.index(name))


def test_snippet_z_lands_on_the_cited_slice(world: CTRateManifest) -> None:
    """Manifest z (mm) -> model space -> nearest source slice is the truth's z index."""
    cfg = ModelSpaceConfig(spacing_mm=(5.0, 12.0, 12.0), shape=(16, 24, 24), depth_token_mm=10.0)
    by_name = {r.volume_id: r for r in read_ctrate(world.root, "train")}
    for t in truth(world):
        r = by_name[t["VolumeName"]]
        space = to_model_space(*load_volume(r), config=cfg).space
        kz = space.z_mm_to_model_z(t["z_mm"])
        assert space.model_z_to_source_slice(kz) == t["z_index"]
        token = space.depth_token_at(t["z_mm"])
        assert token is not None
        assert space.token_to_source_slice(token) in range(t["z_index"] - 1, t["z_index"] + 2)


def _copy_world(world: CTRateManifest, dest: Path) -> Path:
    shutil.copytree(world.root, dest)
    return dest


def test_fixed_volumes_are_not_rescaled_twice(world: CTRateManifest, tmp_path: Path) -> None:
    root = _copy_world(world, tmp_path / "ct")
    (root / "train").rename(root / "train_fixed")
    for path in (root / "train_fixed").rglob("*.nii.gz"):
        img = cast(nib.Nifti1Image, nib.load(path))
        hu = np.asarray(img.dataobj, dtype=np.float32) - 1024  # what CT-RATE's fix did
        nib.save(nib.Nifti1Image(hu.astype(np.int16), img.affine, img.header), path)  # type: ignore[no-untyped-call]
    rows = list(read_ctrate(root, "train"))  # picks train_fixed by itself
    assert all(r.rescale is None for r in rows)
    ref = {r.volume_id: load_volume(r).hu for r in read_ctrate(world.root, "train")}
    for r in rows:
        assert "train_fixed" in r.volume_path
        np.testing.assert_array_equal(load_volume(r).hu, ref[r.volume_id])


def test_header_scaling_and_blank_headers(world: CTRateManifest, tmp_path: Path) -> None:
    root = _copy_world(world, tmp_path / "ct")
    name = world.volumes[0]
    path = next((root / "train").rglob(name))
    p = _phantom(SHAPE, SPACING, seed=_seed_of(world, name))
    # stored values with the HU scaling in the header: nibabel applies it, the reader must not
    img = nib.Nifti1Image(stored_values(p.hu), nifti_affine(p.affine))  # type: ignore[no-untyped-call]
    img.header.set_slope_inter(1.0, -1024.0)  # type: ignore[no-untyped-call]
    img.set_sform(nifti_affine(p.affine), code=1)  # type: ignore[no-untyped-call]
    nib.save(img, path)
    # a blank header (CT-RATE's first release) on the second volume: geometry from metadata
    path2 = next((root / "train").rglob(world.volumes[1]))
    raw = np.asarray(cast(nib.Nifti1Image, nib.load(path2)).dataobj)
    blank = nib.Nifti1Image(raw, np.eye(4))  # type: ignore[no-untyped-call]
    blank.header.set_sform(None, code=0)  # type: ignore[no-untyped-call]
    blank.header.set_qform(None, code=0)  # type: ignore[no-untyped-call]
    nib.save(blank, path2)
    rows = {r.volume_id: r for r in read_ctrate(root, "train")}
    assert rows[name].rescale is None
    np.testing.assert_array_equal(load_volume(rows[name]).hu, np.rint(p.hu))
    second = rows[world.volumes[1]]
    assert second.affine is None and second.geometry_source == "ctrate-metadata"
    assert second.rescale == (1.0, -1024.0)


def test_missing_labels_are_unknown(world: CTRateManifest, tmp_path: Path) -> None:
    root = _copy_world(world, tmp_path / "ct")
    labels_csv = csv_paths(root, "train")[1]
    lines = labels_csv.read_text().splitlines()
    labels_csv.write_text("\n".join(lines[:-1]) + "\n")  # drop the last volume's labels
    rows = list(read_ctrate(root, "train", with_truth=False))
    assert rows[-1].labels == (-1,) * 18
    assert all(not r.snippets for r in rows)
    assert rows[0].labels != (-1,) * 18
    # read_volume is the one CT-RATE pixel reader: same HU either way
    r = rows[0]
    meta = {
        "RescaleSlope": "1",
        "RescaleIntercept": "-1024",
        "XYSpacing": "[12, 12]",
        "ZSpacing": "5",
    }
    hu, spacing = read_volume(Path(r.volume_path), meta)
    np.testing.assert_array_equal(load_volume(r).hu, hu)
    assert spacing == r.spacing
    assert replace(r, split="valid").split == "valid"
