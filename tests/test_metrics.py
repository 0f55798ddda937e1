"""Prometheus metrics and health endpoints over real HTTP: a study through the whole node
(storescu, embedded worker with the micro bundle, storescp as PACS), an HL7 report over MLLP,
then /metrics scraped and every number checked against the database and the files; /readyz
against a Redis that is killed and a PostgreSQL database that is dropped."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import base64
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from sqlalchemy import func, select
from test_hl7_listener import MllpClient, msa
from test_outbox import StoreSCP
from test_worker import build_micro_bundle, job_rows, outbound_rows, wait_job

from conftest import PG_ADMIN, free_port, node_settings, small_phantom, storescu, wait_for
from dicom_io.synthetic import SyntheticSeries, write_ct_series
from radfinder_node.job_models import Job, JobState, OutboundState
from radfinder_node.models import Instance
from radfinder_node.node import Node
from radfinder_node.outbox import Written, add_outbound, write_result
from radfinder_node.report_models import PairState, SnippetSlicePair
from reports.hl7_writer import oru_r01

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# ------------------------------------------------------------------------------ helpers


def http_get(
    port: int, path: str, *, password: str | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request to the node on loopback; errors are answers."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if password is not None:
        token = base64.b64encode(f"operator:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def scrape(port: int, password: str | None = None) -> Samples:
    status, headers, body = http_get(port, "/metrics", password=password)
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    status, _, body = http_get(port, "/readyz")
    return status, json.loads(body)


def report_for(series: SyntheticSeries, control_id: str, text: str) -> bytes:
    return oru_r01(
        text,
        accession_number="",
        patient_id="P1",
        patient_name="Doe^Jane",
        study_uid=series.study_uid,
        placer_order="PO1",
        filler_order="FO1",
        observation_datetime=datetime(2026, 1, 5, 10, 0),
        sending_facility="HOSP",
        control_id=control_id,
    )


REPORT_TEXT = (
    "CT chest.\n"
    "A 6 mm nodule in the right upper lobe (series 2, image 10).\n"
    "Small effusion (series 2, image 99)."  # the series has 24 images: unresolved
)


@pytest.fixture(scope="session")
def micro_bundle(tmp_path_factory: pytest.TempPathFactory, request: Any) -> Path:
    return build_micro_bundle(tmp_path_factory, request)


@dataclass
class Processed:
    node: Node
    series: SyntheticSeries
    job: Job


def process_study(tmp: Path, bundle: Path, **overrides: Any) -> Iterator[Processed]:
    """One synthetic chest CT in, its results out to a storescp, one HL7 report linked and
    mined: the node is left running for the test to look at."""
    hu, spacing = small_phantom()
    series = write_ct_series(tmp / "series", hu, spacing)
    pacs = StoreSCP(tmp / "pacs", free_port()).start()
    node = Node(
        node_settings(
            data_dir=tmp / "node",
            bundle_path=bundle,
            destinations=[pacs.destination],
            send_backoff_s=0.2,
            **overrides,
        )
    )
    node.start()
    try:
        assert node.port and node.http_port and node.hl7_port
        sent = storescu(node.port, series.paths[0].parent)
        assert sent.returncode == 0, sent.stderr
        wait_job(node.db, series.series_uid, {JobState.DONE, JobState.FAILED})
        assert wait_for(
            lambda: (
                len(outbound_rows(node.db)) == 2
                and all(r.state == OutboundState.SENT for r in outbound_rows(node.db))
                and "send" in job_rows(node.db)[0].timings
            ),
            timeout=30,
        )
        client = MllpClient(node.hl7_port)
        try:
            assert msa(client.send(report_for(series, "CTRL1", REPORT_TEXT)))[0] == "AA"
        finally:
            client.close()

        def mined() -> bool:
            with node.db.transaction() as session:
                return bool(session.scalar(select(func.count()).select_from(SnippetSlicePair)))

        assert wait_for(mined, timeout=30)
        job = job_rows(node.db)[0]
        assert job.state == JobState.DONE, job.error
        yield Processed(node, series, job)
    finally:
        node.stop()
        pacs.stop()


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory, micro_bundle: Path) -> Iterator[Processed]:
    yield from process_study(tmp_path_factory.mktemp("metrics"), micro_bundle)


# ------------------------------------------------------------------------------ metrics


@pytest.mark.slow
@pytest.mark.integration
def test_metrics_after_a_study_and_a_report(processed: Processed) -> None:
    node, job = processed.node, processed.job
    assert node.http_port is not None
    # A malformed report (no accession, no study UID) is answered AE and quarantined.
    client = MllpClient(node.hl7_port or 0)
    try:
        bad = report_for(processed.series, "CTRL2", "text").replace(
            processed.series.study_uid.encode(), b""
        )
        assert msa(client.send(bad))[0] == "AE"
    finally:
        client.close()
    assert wait_for(lambda: job.id in {j.id for j in job_rows(node.db)})
    # The metrics of a finished job appear right after its row turns done.
    assert wait_for(
        lambda: (
            value(
                scrape(node.http_port or 0), "radfinder_job_attempts_finished_total", outcome="done"
            )
            == 1
        )
    )
    m = scrape(node.http_port)

    # Instances and their bytes: what the spool holds, file for file.
    with node.db.transaction() as session:
        sizes = session.execute(select(Instance.path, Instance.size_bytes)).all()
    assert len(sizes) == len(processed.series.paths) == 24
    on_disk = sum((node.settings.spool_dir / p).stat().st_size for p, _ in sizes)
    assert sum(s for _, s in sizes) == on_disk
    assert value(m, "radfinder_instances_received_total") == 24
    assert value(m, "radfinder_instances_received_bytes_total") == on_disk
    assert value(m, "radfinder_instances_rejected_total") == 0

    # States from the database.
    assert value(m, "radfinder_database_up") == 1
    assert value(m, "radfinder_series", state="selected") == 1
    assert value(m, "radfinder_series", state="receiving") == 0
    assert value(m, "radfinder_jobs", state="done") == 1
    assert value(m, "radfinder_queue_depth") == 0
    assert value(m, "radfinder_outbox_objects", state="sent") == 2
    assert value(m, "radfinder_outbox_backlog") == 0
    assert value(m, "radfinder_outbox_objects_sent_total") == 2

    # Stage latencies: one observation per stage, equal to the job row's timings.
    job = job_rows(node.db)[0]
    assert {"queue", "load", "preprocess", "infer", "findings", "write", "send"} <= set(job.timings)
    for stage, seconds in job.timings.items():
        assert value(m, "radfinder_job_stage_seconds_count", stage=stage) == 1, stage
        assert value(m, "radfinder_job_stage_seconds_sum", stage=stage) == pytest.approx(
            seconds, abs=1e-3
        ), stage
    assert value(m, "radfinder_job_stage_seconds_bucket", stage="infer", le="+Inf") == 1

    # HL7: one AA, one AE; one report mined into one resolved and one unresolved pair.
    assert value(m, "radfinder_hl7_messages_total", ack="AA") == 1
    assert value(m, "radfinder_hl7_messages_total", ack="AE") == 1
    assert value(m, "radfinder_hl7_messages_total", ack="AR") == 0
    assert value(m, "radfinder_quarantined_objects", kind="hl7") == 1
    assert value(m, "radfinder_reports", state="linked") == 1
    assert value(m, "radfinder_reports_mined_total") == 1
    with node.db.transaction() as session:
        pairs = dict(
            session.execute(
                select(SnippetSlicePair.state, func.count()).group_by(SnippetSlicePair.state)
            ).all()
        )
    assert pairs == {PairState.RESOLVED: 1, PairState.UNRESOLVED: 1}
    for state in ("resolved", "unresolved"):
        assert value(m, "radfinder_snippets_mined_total", state=state) == 1
        assert value(m, "radfinder_snippet_pairs", state=state) == 1

    # Engine, device and bundle as labels: the ones the job ran with.
    assert job.result is not None
    info = [labels for (name, labels) in m if name == "radfinder_engine_info"]
    assert len(info) == 1
    labels = dict(info[0])
    assert labels == {
        "engine": job.result["runtime"],
        "device": "cpu",
        "bundle": job.result["bundle"]["name"],
        "bundle_version": job.result["bundle"]["version"],
        "loaded": "true",
    }


@pytest.mark.slow
@pytest.mark.integration
def test_send_failures_and_backlog(make_node: Callable[..., Node], chest_series: Any) -> None:
    """A destination that refuses: the backlog holds the object while it is retried, the
    failures count each attempt, and the final one is counted as such."""
    dead = f"GONE@127.0.0.1:{free_port()}"
    node = make_node(send_max_attempts=2, send_backoff_s=1.0, embedded_worker=False)
    assert node.http_port is not None
    ds = dcmread(chest_series.paths[0])
    rel = write_result(node.settings.results_dir, ds, fsync=False)
    with node.db.transaction() as session:
        add_outbound(session, None, [Written.of("sr", ds, rel)], [dead])
    node.outbox.wake()

    def failures(outcome: str) -> float:
        key = (
            "radfinder_outbox_send_failures_total",
            (("destination", dead), ("outcome", outcome)),
        )
        return scrape(node.http_port or 0).get(key, 0.0)  # no sample before the first one

    assert wait_for(lambda: failures("retry") == 1, timeout=20)
    m = scrape(node.http_port)
    assert value(m, "radfinder_outbox_backlog") == 1
    assert value(m, "radfinder_outbox_oldest_pending_seconds") > 0
    assert wait_for(lambda: failures("failed") == 1, timeout=20)
    m = scrape(node.http_port)
    assert value(m, "radfinder_outbox_backlog") == 0
    assert value(m, "radfinder_outbox_objects", state="failed") == 1
    assert value(m, "radfinder_outbox_objects_sent_total") == 0


def test_each_node_counts_only_its_own(
    make_node: Callable[..., Node], chest_series: Any, tmp_path: Path
) -> None:
    """Two nodes in one process: each registry shows its own node, not the other's."""
    no_bundle = {"bundle_path": tmp_path / "no-bundle"}
    a, b = make_node(**no_bundle), make_node(**no_bundle)
    assert a.port and a.http_port and b.http_port and a.http_port != b.http_port
    sent = storescu(a.port, chest_series.paths[0].parent)
    assert sent.returncode == 0, sent.stderr
    total = sum(p.stat().st_size for p in chest_series.paths)
    assert value(scrape(a.http_port), "radfinder_instances_received_total") == 24
    assert value(scrape(a.http_port), "radfinder_instances_received_bytes_total") >= total
    assert value(scrape(b.http_port), "radfinder_instances_received_total") == 0
    assert value(scrape(b.http_port), "radfinder_series", state="receiving") == 0
    # No bundle: the engine has no labels and readiness says why.
    assert [k[1] for k in scrape(a.http_port) if k[0] == "radfinder_engine_info"] == [()]
    status, body = readyz(a.http_port)
    assert status == 503
    assert body["checks"]["engine"]["ok"] is False
    assert "no model bundle" in body["checks"]["engine"]["detail"]
    assert body["checks"]["database"]["ok"] and body["checks"]["broker"]["ok"]


