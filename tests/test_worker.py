"""The inference worker end to end through the embedded transport: storescu → node → selection →
job → embedded Celery worker (micro bundle, ONNX Runtime) → SR + KOS files → outbox → a real
storescp. The expected numbers are computed here from the same series with the engine directly.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import shutil
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from pydicom import dcmread
from sqlalchemy import select
from test_outbox import StoreSCP

from conftest import free_port, node_settings, small_phantom, storescu, wait_for
from dicom_io.synthetic import SyntheticSeries, write_ct_series
from radfinder_node.database import Database
from radfinder_node.job_models import Job, JobState, OutboundObject, OutboundState
from radfinder_node.node import Node

PRESENT_LABELS = 9  # the micro bundle's first 9 labels have threshold 0 (always present)


def build_micro_bundle(tmp_path_factory: pytest.TempPathFactory, request: Any) -> Path:
    """A micro RadFinder bundle (random weights), exported once per test session.

    Thresholds are rewritten so presence does not depend on random weights: the first nine
    labels at 0 (always present, so they have key slices), the rest at 1 (absent).
    bundle.toml is not among the hashed files, so the bundle stays valid.
    """
    out = tmp_path_factory.getbasetemp() / "micro-bundle"
    if (out / "bundle.toml").exists():
        return out
    import torch

    from engines.bundle import export_bundle
    from engines.model import build_model
    from engines.training import save_checkpoint
    from model_fixtures import MICRO

    tower = request.getfixturevalue("tower")
    run = tmp_path_factory.mktemp("micro-run")
    torch.manual_seed(0)
    model = build_model(MICRO, text_tower=tower)
    save_checkpoint(run / "checkpoints" / "last.pt", model, MICRO, step=3, extra={"train": {}})
    staging = tmp_path_factory.mktemp("micro-bundle-staging")
    export_bundle(run, staging, text_tower=tower, progress=False, overwrite=True)
    manifest = tomllib.loads((staging / "bundle.toml").read_text())
    for j, row in enumerate(manifest["labels"]):
        row["threshold"] = 0.0 if j < PRESENT_LABELS else 1.0
    (staging / "bundle.toml").write_text(tomli_w.dumps(manifest))
    shutil.move(staging, out)
    return out


@pytest.fixture(scope="session")
def micro_bundle(tmp_path_factory: pytest.TempPathFactory, request: Any) -> Path:
    return build_micro_bundle(tmp_path_factory, request)


def job_rows(db: Database) -> list[Job]:
    with db.transaction() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def outbound_rows(db: Database) -> list[OutboundObject]:
    with db.transaction() as session:
        return list(session.scalars(select(OutboundObject).order_by(OutboundObject.id)))


def wait_job(db: Database, series_uid: str, states: set[JobState], timeout: float = 60) -> Job:
    found: list[Job] = []

    def done() -> bool:
        found[:] = [j for j in job_rows(db) if j.series_uid == series_uid and j.state in states]
        return bool(found)

    assert wait_for(done, timeout=timeout, interval=0.1), [
        (j.state, j.error) for j in job_rows(db)
    ]
    return found[0]


@dataclass
class Processed:
    node: Node
    series: SyntheticSeries
    job: Job
    pacs: StoreSCP
    bundle: Path


@pytest.fixture(scope="module")
def processed(
    tmp_path_factory: pytest.TempPathFactory, micro_bundle: Path
) -> Iterator[Processed]:
    """One synthetic chest CT received, read and sent back, by one node."""
    tmp = tmp_path_factory.mktemp("worker")
    hu, spacing = small_phantom()
    series = write_ct_series(tmp / "series", hu, spacing)
    pacs = StoreSCP(tmp / "pacs", free_port()).start()
    node = Node(
        node_settings(
            data_dir=tmp / "node",
            bundle_path=micro_bundle,
            destinations=[pacs.destination],
            send_backoff_s=0.2,
        )
    )
    node.start()
    try:
        assert node.port is not None and node.worker is not None
        sent = storescu(node.port, series.paths[0].parent)
        assert sent.returncode == 0, sent.stderr
        job = wait_job(node.db, series.series_uid, {JobState.DONE, JobState.FAILED})
        assert job.state == JobState.DONE, job.error
        assert wait_for(
            lambda: all(r.state == OutboundState.SENT for r in outbound_rows(node.db))
            and len(outbound_rows(node.db)) == 2,
            timeout=30,
        )
        yield Processed(node, series, job, pacs, micro_bundle)
    finally:
        node.stop()
        pacs.stop()


def expected_findings(series: SyntheticSeries, bundle: Path) -> dict[str, dict[str, Any]]:
    """The findings recomputed here: engine on the series, mode of each depth distribution."""
    from dicom_io.volume import load_volume_dir
    from engines.runtimes import load_engine

    engine = load_engine(bundle, "onnx")
    volume = load_volume_dir(series.paths[0].parent)
    prediction, mi = engine.predict_volume(volume.hu, volume.spacing, volume.affine)
    probs = prediction.probabilities[0].numpy()
    dist = prediction.depth_distribution[0].numpy()
    valid = mi.space.depth_valid
    out: dict[str, dict[str, Any]] = {}
    for j, label in enumerate(engine.bundle.labels):
        present = bool(probs[j] >= label.threshold)
        entry: dict[str, Any] = {"probability": float(probs[j]), "present": present}
        if present:
            # The mode's data slices in model space, their centre in patient z, and the source
            # slice nearest to it by the slices' own positions.
            token = int(np.argmax(np.where(valid, dist[j], -np.inf)))
            spt, (lo, hi) = mi.space.slices_per_token, mi.space.valid[0]
            first, last = max(token * spt, lo), min((token + 1) * spt, hi) - 1
            z = mi.space.model_z_to_z_mm((first + last) / 2)
            slice_z = [_z_of(p) for p in series.paths]
            nearest = int(np.argmin([abs(zi - z) for zi in slice_z]))
            entry["key_uid"] = series.sop_uids[nearest]
            entry["key_z"] = z
        out[label.name] = entry
    return out


def _z_of(path: Path) -> float:
    return float(dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])


@pytest.mark.slow
@pytest.mark.integration
def test_sr_and_kos_carry_the_engines_findings(processed: Processed) -> None:
    from dicom_io.kos import kos_referenced_sop_uids
    from dicom_io.sr import read_sr_probabilities

    job, settings = processed.job, processed.node.settings
    assert job.attempts == 1 and job.error is None
    assert {"queue", "engine", "load", "preprocess", "infer", "findings", "write"} <= set(
        job.timings
    )
    expected = expected_findings(processed.series, processed.bundle)
    assert job.result is not None
    objects = {o["kind"]: o for o in job.result["objects"]}
    assert set(objects) == {"sr", "kos"}

    sr = dcmread(settings.results_dir / objects["sr"]["path"])
    assert sr.StudyInstanceUID == processed.series.study_uid
    assert sr.SeriesInstanceUID != processed.series.series_uid
    got = read_sr_probabilities(sr)
    assert set(got) == set(expected)
    for label, (probability, present) in got.items():
        assert probability == pytest.approx(expected[label]["probability"], abs=1e-5)
        assert present == expected[label]["present"]
    assert sum(present for _, present in got.values()) == 9

    kos = dcmread(settings.results_dir / objects["kos"]["path"])
    assert kos.StudyInstanceUID == processed.series.study_uid
    key_uids = {e["key_uid"] for e in expected.values() if e["present"]}
    assert set(kos_referenced_sop_uids(kos)) == key_uids

    # The key slice is the source slice nearest the finding's z, which lies in the scan.
    by_uid = dict(zip(processed.series.sop_uids, processed.series.paths, strict=True))
    spacing = abs(_z_of(processed.series.paths[1]) - _z_of(processed.series.paths[0]))
    for row in job.result["findings"]:
        if row["present"]:
            e = expected[row["label"]]
            assert row["key_sop_instance_uid"] == e["key_uid"]
            assert row["key_z_mm"] == pytest.approx(e["key_z"], abs=1e-3)
            assert abs(_z_of(by_uid[e["key_uid"]]) - row["key_z_mm"]) <= spacing / 2 + 1e-3
        else:
            assert row["key_sop_instance_uid"] is None


@pytest.mark.slow
@pytest.mark.integration
def test_results_reach_the_pacs_once(processed: Processed) -> None:
    assert processed.job.result is not None
    uids = sorted(o["sop_uid"] for o in processed.job.result["objects"])
    rows = outbound_rows(processed.node.db)
    assert sorted(r.sop_uid for r in rows) == uids
    assert all(r.state == OutboundState.SENT and r.attempts == 1 for r in rows)
    assert all(r.destination == processed.pacs.destination for r in rows)
    assert processed.pacs.received() == uids
    job = next(j for j in job_rows(processed.node.db) if j.id == processed.job.id)
    assert job.timings["send"] >= 0


@pytest.mark.slow
@pytest.mark.integration
def test_running_a_job_twice_gives_one_result_set(processed: Processed) -> None:
    from radfinder_node.celery_app import send_infer
    from radfinder_node.jobs import requeue

    node, settings = processed.node, processed.node.settings
    assert processed.job.result is not None
    paths = [settings.results_dir / o["path"] for o in processed.job.result["objects"]]
    before = {p: p.read_bytes() for p in paths}
    first_finished = processed.job.finished_at

    # A duplicate message for a done job does nothing.
    send_infer(node.celery, processed.job.id)
    # An explicit re-run computes again and writes the same objects, byte for byte.
    assert requeue(node.db, node.celery, processed.job.id, reason="test")
    assert wait_for(
        lambda: any(
            j.id == processed.job.id
            and j.state == JobState.DONE
            and j.finished_at != first_finished
            for j in job_rows(node.db)
        ),
        timeout=60,
    )
    (again,) = [j for j in job_rows(node.db) if j.id == processed.job.id]
    assert again.result == processed.job.result
    assert {p: p.read_bytes() for p in paths} == before
    assert sorted(p.name for p in settings.results_dir.rglob("*.dcm")) == sorted(
        p.name for p in paths
    )
    assert len(job_rows(node.db)) >= 1
    rows = outbound_rows(node.db)
    assert len(rows) == 2 and all(r.state == OutboundState.SENT and r.attempts == 1 for r in rows)
    wait_for(lambda: False, timeout=1.0)  # give the outbox a few passes
    assert processed.pacs.received() == sorted(
        o["sop_uid"] for o in processed.job.result["objects"]
    )


@pytest.mark.slow
@pytest.mark.integration
def test_series_that_cannot_be_assembled_fails_with_its_reason(
    processed: Processed, tmp_path: Path
) -> None:
    hu, spacing = small_phantom()
    series = write_ct_series(tmp_path / "gap", hu, spacing)
    series.paths[10].unlink()  # a missing slice in the middle
    assert processed.node.port is not None
    assert storescu(processed.node.port, series.paths[0].parent).returncode == 0
    job = wait_job(processed.node.db, series.series_uid, {JobState.FAILED, JobState.DONE})
    assert job.state == JobState.FAILED
    assert job.attempts == 1
    assert job.error is not None and "MissingSlicesError" in job.error
    assert not [r for r in outbound_rows(processed.node.db) if r.series_uid == series.series_uid]


@pytest.mark.slow
@pytest.mark.integration
def test_job_on_postgresql(pg_url: str, micro_bundle: Path, tmp_path: Path) -> None:
    hu, spacing = small_phantom()
    series = write_ct_series(tmp_path / "series", hu, spacing)
    node = Node(
        node_settings(data_dir=tmp_path / "node", database_url=pg_url, bundle_path=micro_bundle)
    )
    node.start()
    try:
        assert node.port is not None
        assert storescu(node.port, series.paths[0].parent).returncode == 0
        job = wait_job(node.db, series.series_uid, {JobState.DONE, JobState.FAILED})
        assert job.state == JobState.DONE, job.error
        assert job.destinations == [] and outbound_rows(node.db) == []
        assert job.result is not None
        for obj in job.result["objects"]:
            ds = dcmread(node.settings.results_dir / obj["path"])
            assert ds.SOPInstanceUID == obj["sop_uid"]
            assert ds.StudyInstanceUID == series.study_uid
    finally:
        node.stop()



# ----------------------------------------------------------------------------- findings (pure)


def _labels(thresholds: list[float]) -> list[Any]:
    from engines.bundle import LABEL_CODES, BundleLabel
    from engines.data.labels import LABELS

    out = []
    for j, thr in enumerate(thresholds):
        code, site = LABEL_CODES[LABELS[j]]
        out.append(BundleLabel(j, LABELS[j], code, site, thr, "test", (), ()))
    return out


def _prediction(probs: list[float], dist: np.ndarray, valid: np.ndarray) -> Any:
    import torch

    from engines.model.radfinder import Prediction

    return Prediction(
        probabilities=torch.tensor([probs], dtype=torch.float32),
        depth_distribution=torch.from_numpy(dist[None].astype(np.float32)),
        image_embedding=torch.zeros((1, 4)),
        depth_embeddings=torch.zeros((1, dist.shape[1], 4)),
        depth_valid=torch.from_numpy(valid[None].copy()),
    )


@pytest.fixture
def model_input() -> Any:
    """21 axial slices of 2.5 mm in the micro model space (24 x 4 mm, 3 per token): the scan
    fills model slices 6..18, so tokens 0-1 and 7 are padding and token 6 is partly padding."""
    from engines.preprocess import to_model_space
    from model_fixtures import MICRO

    return to_model_space(np.zeros((21, 32, 32)), (2.5, 10.0, 10.0), config=MICRO.space)


def test_findings_take_the_mode_of_valid_tokens_to_the_nearest_slice(model_input: Any) -> None:
    from radfinder_node.findings import findings_from_prediction

    space = model_input.space
    valid = space.depth_valid
    tokens = np.flatnonzero(valid)
    assert space.valid[0] == (6, 19) and tokens.tolist() == [2, 3, 4, 5, 6]
    uids = [f"1.2.826.0.1.{i + 1}" for i in range(21)]
    z_of_slice = [space.source_affine[2][0] * i + space.source_affine[2][3] for i in range(21)]
    # The plain centre of the edge token lies beyond the last slice.
    assert space.token_to_z_mm(tokens[-1]) > max(z_of_slice)

    dist = np.zeros((3, len(valid)))
    dist[0, tokens[len(tokens) // 2]] = 0.6  # a clear interior mode ...
    dist[0, np.flatnonzero(~valid)[0]] = 0.9  # ... and more mass on padding, which is ignored
    dist[1, tokens[-1]] = 1.0  # the edge token, partly padding
    dist[2, tokens[1]] = 1.0
    findings = findings_from_prediction(
        _prediction([0.7, 0.55, 0.2], dist, valid), model_input, _labels([0.5, 0.5, 0.5]), uids
    )
    assert [f.present for f in findings] == [True, True, False]
    assert findings[2].key_sop_instance_uid is None and findings[2].key_z_mm is None
    for f, token in zip(findings[:2], (tokens[len(tokens) // 2], tokens[-1]), strict=True):
        assert f.key_z_mm is not None and f.key_sop_instance_uid is not None
        # z lies in the token's extent and inside the scan; the key is the nearest slice.
        lo_z = space.model_z_to_z_mm(token * space.slices_per_token - 0.5)
        hi_z = space.model_z_to_z_mm((token + 1) * space.slices_per_token - 0.5)
        assert lo_z <= f.key_z_mm <= hi_z
        assert min(z_of_slice) <= f.key_z_mm <= max(z_of_slice)
        nearest = int(np.argmin([abs(z - f.key_z_mm) for z in z_of_slice]))
        assert f.key_sop_instance_uid == uids[nearest]
    assert findings[0].code.scheme == "DCM" and findings[0].label == "Medical material"
    assert findings[1].finding_site is not None  # arterial wall calcification: artery


def test_findings_threshold_is_inclusive_and_shapes_are_checked(model_input: Any) -> None:
    from radfinder_node.findings import FindingsError, findings_from_prediction

    valid = model_input.space.depth_valid
    dist = np.tile(valid / valid.sum(), (2, 1))
    uids = [f"1.2.826.0.1.{i + 1}" for i in range(21)]
    found = findings_from_prediction(
        _prediction([0.5, 0.49], dist, valid), model_input, _labels([0.5, 0.5]), uids
    )
    assert [f.present for f in found] == [True, False]
    with pytest.raises(FindingsError, match="probabilities"):
        findings_from_prediction(
            _prediction([0.5, 0.4], dist, valid), model_input, _labels([0.5]), uids
        )
    with pytest.raises(FindingsError, match="slice UIDs"):
        findings_from_prediction(
            _prediction([0.5, 0.4], dist, valid), model_input, _labels([0.5, 0.5]), uids[:5]
        )
