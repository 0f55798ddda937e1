"""The status page: the pure renderer on hand-made snapshots (escaping, states, findings), the
snapshot read from a real database (SQLite and PostgreSQL) after a real study and HL7 feed, and
the HTTP side: password, read-only methods, thumbnails decoded from the spool."""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from sqlalchemy import func, select
from test_hl7_listener import MllpClient, msa
from test_metrics import REPORT_TEXT, http_get, report_for

from conftest import storescu, wait_for
from radfinder_node.config import Settings
from radfinder_node.job_models import Job
from radfinder_node.node import Node
from radfinder_node.report_models import Report
from radfinder_node.status_page import render_status_page, study_state, thumbnail_url
from radfinder_node.status_snapshot import (
    FindingRow,
    JobRow,
    OutboundRow,
    QuarantineRow,
    ReportRow,
    SeriesRow,
    Snapshot,
    StudyRow,
    take_snapshot,
)

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
HOSTILE = "<script>alert('x')</script>\"&"


class _Tags(HTMLParser):
    """Every start tag with its attributes, to check what a browser would build."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags_of(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(html)
    return parser.tags


def hand_made() -> Snapshot:
    job = JobRow(
        id=7,
        series_uid="1.2.3.4",
        study_uid="1.2.3",
        bundle="radfinder 1.0",
        state="done",
        attempts=1,
        worker="gpu0@host",
        timings={"queue": 0.5, "load": 1.25, "infer": 2.0, "send": 0.25},
        error=None,
        queued_at=NOW - timedelta(minutes=5),
        finished_at=NOW - timedelta(minutes=4),
        findings=(
            FindingRow("Lung nodule", 0.91, 0.5, "1.2.3.4.10", -120.5),
            FindingRow("Pleural effusion", 0.66, 0.5, "../../etc/passwd", 3.0),
        ),
        labels_total=18,
    )
    failed = JobRow(
        id=8,
        series_uid="1.2.3.5",
        study_uid="1.2.3",
        bundle="radfinder 1.0",
        state="failed",
        attempts=3,
        worker=None,
        timings={},
        error=HOSTILE,
        queued_at=NOW - timedelta(hours=3),
        finished_at=None,
        findings=(),
        labels_total=0,
    )
    return Snapshot(
        taken_at=NOW,
        counts={"studies": 1, "instances": 24, "quarantined": 2, "series": {"selected": 1}},
        studies=(
            StudyRow(
                study_uid="1.2.3",
                accession="ACC<1>",
                study_date="20260301",
                description=HOSTILE,
                received_at=NOW - timedelta(seconds=30),
                series=(SeriesRow("1.2.3.4", 2, "Chest", "CT", "selected", None, 24),),
                job_states=("done",),
            ),
        ),
        jobs=(job, failed),
        outbox=(
            OutboundRow(
                "1.2.9",
                "sr",
                "PACS@10.0.0.5:104",
                "pending",
                2,
                0xA700,
                HOSTILE,
                NOW - timedelta(minutes=1),
                None,
            ),
        ),
        reports=(
            ReportRow(
                1,
                NOW - timedelta(minutes=2),
                "HOSP",
                "CTRL<1>",
                "ACC1",
                "F",
                "linked",
                None,
                False,
                1,
                2,
                True,
            ),
        ),
        quarantine=(
            QuarantineRow("hl7", HOSTILE, NOW, None, None, "127.0.0.1:5000", 101, 120),
            QuarantineRow("dicom", "not a CT", NOW, "1.2.8", "MODALITY", None, 0xC210, 4096),
        ),
        failed_jobs=(failed,),
        engine={
            "engine": "onnx",
            "device": "cpu",
            "bundle": "radfinder",
            "bundle_version": "1.0",
            "loaded": "true",
        },
        hl7_acks={"AA": 5, "AE": 1, "AR": 0},
    )


def test_page_escapes_everything_it_shows() -> None:
    html = render_status_page(hand_made())
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&quot;&amp;" in html
    assert "ACC&lt;1&gt;" in html and "CTRL&lt;1&gt;" in html
    tags = tags_of(html)
    assert not [t for t, _ in tags if t in {"script", "iframe", "object", "embed", "form"}]
    assert not [a for _, attrs in tags for a in attrs if a.startswith("on")]


def test_page_shows_findings_with_thumbnails_of_uids_only() -> None:
    html = render_status_page(hand_made(), refresh_s=0)
    images = [attrs for tag, attrs in tags_of(html) if tag == "img"]
    assert [i["src"] for i in images] == ["thumb/1.2.3.4.10.png"]  # not the path-like one
    assert images[0]["alt"] == "key image of Lung nodule"
    assert "Pleural effusion" in html and "no key image" in html
    assert "p 0.91 (threshold 0.50) · z -120.5 mm" in html
    assert "2 of 18 present" in html and "2 of 18 labels present" in html
    assert 'http-equiv="refresh"' not in html


def test_page_shows_stages_acks_errors_and_the_engine() -> None:
    html = render_status_page(hand_made())
    assert "queue 0.50 s · load 1.25 s · infer 2.00 s · send 0.25 s" in html
    widths = [a["style"] for t, a in tags_of(html) if t == "span" and a.get("class") == "st-load"]
    assert widths == ["width:31.2%"]  # 1.25 of 4.0 s
    assert "radfinder 1.0 on onnx/cpu" in html
    assert "0xA700" in html and "0xC210" in html
    for section in ("summary", "studies", "jobs", "findings", "outbox", "hl7", "errors"):
        assert f'<section id="{section}">' in html
    errors = html[html.index('<section id="errors">') :]
    assert "Failed jobs" in errors and "Quarantine" in errors and "not a CT" in errors
    hl7 = html[html.index('<section id="hl7">') : html.index('<section id="errors">')]
    assert "1 of 2 resolved" in hl7 and "Rejected messages" in hl7
    assert '<span class="state s-AE">AE</span> <b>1</b>' in hl7
    assert 'http-equiv="refresh" content="30"' in html


def test_empty_page_says_so() -> None:
    html = render_status_page(Snapshot(taken_at=NOW, counts={}))
    for text in (
        "No studies received yet.",
        "No inference jobs yet.",
        "No finished jobs yet.",
        "Nothing to send yet.",
        "No reports received yet.",
        "No errors.",
        "no model bundle",
    ):
        assert text in html


@pytest.mark.parametrize(
    ("series", "jobs", "expected"),
    [
        ((), (), "empty"),
        (("receiving", "selected"), ("done",), "receiving"),
        (("complete",), (), "complete"),
        (("selected", "ignored"), ("queued", "done"), "queued"),
        (("selected",), ("running", "failed"), "running"),
        (("selected",), ("failed", "done"), "failed"),
        (("selected",), ("done",), "done"),
        (("ignored", "ignored"), (), "ignored"),
        (("selected",), (), "selected"),
    ],
)
def test_study_state(series: tuple[str, ...], jobs: tuple[str, ...], expected: str) -> None:
    assert study_state(series, jobs) == expected


@pytest.mark.parametrize(
    ("uid", "url"),
    [
        ("1.2.840.10008.1", "thumb/1.2.840.10008.1.png"),
        ("../../etc/passwd", None),
        ("1.2.3.png?x=1", None),
        ("01.2", None),
        ("1." + "2" * 80, None),
        (None, None),
        ("", None),
    ],
)
def test_thumbnail_url(uid: str | None, url: str | None) -> None:
    assert thumbnail_url(uid) == url


def test_http_defaults_are_loopback_and_no_password() -> None:
    fields = Settings.model_fields
    assert fields["http_host"].default == "127.0.0.1"
    assert fields["http_port"].default == 8080
    assert fields["http_password"].default is None


# ------------------------------------------------------------------------------ live


def manifest_only_bundle(directory: Path) -> Path:
    """A bundle directory with only its manifest: enough for the node to create jobs (no
    worker runs here), without the seconds a real export takes."""
    directory.mkdir(parents=True)
    (directory / "bundle.toml").write_text('name = "test-bundle"\nversion = "1"\n')
    return directory


def expected_thumbnail(path: Path) -> np.ndarray:
    """The slice in the wide window (-1000..400 HU), computed here from pydicom's pixels."""
    ds = dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return np.clip((hu + 1000.0) * 255.0 / 1400.0, 0, 255).astype(np.uint8)


