"""The node process: database, DICOM listener and completion loop, started and stopped together."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from dicom_io.scp import StorageSCP
from dicom_io.spool import Quarantine, Spool
from radfinder_node.completion import CompletionMonitor
from radfinder_node.config import Settings
from radfinder_node.database import Database
from radfinder_node.ingest import IngestRecorder
from radfinder_node.recovery import reindex_spool

log = logging.getLogger("radfinder_node.node")


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.effective_database_url)
        self.spool = Spool(settings.spool_dir, fsync=settings.fsync)
        self.quarantine = Quarantine(settings.quarantine_dir, fsync=settings.fsync)
        self.recorder = IngestRecorder(self.db)
        self.scp = StorageSCP(
            self.spool,
            self.quarantine,
            self.recorder,
            ae_title=settings.ae_title,
            allowed_calling_aes=settings.allowed_calling_aes,
            maximum_pdu_size=settings.max_pdu,
        )
        self.completion = CompletionMonitor(
            self.db,
            quiet_period_s=settings.quiet_period_s,
            selection=settings.selection,
            in_flight=self.scp.series_in_flight,
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.port: int | None = None

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
        self.port = self.scp.start(self.settings.host, self.settings.port)
        loop = threading.Thread(
            target=self.completion.run,
            args=(self._stop, self.settings.completion_poll_s),
            name="completion",
            daemon=True,
        )
        loop.start()
        self._threads.append(loop)
        log.info(
            "node started",
            extra={
                "fields": {
                    "ae_title": self.settings.ae_title,
                    "host": self.settings.host,
                    "port": self.port,
                    "data_dir": str(self.settings.data_dir.resolve()),
                    "database": self.db.engine.url.render_as_string(hide_password=True),
                    "fsync": self.settings.fsync,
                }
            },
        )

    def stop(self) -> None:
        self._stop.set()
        self.scp.stop()
        for thread in self._threads:
            thread.join(timeout=10)
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
