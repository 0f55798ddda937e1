"""Re-indexing the spool after an unclean stop.

An instance is acknowledged after its file is fsynced and its row committed; with SQLite in
WAL/NORMAL mode a power loss can still take the last commits with it. The spool file is the
durable record, so at start-up after an unclean stop the node lists the series directories
touched since shortly before its newest row and files every instance that has no row. A clean
stop leaves no marker and skips this.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select

from dicom_io.scp import instance_from_spool
from dicom_io.spool import Spool
from radfinder_node.database import Database
from radfinder_node.ingest import IngestRecorder
from radfinder_node.models import Instance
from radfinder_node.timeutil import as_utc

log = logging.getLogger("radfinder_node.recovery")

# Commits older than this before the newest surviving row are assumed durable.
MARGIN = timedelta(minutes=10)


def reindex_spool(db: Database, spool: Spool, recorder: IngestRecorder) -> int:
    """File every spooled instance without a row; returns how many were added."""
    with db.transaction() as session:
        newest = session.scalar(select(func.max(Instance.received_at)))
    since = (as_utc(newest) - MARGIN).timestamp() if newest is not None else 0.0
    added = 0
    for series_dir in _series_dirs(spool.root, since):
        files = {p.name.removesuffix(".dcm"): p for p in series_dir.glob("*.dcm")}
        if not files:
            continue
        with db.transaction() as session:
            known = set(
                session.scalars(select(Instance.sop_uid).where(Instance.sop_uid.in_(files)))
            )
        for sop_uid in sorted(files.keys() - known):
            try:
                recorder.instance_stored(instance_from_spool(spool, files[sop_uid]))
                added += 1
            except (OSError, ValueError) as exc:
                log.error(
                    "cannot re-index spooled file",
                    extra={"fields": {"path": str(files[sop_uid]), "error": str(exc)}},
                )
    log.info("spool re-indexed", extra={"fields": {"added": added}})
    return added


def _series_dirs(root: Path, since: float) -> list[Path]:
    out: list[Path] = []
    with os.scandir(root) as studies:
        for study in studies:
            if study.name.startswith(".") or not study.is_dir():
                continue
            with os.scandir(study.path) as series:
                out += [Path(s.path) for s in series if s.is_dir() and s.stat().st_mtime >= since]
    return out
