"""Prometheus metrics of one node: event counters fed by the components, state read from the
database at scrape time.

Two kinds of numbers, kept apart on purpose:

* Events (instances received, sends that failed, ACKs sent, job stage times) are counted where
  they happen, in the process they happen in. They start at zero with the process, as
  Prometheus expects of counters, and ``rate()`` makes them comparable across restarts.
* States (series by state, queue depth, outbox backlog) are not counted at all: the database is
  the source of truth for every state (DESIGN.md §1), so a collector asks it at each scrape.
  A counter kept beside the database would drift from it after a crash or on a second host.

Every node owns its registry (``NodeMetrics``), so tests can run several nodes in one process
and each scrape shows one node. A standalone worker process has no node; it records into
``process_metrics()`` and may expose that registry itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from sqlalchemy import func, select

from radfinder_node.database import Database
from radfinder_node.job_models import Job, JobState, OutboundObject, OutboundState
from radfinder_node.models import QuarantinedObject, Series, SeriesState
from radfinder_node.report_models import PairState, Report, ReportState, SnippetSlicePair
from radfinder_node.timeutil import as_utc, utcnow

log = logging.getLogger("radfinder_node.metrics")

# Job stages run from milliseconds (findings) to many minutes (a cold TensorRT build, a queue
# behind a busy GPU), hence the wide, roughly logarithmic buckets.
STAGE_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
)
JOB_STAGES = ("queue", "engine", "load", "preprocess", "infer", "findings", "write", "send")


class NodeMetrics:
    """The metric families of one node on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.instances_received = Counter(
            "radfinder_instances_received", "DICOM instances stored and acknowledged", registry=r
        )
        self.instance_bytes = Counter(
            "radfinder_instances_received_bytes",
            "Bytes of the DICOM instances stored (Part 10 files in the spool)",
            registry=r,
        )
        self.instances_rejected = Counter(
            "radfinder_instances_rejected",
            "DICOM instances refused and quarantined",
            registry=r,
        )
        self.job_stage_seconds = Histogram(
            "radfinder_job_stage_seconds",
            "Seconds a job spent per stage (queue, engine, load, preprocess, infer, findings, "
            "write, send)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.jobs_finished = Counter(
            "radfinder_job_attempts_finished",
            "Job attempts by outcome (done, failed, retry, skipped)",
            ["outcome"],
            registry=r,
        )
        self.objects_sent = Counter(
            "radfinder_outbox_objects_sent", "Result objects the peer confirmed", registry=r
        )
        self.send_failures = Counter(
            "radfinder_outbox_send_failures",
            "Failed send attempts by destination and what follows (retry, failed)",
            ["destination", "outcome"],
            registry=r,
        )
        self.hl7_messages = Counter(
            "radfinder_hl7_messages",
            "HL7 messages answered, by the ACK code decided (AA, AE, AR; none: not answered)",
            ["ack"],
            registry=r,
        )
        self.reports_mined = Counter(
            "radfinder_reports_mined", "Linked reports mined for image references", registry=r
        )
        self.snippets_mined = Counter(
            "radfinder_snippets_mined",
            "Snippet-slice pairs mined from reports, by state (resolved, unresolved)",
            ["state"],
            registry=r,
        )
        self.engine = Info(
            "radfinder_engine",
            "The inference engine: runtime, device and model bundle (loaded=false: configured, "
            "not yet loaded in this process)",
            registry=r,
        )
        self._lock = threading.Lock()
        # Label values known in advance start at 0, so a rate() has a series before the
        # first event and a dashboard shows zero instead of "no data".
        for outcome in ("done", "failed", "retry", "skipped"):
            self.jobs_finished.labels(outcome)
        for stage in JOB_STAGES:
            self.job_stage_seconds.labels(stage)
        for ack in ("AA", "AE", "AR"):
            self.hl7_messages.labels(ack)
        for state in PairState:
            self.snippets_mined.labels(state.value)

    # -- recording helpers: the call sites stay one line each ------------------------------

    def instance_stored(self, size_bytes: int) -> None:
        self.instances_received.inc()
        self.instance_bytes.inc(max(0, size_bytes))

    def job_finished(self, outcome: str, timings: Mapping[str, float]) -> None:
        """One attempt ended; its stage times go to the histogram (a retried attempt's too:
        its time was spent)."""
        self.jobs_finished.labels(outcome).inc()
        for stage, seconds in timings.items():
            self.observe_stage(stage, seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.job_stage_seconds.labels(stage).observe(max(0.0, float(seconds)))

    def send_result(self, destination: str, ok: bool, final: bool) -> None:
        if ok:
            self.objects_sent.inc()
        else:
            self.send_failures.labels(destination, "failed" if final else "retry").inc()

    def hl7_answered(self, ack: str | None) -> None:
        self.hl7_messages.labels(ack or "none").inc()

    def report_mined(self, pair_states: Iterable[str]) -> None:
        self.reports_mined.inc()
        for state in pair_states:
            self.snippets_mined.labels(state).inc()

    def set_engine(
        self, engine: str, device: str, bundle: str, bundle_version: str, *, loaded: bool
    ) -> None:
        """Replace the engine labels; a configured engine never overwrites a loaded one."""
        with self._lock:
            current = _info_value(self.engine)
            if not loaded and current.get("loaded") == "true":
                return
            self.engine.info(
                {
                    "engine": engine,
                    "device": device,
                    "bundle": bundle,
                    "bundle_version": bundle_version,
                    "loaded": "true" if loaded else "false",
                }
            )

    def engine_labels(self) -> dict[str, str]:
        return _info_value(self.engine)

    # -- database state --------------------------------------------------------------------

    def watch_database(self, db: Database) -> None:
        """Report the database's states at every scrape (call once per node)."""
        self.registry.register(DatabaseCollector(db))

    def exposition(self) -> bytes:
        """The text exposition format of everything in this registry."""
        return generate_latest(self.registry)


def _info_value(info: Info) -> dict[str, str]:
    for family in info.collect():
        for sample in family.samples:
            return dict(sample.labels)
    return {}


class DatabaseCollector:
    """Gauges read from the database when scraped; a failing database is reported as
    ``radfinder_database_up 0`` rather than failing the whole scrape."""

    def __init__(self, db: Database, clock: Callable[[], datetime] = utcnow) -> None:
        self.db = db
        self.clock = clock

    def describe(self) -> list[Metric]:
        # Registering must not query the database; the names do not clash with the counters.
        return []

    def collect(self) -> Iterable[Metric]:
        t0 = time.perf_counter()
        try:
            families = self._query()
        except Exception as exc:
            log.warning("metrics: database not readable", extra={"fields": {"error": str(exc)}})
            families = []
            up = 0.0
        else:
            up = 1.0
        yield _gauge("radfinder_database_up", "1 when the database answered this scrape", up)
        yield _gauge(
            "radfinder_database_scrape_seconds",
            "Seconds the state queries of this scrape took",
            time.perf_counter() - t0,
        )
        yield from families

    def _query(self) -> list[Metric]:
        now = as_utc(self.clock())
        with self.db.transaction() as session:
            series = _by_state(session, Series.state)
            jobs = _by_state(session, Job.state)
            outbox = _by_state(session, OutboundObject.state)
            reports = _by_state(session, Report.state, Report.superseded_by_id.is_(None))
            pairs = _by_state(session, SnippetSlicePair.state)
            quarantined = dict(
                session.execute(
                    select(QuarantinedObject.kind, func.count()).group_by(QuarantinedObject.kind)
                ).all()
            )
            oldest_pending = session.scalar(
                select(func.min(OutboundObject.created_at)).where(
                    OutboundObject.state == OutboundState.PENDING
                )
            )
            oldest_queued = session.scalar(
                select(func.min(Job.queued_at)).where(Job.state == JobState.QUEUED)
            )
        out: list[Metric] = [
            _labelled("radfinder_series", "Series by state", "state", series, SeriesState),
            _labelled("radfinder_jobs", "Inference jobs by state", "state", jobs, JobState),
            _gauge(
                "radfinder_queue_depth",
                "Jobs waiting for a worker (state queued)",
                jobs.get(JobState.QUEUED.value, 0),
            ),
            _gauge(
                "radfinder_queue_oldest_seconds",
                "Age of the oldest queued job (0 when none)",
                _age(now, oldest_queued),
            ),
            _labelled(
                "radfinder_outbox_objects",
                "Outbound objects by state",
                "state",
                outbox,
                OutboundState,
            ),
            _gauge(
                "radfinder_outbox_backlog",
                "Outbound objects not yet confirmed by their destination (state pending)",
                outbox.get(OutboundState.PENDING.value, 0),
            ),
            _gauge(
                "radfinder_outbox_oldest_pending_seconds",
                "Age of the oldest pending outbound object (0 when none)",
                _age(now, oldest_pending),
            ),
            _labelled(
                "radfinder_reports",
                "Current (not superseded) reports by state",
                "state",
                reports,
                ReportState,
            ),
            _labelled(
                "radfinder_snippet_pairs",
                "Snippet-slice pairs by state",
                "state",
                pairs,
                PairState,
            ),
        ]
        q = GaugeMetricFamily(
            "radfinder_quarantined_objects", "Quarantined objects by kind", labels=["kind"]
        )
        for kind in sorted({"dicom", "hl7", *quarantined}):
            q.add_metric([str(kind)], float(quarantined.get(kind, 0)))
        out.append(q)
        return out


def _by_state(session: Any, column: Any, *where: Any) -> dict[str, int]:
    query = select(column, func.count()).group_by(column)
    for clause in where:
        query = query.where(clause)
    return {str(getattr(k, "value", k)): int(n) for k, n in session.execute(query).all()}


def _labelled(
    name: str, doc: str, label: str, counts: Mapping[str, int], states: Iterable[Any]
) -> GaugeMetricFamily:
    """One sample per state, zeros included: a missing series reads as "no data", not 0."""
    family = GaugeMetricFamily(name, doc, labels=[label])
    for state in states:
        family.add_metric([str(state.value)], float(counts.get(str(state.value), 0)))
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _age(now: datetime, then: datetime | None) -> float:
    if then is None:
        return 0.0
    return max(0.0, (now - as_utc(then)).total_seconds())


_process: NodeMetrics | None = None
_process_lock = threading.Lock()


def process_metrics() -> NodeMetrics:
    """The metrics of a process that is not a node (a standalone worker): one per process."""
    global _process
    with _process_lock:
        if _process is None:
            _process = NodeMetrics()
        return _process
