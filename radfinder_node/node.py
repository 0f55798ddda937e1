"""The node process: database, DICOM listener and completion loop, started and stopped together."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from dicom_io.scp import StorageSCP
from dicom_io.spool import Quarantine, Spool
from radfinder_node.celery_app import EmbeddedWorker, create_app
from radfinder_node.completion import CompletionMonitor
from radfinder_node.config import Settings
from radfinder_node.database import Database
from radfinder_node.export_schedule import start_embedded_beat
from radfinder_node.hl7_listener import HL7Listener, ReportReceiver
from radfinder_node.ingest import IngestRecorder
from radfinder_node.jobs import BundleMissingError, BundleRef, JobSubmitter, read_bundle_ref
from radfinder_node.linking import ReportLinker
from radfinder_node.metrics import NodeMetrics
from radfinder_node.outbox import OutboxSender, RetryPolicy
from radfinder_node.reconciler import Reconciler
from radfinder_node.recovery import reindex_spool
from radfinder_node.retention import Retention
from radfinder_node.security import security_from_settings
from radfinder_node.tasks import context_of

if TYPE_CHECKING:
    from radfinder_node.web import WebServer

log = logging.getLogger("radfinder_node.node")


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.effective_database_url)
        self.spool = Spool(settings.spool_dir, fsync=settings.fsync)
        self.quarantine = Quarantine(settings.quarantine_dir, fsync=settings.fsync)
        self.metrics = NodeMetrics()  # this node's registry: several nodes share a process
        self.metrics.watch_database(self.db)
        self.recorder = IngestRecorder(self.db, self.metrics)
        self.security = security_from_settings(settings)  # bad TLS files fail here, at start-up
        self.scp = StorageSCP(
            self.spool,
            self.quarantine,
            self.recorder,
            ae_title=settings.ae_title,
            maximum_pdu_size=settings.max_pdu,
            admission=self.security.allow_list if self.security.allow_list else None,
            max_associations_per_peer=self.security.max_associations_per_peer,
            max_instance_bytes=self.security.max_instance_bytes,
        )
        self.linker = ReportLinker(self.db, settings.spool_dir, self.metrics)
        # Inference: jobs need the bundle's name and version; without a bundle the node still
        # receives and selects, and the reconciler creates the jobs once one is installed.
        self.bundle_ref: BundleRef | None = None
        try:
            self.bundle_ref = read_bundle_ref(settings.bundle_path)
        except BundleMissingError as exc:
            log.error("inference disabled", extra={"fields": {"reason": str(exc)}})
        else:
            self.metrics.set_engine(
                settings.engine_runtime,
                settings.engine_device,
                self.bundle_ref.name,
                self.bundle_ref.version,
                loaded=False,
            )
        self.celery = create_app(settings, self.db)
        self.submitter = (
            # the path, not the ref: an upgraded bundle is picked up by the next job
            JobSubmitter(self.db, self.celery, settings.bundle_path, settings.destinations)
            if self.bundle_ref is not None
            else None
        )
        self.reconciler = Reconciler(
            self.db,
            self.celery,
            job_timeout_s=settings.job_timeout_s,
            queued_stale_s=settings.job_queued_stale_s,
            max_attempts=settings.job_max_attempts,
            submitter=self.submitter,
        )
        self.retention = Retention.from_settings(self.db, settings)  # old files, periodically
        self.outbox = OutboxSender(
            self.db,
            settings.results_dir,
            calling_ae=settings.ae_title,
            timeout_s=settings.send_timeout_s,
            dimse_timeout_s=settings.send_dimse_timeout_s,
            policy=RetryPolicy(
                settings.send_max_attempts, settings.send_backoff_s, settings.send_backoff_max_s
            ),
            metrics=self.metrics,
            tls=self.security.outgoing_tls,
        )
        context_of(self.celery).on_done = self.outbox.wake  # results go out at once
        context_of(self.celery).metrics = self.metrics
        self.worker: EmbeddedWorker | None = None
        self.beat: Any | None = None  # the nightly export's scheduler (embedded mode)
        self.completion = CompletionMonitor(
            self.db,
            quiet_period_s=settings.quiet_period_s,
            selection=settings.selection,
            in_flight=self.scp.series_in_flight,
            on_selected=self._on_selected,
            on_study_decided=self.linker.wake,
        )
        self.hl7 = HL7Listener(
            ReportReceiver(
                self.db,
                self.quarantine,
                accession_field=settings.hl7_accession_field,
                on_stored=self.linker.wake,
                application=settings.ae_title,
                durable=settings.fsync,
                metrics=self.metrics,
            ),
            max_message_bytes=settings.hl7_max_message_bytes,
            idle_timeout_s=settings.hl7_idle_timeout_s,
        )
        self.hl7_port: int | None = None
        self.web: WebServer | None = None
        self.http_port: int | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.port: int | None = None

    def _on_selected(self, series_uid: str) -> None:
        if self.submitter is None:
            return
        try:
            self.submitter(series_uid)
        except Exception:  # the reconciler creates it later; the next series must not wait
            log.exception("cannot create job", extra={"fields": {"series_uid": series_uid}})

    def _start_inference(self) -> None:
        """Embedded worker (when configured), reconciler and outbox sender."""
        if self.settings.embedded_worker and self.bundle_ref is not None:
            host = socket.gethostname()
            name = f"embedded-{os.getpid()}@{host}"
            self.reconciler.recover_dead_workers(host, alive=name)
            self.worker = EmbeddedWorker(self.celery, queue=self.settings.queue, hostname=name)
            if not self.worker.start():
                log.error("embedded worker did not start", extra={"fields": {"worker": name}})
        if self.settings.embedded_worker:
            self.beat = start_embedded_beat(self.celery, self.settings)
        for name, target, period in (
            ("reconciler", self.reconciler.run, self.settings.reconcile_interval_s),
            ("outbox", self.outbox.run, self.settings.outbox_poll_s),
            ("retention", self.retention.run, self.settings.retention_interval_s),
        ):
            thread = threading.Thread(
                target=target, args=(self._stop, period), name=name, daemon=True
            )
            thread.start()
            self._threads.append(thread)

    @property
    def _running_marker(self) -> Path:
        return self.settings.data_dir / "node.running"

    def start(self) -> None:
        swept = self.spool.sweep_temporary()
        if swept:
            log.warning("removed unacknowledged temp files", extra={"fields": {"count": swept}})
        if self._running_marker.exists():
            log.warning("previous run did not stop cleanly; re-indexing the spool")
            reindex_spool(self.db, self.spool, self.recorder)
        self._running_marker.write_text(str(os.getpid()))
        self.port = self.scp.start(
            self.settings.host, self.settings.port, ssl_context=self.security.dicom_tls
        )
        loop = threading.Thread(
            target=self.completion.run,
            args=(self._stop, self.settings.completion_poll_s),
            name="completion",
            daemon=True,
        )
        loop.start()
        self._threads.append(loop)
        self._start_inference()
        reports = threading.Thread(
            target=self.linker.run,
            args=(self._stop, self.settings.completion_poll_s),
            name="reports",
            daemon=True,
        )
        reports.start()
        self._threads.append(reports)
        if self.settings.hl7_enabled:
            self.hl7_port = self.hl7.start(
                self.settings.effective_hl7_host,
                self.settings.hl7_port,
                ssl_context=self.security.hl7_tls,
            )
        if self.settings.http_enabled:
            self._start_http()
        log.info(
            "node started",
            extra={
                "fields": {
                    "ae_title": self.settings.ae_title,
                    "host": self.settings.host,
                    "port": self.port,
                    "hl7_port": self.hl7_port,
                    "http_port": self.http_port,
                    "security": self.security.describe(),
                    "data_dir": str(self.settings.data_dir.resolve()),
                    "database": self.db.engine.url.render_as_string(hide_password=True),
                    "fsync": self.settings.fsync,
                    "bundle": None if self.bundle_ref is None else vars(self.bundle_ref),
                    "worker": None if self.worker is None else self.worker.hostname,
                    "destinations": self.settings.destinations,
                }
            },
        )

    def _start_http(self) -> None:
        """Health, metrics and the status page. A port already taken is logged, not fatal:
        images and reports must keep flowing when only the dashboard cannot open."""
        from radfinder_node.web import WebServer, node_web_app

        web = WebServer(node_web_app(self))
        try:
            self.http_port = web.start(self.settings.http_host, self.settings.http_port)
        except OSError as exc:
            log.error(
                "http server not started",
                extra={"fields": {"host": self.settings.http_host,
                                  "port": self.settings.http_port, "error": str(exc)}},
            )
            return
        self.web = web

    def stop(self) -> None:
        self._stop.set()
        if self.web is not None:
            self.web.stop()
        if self.beat is not None:
            self.beat.service.stop()  # joined below: it sleeps up to 1 s between ticks
        self.hl7.stop()
        self.linker.wake()
        self.scp.stop()
        if self.worker is not None:
            self.worker.stop()
        self.celery.close()
        for thread in self._threads:
            thread.join(timeout=10)
        if self.beat is not None:
            self.beat.join(timeout=10)
        self.db.dispose()
        self._running_marker.unlink(missing_ok=True)
        log.info("node stopped")

    def serve_forever(self) -> None:
        """Run until SIGINT or SIGTERM."""
        done = threading.Event()

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("signal received", extra={"fields": {"signal": signal.Signals(signum).name}})
            done.set()

        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
        self.start()
        try:
            while not done.wait(1.0):
                pass
        finally:
            self.stop()