@pytest.mark.integration
def test_live_page_thumbnails_and_password(
    make_node: Callable[..., Node], db_url: str, chest_series: Any, tmp_path: Path
) -> None:
    password = "s3cret pass:word"
    node = make_node(
        database_url=db_url,
        bundle_path=manifest_only_bundle(tmp_path / "bundle"),
        embedded_worker=False,
        http_password=password,
    )
    port = node.http_port
    assert port is not None and node.port and node.hl7_port
    assert node.web is not None and node.web.host == "127.0.0.1"
    assert storescu(node.port, chest_series.paths[0].parent).returncode == 0
    client = MllpClient(node.hl7_port)
    try:
        assert msa(client.send(report_for(chest_series, "CTRL1", REPORT_TEXT)))[0] == "AA"
        bad = report_for(chest_series, "CTRL2", "x").replace(chest_series.study_uid.encode(), b"")
        assert msa(client.send(bad))[0] == "AE"
    finally:
        client.close()

    def settled() -> bool:
        with node.db.transaction() as session:
            jobs = session.scalar(select(func.count()).select_from(Job))
            mined = session.scalar(select(func.count()).where(Report.mined_at.is_not(None)))
        return bool(jobs) and bool(mined)

    assert wait_for(settled, timeout=30)

    snap = take_snapshot(node.db)
    [study] = snap.studies
    assert study.study_uid == chest_series.study_uid
    assert [(s.series_uid, s.instances, s.state) for s in study.series] == [
        (chest_series.series_uid, 24, "selected")
    ]
    assert study.job_states == ("queued",)
    assert [(j.series_uid, j.state, j.bundle) for j in snap.jobs] == [
        (chest_series.series_uid, "queued", "test-bundle 1")
    ]
    [report] = snap.reports
    assert (report.control_id, report.state, report.pairs_resolved, report.pairs_total) == (
        "CTRL1",
        "linked",
        1,
        2,
    )
    assert [(q.kind, q.status) for q in snap.quarantine] == [("hl7", 101)]

    # The password guards everything but liveness; every method but GET/HEAD is refused.
    for path in ("/", "/metrics", "/readyz", f"/thumb/{chest_series.sop_uids[0]}.png"):
        status, headers, _ = http_get(port, path)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Basic realm=")
        assert http_get(port, path, password="wrong")[0] == 401
    assert http_get(port, "/healthz")[0] == 200
    assert http_get(port, "/", password=password, method="POST")[0] == 405
    assert http_get(port, "/", password=password, method="DELETE")[0] == 405

    status, headers, body = http_get(port, "/", password=password)
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    html = body.decode()
    assert chest_series.study_uid in html and chest_series.series_uid in html
    assert "test-bundle 1" in html and "CTRL1" in html and "1 of 2 resolved" in html
    assert "(24 images)" in html
    assert "Rejected messages" in html
    head = http_get(port, "/", password=password, method="HEAD")
    assert head[0] == 200 and head[2] == b""

    # Thumbnails: the right slice, windowed, decoded from the spool; a second look is cached.
    path10 = chest_series.paths[9]
    sop10 = str(dcmread(path10, stop_before_pixels=True).SOPInstanceUID)
    status, headers, png = http_get(port, f"/thumb/{sop10}.png", password=password)
    assert status == 200 and headers["Content-Type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(png)))
    expected = expected_thumbnail(path10)
    assert image.shape == expected.shape == (64, 64)  # never enlarged
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1
    assert image[0, 0] == 0 and image.max() > 100  # air black, body bright
    assert http_get(port, f"/thumb/{sop10}.png", password=password)[2] == png
    assert node.web.app.thumbnails is not None and node.web.app.thumbnails.rendered == 1
    assert http_get(port, "/thumb/1.2.3.999.png", password=password)[0] == 404
    assert http_get(port, "/thumb/..%2F..%2Fetc%2Fpasswd.png", password=password)[0] == 400
