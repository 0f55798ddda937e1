"""The learning loop end to end, as a site runs it: `radfinder-node serve` in its own process,
a synthetic study in over C-STORE (dcmtk's storescu), its ORU^R01 over MLLP, the snippet pairs
resolved to the slices where the findings truly are, `radfinder-node export` in its own
process, and one training step on what it wrote.

The study and the report come from `radfinder-node synth dicom` / `synth hl7` with one seed
(radfinder_node.synth), so ``truth.json`` names the SOP Instance UID of every cited slice; the
export's pseudonyms are keyed HMACs, so with the node's secret the test can check that each
exported snippet points at exactly that slice.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from test_hl7_listener import MllpClient, msa

from conftest import free_port, port_open, start_serve, storescu, wait_for
from radfinder_node.database import Database
from radfinder_node.deid import Pseudonymizer, load_secret
from radfinder_node.report_models import Report
from radfinder_node.synth import synth_dicom, synth_hl7

SHAPE = (32, 64, 64)
SPACING = (3.0, 5.0, 5.0)
SEED = 4


def start_node(data_dir: Path, port: int, hl7_port: int) -> subprocess.Popen[bytes]:
    env = {
        "RADFINDER_EMBEDDED_WORKER": "false",  # no inference: this test is about reports
        "RADFINDER_QUIET_PERIOD_S": "0.5",
        "RADFINDER_COMPLETION_POLL_S": "0.1",
        "RADFINDER_HTTP_ENABLED": "false",
    }
    args = ("--port", str(port), "--hl7-port", str(hl7_port))

    def ready() -> bool:
        return port_open(port) and port_open(hl7_port)

    return start_serve(data_dir, *args, env=env, ready=ready, log="serve.log")


@pytest.mark.slow
@pytest.mark.integration
def test_study_and_report_in_training_data_out(tmp_path: Path, tower: Any) -> None:
    synth_dicom(tmp_path / "studies", 1, SEED, SHAPE, SPACING, with_scout=True, shuffle=True)
    [oru_path] = synth_hl7(tmp_path / "hl7", 1, SEED, SHAPE, SPACING)
    truth = json.loads((tmp_path / "studies" / "study_0000" / "truth.json").read_text())
    assert len(truth["citations"]) >= 1

    data_dir = tmp_path / "node"
    port, hl7_port = free_port(), free_port()
    proc = start_node(data_dir, port, hl7_port)
    try:
        sent = storescu(port, tmp_path / "studies" / "study_0000" / "dicom")
        assert sent.returncode == 0, sent.stderr
        client = MllpClient(hl7_port)
        try:
            code, _, err = msa(client.send(oru_path.read_bytes()))
        finally:
            client.close()
        assert code == "AA", err

        db = Database(f"sqlite:///{(data_dir / 'radfinder.db').resolve()}", auto_migrate=False)
        try:

            def mined() -> bool:
                with db.transaction() as s:
                    return s.scalar(select(Report.mined_at)) is not None

            assert wait_for(mined, timeout=90, interval=0.2), (tmp_path / "serve.log").read_text()[
                -3000:
            ]
        finally:
            db.dispose()

        out = tmp_path / "export"
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "radfinder_node.cli",
                "export",
                "--data-dir",
                str(data_dir),
                "--since",
                "last",
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    assert result["rows"] == 1 and result["deid"]

    from engines.datasets import ManifestDataset
    from engines.manifest import read_manifest
    from engines.training import train
    from model_fixtures import MICRO

    manifest = Path(result["manifest"])
    [row] = list(read_manifest(manifest))
    # Every citation of the generator's truth is a snippet at its slice: same SOP Instance
    # (through the keyed pseudonym), z within half a slice of the slice's position.
    pz = Pseudonymizer(load_secret(None, data_dir))
    by_sop = {s.sop_instance_uid: s for s in row.snippets}
    files = {
        str(ds.SOPInstanceUID): ds
        for ds in (
            pydicom.dcmread(p, stop_before_pixels=True)
            for p in (tmp_path / "studies" / "study_0000" / "dicom").rglob("*")
            if p.is_file()
        )
    }
    for citation in truth["citations"]:
        snippet = by_sop.get(pz.uid(citation["sop_uid"]))
        assert snippet is not None, (citation, row.snippets)
        true_z = float(files[citation["sop_uid"]].ImagePositionPatient[2])
        assert abs(snippet.z_mm - true_z) <= SPACING[0] / 2
    patient = pz.patient(str(next(iter(files.values())).PatientID))
    assert row.volume_path.startswith(f"volumes/{patient}/")
    assert truth["accession_number"] not in manifest.read_text()

    dataset = ManifestDataset.from_manifest(manifest, MICRO.space, max_shift=(0, 0, 0))
    assert dataset[0].snippets, "the cited slices lie inside the model's field of view"
    trained = train(
        MICRO,
        dataset,
        tmp_path / "run",
        steps=1,
        batch=1,
        accum=1,
        progress=False,
        warmup_steps=0,
        text_tower=tower,
    )
    assert trained.step == 1 and trained.checkpoint.exists()