# ------------------------------------------------------------------------------ health


class RedisServer:
    """A private redis-server on a free loopback port, to be killed and restarted."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert wait_for(self._answers, timeout=10), "redis-server did not start"
        return self

    def _answers(self) -> bool:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
        )
        return out.stdout.strip() == "PONG"

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_readyz_follows_the_broker(make_node: Callable[..., Node], tmp_path: Path) -> None:
    redis = RedisServer(tmp_path).start()
    try:
        node = make_node(broker_url=f"redis://127.0.0.1:{redis.port}/0", embedded_worker=False)
        assert node.http_port is not None
        status, body = readyz(node.http_port)
        assert status == 200, body
        assert body["ready"] is True and body["failed"] == []
        assert set(body["checks"]) == {"database", "broker", "engine", "listeners"}

        redis.kill()
        status, body = readyz(node.http_port)
        assert status == 503
        assert body["ready"] is False
        assert [f.split(":")[0] for f in body["failed"]] == ["broker"]
        assert "refused" in body["checks"]["broker"]["detail"].lower()
        assert body["checks"]["broker"]["seconds"] < 3.5
        assert http_get(node.http_port, "/healthz")[0] == 200  # alive, just not ready

        redis.start()  # same port
        assert wait_for(lambda: readyz(node.http_port or 0)[0] == 200, timeout=10)
    finally:
        redis.kill()


@pytest.mark.integration
def test_readyz_follows_the_database(make_node: Callable[..., Node], pg_url: str) -> None:
    node = make_node(database_url=pg_url, embedded_worker=False)
    assert node.http_port is not None
    assert readyz(node.http_port)[0] == 200
    assert value(scrape(node.http_port), "radfinder_database_up") == 1

    name = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    status, body = readyz(node.http_port)
    assert status == 503
    assert "database" in [f.split(":")[0] for f in body["failed"]]
    assert name in body["checks"]["database"]["detail"]
    m = scrape(node.http_port)  # the scrape still answers, and says the database is down
    assert value(m, "radfinder_database_up") == 0
    assert ("radfinder_series", (("state", "selected"),)) not in m
    assert http_get(node.http_port, "/healthz")[0] == 200


def test_standalone_worker_serves_its_own_metrics(tmp_path: Path) -> None:
    """`radfinder-node worker --metrics-port`: the process registry (job stages, engine) with
    liveness, behind the same password; states stay with the node."""
    from radfinder_node.metrics import process_metrics
    from radfinder_node.web import serve_worker_metrics

    settings = node_settings(data_dir=tmp_path, http_password="w0rker")
    server = serve_worker_metrics(settings, 0)
    try:
        port = server.port or 0
        assert server.host == "127.0.0.1"
        before = scrape(port, "w0rker")
        process_metrics().job_finished("done", {"infer": 0.75, "load": 0.25})
        after = scrape(port, "w0rker")
        for stage, seconds in (("infer", 0.75), ("load", 0.25)):
            key = ("radfinder_job_stage_seconds_sum", (("stage", stage),))
            assert after[key] - before[key] == pytest.approx(seconds)
        assert not [k for k in after if k[0] == "radfinder_database_up"]
        assert http_get(port, "/metrics")[0] == 401
        assert http_get(port, "/healthz")[0] == 200
        assert http_get(port, "/", password="w0rker")[0] == 404
    finally:
        server.stop()
