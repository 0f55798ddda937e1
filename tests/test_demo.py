"""`radfinder-node demo` on a small chest CT: the table, the PNG, the SR and KOS it points at.

The demo bundle's weights are replaced from time to time, so nothing here depends on what it
predicts: the function test runs a copy whose thresholds force the first nine labels present
(``bundle.toml`` is not hashed), and every number is checked against the SR and KOS the node
wrote, the phantom's truth against a second rendering of the same phantom.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
import tomli_w
from PIL import Image
from pydicom import dcmread

from conftest import ROOT

DEMO_BUNDLE = ROOT / "engines" / "bundles" / "demo-tiny"
SHAPE = (32, 96, 96)
SPACING = (9.0, 3.6, 3.6)
FORCED = 9


@pytest.fixture(scope="module")
def forced_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "demo-forced"
    shutil.copytree(DEMO_BUNDLE, out, ignore=shutil.ignore_patterns("*.plan", "trt-*"))
    manifest = tomllib.loads((out / "bundle.toml").read_text())
    for j, row in enumerate(manifest["labels"]):
        row["threshold"] = 0.0 if j < FORCED else 1.0
    (out / "bundle.toml").write_text(tomli_w.dumps(manifest))
    return out


@pytest.mark.slow
def test_demo_prints_findings_and_draws_key_images(forced_bundle: Path, tmp_path: Path) -> None:
    from dicom_io.kos import kos_referenced_sop_uids
    from dicom_io.sr import read_sr_probabilities
    from engines.data.phantoms import generate_phantom
    from radfinder_node.demo import run_demo

    said: list[str] = []
    findings = ("Cardiomegaly", "Pleural effusion", "Lung nodule")
    result = run_demo(
        tmp_path / "out",
        shape=SHAPE,
        spacing=SPACING,
        seed=3,
        findings=findings,
        bundle_path=forced_bundle,
        timeout_s=120,
        say=said.append,
    )
    output = "\n".join(said)

    # The SR the node wrote is the source of every number in the table.
    sr = dcmread(result.sr)
    assert sr.SeriesInstanceUID != result.series_uid and sr.StudyInstanceUID == result.study_uid
    in_sr = read_sr_probabilities(sr)
    assert [r.label for r in result.rows] == list(in_sr)
    for row in result.rows:
        probability, present = in_sr[row.label]
        assert row.probability == pytest.approx(probability, abs=1e-9)
        assert row.present == present
        line = next(ln for ln in result.table.splitlines() if ln.startswith(row.label + " "))
        cells = line[len(row.label) :].split()
        assert cells[:4] == [
            f"{row.probability:.4f}",
            f"{row.threshold:.4f}",
            "PRESENT" if row.present else "absent",
            "PRESENT" if row.truth else "absent",
        ]
        if row.present:
            assert cells[4] == str(row.key_instance) and cells[-1] == row.key_sop_uid
        else:
            assert row.key_sop_uid is None and row.key_instance is None
    assert sum(r.present for r in result.rows) >= FORCED
    assert result.table in output

    # Truth: the same phantom, rendered again, has exactly these findings at these slices
    # (instance numbers count from the bottom, so instance = z + 1).
    phantom = generate_phantom(SHAPE, SPACING, seed=3, labels=list(findings))
    truth = {f.label: f.center_voxel[0] + 1 for f in phantom.findings}
    assert set(truth) == set(findings)
    assert {r.label: r.true_instance for r in result.rows if r.truth} == truth
    assert all(r.true_instance is None for r in result.rows if not r.truth)

    # The KOS references exactly the key slices of the table, and the PNG draws each once.
    assert result.kos is not None
    keys = {r.key_sop_uid for r in result.rows if r.present}
    assert set(kos_referenced_sop_uids(dcmread(result.kos))) == keys
    assert len(result.key_images) == len(keys)
    key_instances = {r.key_instance for r in result.rows if r.present}
    assert {n for n, _ in result.key_images} == key_instances
    for row in result.rows:
        captions = [c for n, c in result.key_images if n == row.key_instance]
        if row.present:
            assert len(captions) == 1 and f"{row.label} {row.probability:.2f}" in captions[0]
    with Image.open(result.png) as png:
        assert png.format == "PNG" and png.mode == "L"
        columns = min(3, len(keys))
        rows = -(-len(keys) // columns)
        assert png.width >= 256 * columns and png.height >= 256 * rows
        # Not a blank sheet: the slices are drawn.
        lo, hi = png.getextrema()
        assert lo == 0 and hi == 255

    saved = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert [r["label"] for r in saved["rows"]] == [r.label for r in result.rows]
    assert saved["series_uid"] == result.series_uid
    assert {"load", "preprocess", "infer", "write"} <= set(result.timings)
    for path in (result.png, result.sr, result.kos):
        assert str(path.resolve()) in output
    assert "series selected 1" in output and "series ignored 1" in output  # chest, scout


@pytest.mark.slow
def test_demo_command_with_the_shipped_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from radfinder_node.cli import main

    code = main(
        [
            "demo",
            "--out",
            str(tmp_path / "out"),
            "--shape",
            "x".join(map(str, SHAPE)),
            "--spacing",
            "x".join(map(str, SPACING)),
            "--finding",
            "Pleural effusion",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    saved = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert len(saved["rows"]) == 18
    assert [r["label"] for r in saved["rows"] if r["truth"]] == ["Pleural effusion"]
    for row in saved["rows"]:
        assert row["label"] in out and f"{row['probability']:.4f}" in out
    assert (tmp_path / "out" / "key_images.png").stat().st_size > 0
    assert (tmp_path / "out" / "findings_sr.dcm").is_file()


def test_demo_refuses_a_series_the_rules_skip(tmp_path: Path) -> None:
    from radfinder_node.demo import DemoError, run_demo

    with pytest.raises(DemoError, match=r"did not select the chest series.*n_frames"):
        run_demo(
            tmp_path / "out",
            shape=(12, 64, 64),
            spacing=(20.0, 5.0, 5.0),
            findings=(),
            bundle_path=DEMO_BUNDLE,
            timeout_s=60,
            say=lambda _: None,
        )


def test_demo_names_an_unknown_finding(tmp_path: Path) -> None:
    from radfinder_node.demo import DemoError, run_demo

    with pytest.raises(DemoError, match="unknown finding 'Pneumothorax'"):
        run_demo(tmp_path / "out", findings=("Pneumothorax",), say=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_the_tiny_preset_is_the_demo_bundles_own() -> None:
    """docs/demo-bundle.md says its rebuild commands train this bundle at the current commit;
    a change to the tiny preset must update the bundle or those docs (and this test)."""
    from engines.bundle import preset_from_dict
    from engines.presets import TINY

    with (DEMO_BUNDLE / "bundle.toml").open("rb") as f:
        recorded = preset_from_dict(tomllib.load(f)["preset"])
    assert recorded == TINY
