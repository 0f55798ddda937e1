"""`radfinder-node synth ...`: the synthetic world from the command line, end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pydicom
import pytest
from hl7apy.parser import parse_message
from PIL import Image

from conftest import storescu, wait_for
from radfinder_node.cli import main
from radfinder_node.node import Node
from radfinder_node.status import node_status

SMALL = ["--shape", "48x96x96", "--spacing", "5x3.5x3.5"]


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_synth_dicom_is_deterministic_and_hl7_describes_the_same_studies(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert (
            main(
                [
                    "synth",
                    "dicom",
                    "--n",
                    "2",
                    "--seed",
                    "5",
                    "--out",
                    str(tmp_path / name),
                    "--with-scout",
                    *SMALL,
                ]
            )
            == 0
        )
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert (
        main(["synth", "hl7", "--n", "2", "--seed", "5", "--out", str(tmp_path / "hl7"), *SMALL])
        == 0
    )
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    messages = sorted((tmp_path / "hl7").glob("*.hl7"))
    assert len(manifest) == len(messages) == 2
    for entry, path in zip(manifest, messages, strict=True):
        study_dir = tmp_path / "a" / entry["study"]
        truth = json.loads((study_dir / "truth.json").read_text())
        ds = pydicom.dcmread(next(study_dir.rglob("*.dcm")), stop_before_pixels=True)
        assert ds.StudyInstanceUID == truth["study_uid"] == entry["study_uid"]
        assert ds.AccessionNumber == entry["accession_number"]
        msg = parse_message(path.read_text().replace("\n", "\r"), find_groups=False)
        raw = path.read_text()
        assert entry["accession_number"] in raw and entry["study_uid"] in raw
        assert msg.msh.msh_9.to_er7().startswith("ORU^R01")
        report = (study_dir / "report.txt").read_text()
        for citation in truth["citations"]:  # the HL7 text carries the same cited sentences
            assert citation["sop_uid"]
            assert report[citation["start"] : citation["end"]]
            first_line = report[citation["start"] : citation["end"]].splitlines()[0]
            assert first_line in raw


def test_synth_ctrate_and_preview(tmp_path: Path) -> None:
    assert (
        main(
            [
                "synth",
                "ctrate",
                "--n",
                "3",
                "--seed",
                "1",
                "--out",
                str(tmp_path / "ct"),
                "--workers",
                "1",
                "--shape",
                "32x64x64",
                "--spacing",
                "6x5x5",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "ct").rglob("*.nii.gz"))) == 3
    assert len(list((tmp_path / "ct").rglob("*.csv"))) >= 3
    png = tmp_path / "preview.png"
    assert main(["synth", "preview", "--out", str(png), "--seed", "2", *SMALL]) == 0
    with Image.open(png) as im:
        assert im.width > 200 and im.height > 200


@pytest.mark.integration
def test_synthetic_study_through_the_listener(tmp_path: Path, node: Node) -> None:
    """synth dicom (scout + chest + abdomen) -> storescu -> node: only the chest is selected."""
    out = tmp_path / "studies"
    assert (
        main(
            [
                "synth",
                "dicom",
                "--n",
                "1",
                "--seed",
                "9",
                "--out",
                str(out),
                "--with-scout",
                "--with-non-chest",
                "--shuffle",
                *SMALL,
            ]
        )
        == 0
    )
    sent = storescu(node.port, out / "study_0000" / "dicom")
    assert sent.returncode == 0 and "Store Failed" not in sent.stderr
    assert wait_for(lambda: node_status(node.db)["series"]["ignored"] == 2, timeout=15)
    status = node_status(node.db)
    assert status["series"]["selected"] == 1 and status["studies"] == 1
