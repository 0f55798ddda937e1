"""Retention: the node deletes what it no longer needs, and nothing it still might.

A node beside a PACS is a cache, not an archive: the PACS keeps the images and, once it
confirmed them, our SR and KOS. Left alone the spool grows by a few hundred MB per chest CT, so
three kinds of file are deleted once they are old enough (ages in days, 0 = keep forever):

* **spool** (``retention_spool_days``, counted from the study's last received instance): a
  study's instances, only once every series of the study is decided, every selected series has
  a job, every job is done, every result of the study is sent, and every report linked to it
  is mined (mining reads spool headers). A failed job keeps its study, so an operator can
  re-run it; so does anything still moving.
* **results** (``retention_results_days``, counted from the last confirmation): an SR or KOS
  file once every destination confirmed it. Results never sent anywhere are the only copy and
  are kept.
* **quarantine** (``retention_quarantine_days``, by file age): rejected input with its sidecar.

Rows stay: the database is the history of what was received, decided, run and sent; only the
files go. A file is deleted only when its own modification time is older than the cut-off too,
so an instance re-sent by the PACS a moment ago (same path) is never taken with its study, and
a study re-sent after its files were deleted is stored again as usual.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import case, exists, func, select

from dicom_io.uids import is_valid_uid
from radfinder_node.config import Settings
from radfinder_node.database import Database
from radfinder_node.job_models import Job, JobState, OutboundObject, OutboundState
from radfinder_node.models import Series, SeriesState, Study
from radfinder_node.report_models import Report, ReportState
from radfinder_node.timeutil import utcnow

log = logging.getLogger("radfinder_node.retention")


@dataclass(frozen=True)
class RetentionPolicy:
    """Ages in days; 0 keeps that kind of file forever."""

    spool_days: float
    results_days: float
    quarantine_days: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        return cls(
            spool_days=settings.retention_spool_days,
            results_days=settings.retention_results_days,
            quarantine_days=settings.retention_quarantine_days,
        )


@dataclass
class CleanupReport:
    """What one pass deleted (or, with ``dry_run``, would delete)."""

    dry_run: bool
    spool_studies: list[str] = field(default_factory=list)
    spool_files: int = 0
    spool_bytes: int = 0
    results_files: int = 0
    results_bytes: int = 0
    quarantine_files: int = 0
    quarantine_bytes: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def files(self) -> int:
        return self.spool_files + self.results_files + self.quarantine_files

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cutoff(now: datetime, days: float) -> datetime | None:
    return None if days <= 0 else now - timedelta(days=days)


def purgeable_studies(db: Database, cutoff: datetime) -> list[str]:
    """Study UIDs whose spool may go: quiet since ``cutoff`` and with nothing left to do."""
    of_study = Series.study_id == Study.id
    undecided = exists().where(
        of_study, Series.state.in_([SeriesState.RECEIVING, SeriesState.COMPLETE])
    )
    recent = exists().where(of_study, Series.last_received_at >= cutoff)
    selected_without_job = exists().where(
        of_study,
        Series.state == SeriesState.SELECTED,
        ~exists().where(Job.series_id == Series.id),
    )
    open_job = exists().where(of_study, Job.series_id == Series.id, Job.state != JobState.DONE)
    unsent = exists().where(
        OutboundObject.study_uid == Study.study_uid, OutboundObject.state != OutboundState.SENT
    )
    unmined = exists().where(
        Report.study_id == Study.id,
        Report.state == ReportState.LINKED,
        Report.superseded_by_id.is_(None),
        Report.mined_at.is_(None),
    )
    with db.transaction() as session:
        uids = session.scalars(
            select(Study.study_uid)
            .where(
                exists().where(of_study),
                ~undecided,
                ~recent,
                ~selected_without_job,
                ~open_job,
                ~unsent,
                ~unmined,
            )
            .order_by(Study.id)
        ).all()
    return [str(u) for u in uids]


def confirmed_results(db: Database, cutoff: datetime) -> list[str]:
    """Result paths (relative to the results directory) every destination confirmed before
    ``cutoff``."""
    not_sent = func.sum(case((OutboundObject.state != OutboundState.SENT, 1), else_=0))
    with db.transaction() as session:
        paths = session.scalars(
            select(OutboundObject.path)
            .group_by(OutboundObject.path)
            .having(not_sent == 0, func.max(OutboundObject.sent_at) < cutoff)
            .order_by(OutboundObject.path)
        ).all()
    return [str(p) for p in paths]


def _old_files(root: Path, cutoff: datetime) -> Iterator[tuple[Path, int]]:
    """Files under ``root`` (recursively) last modified before ``cutoff``, with their sizes."""
    limit = cutoff.timestamp()
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if st.st_mtime < limit:
                yield path, st.st_size


def _prune_empty_dirs(root: Path, *, keep_root: bool) -> None:
    """Remove empty directories under ``root`` (bottom up), and ``root`` itself unless kept."""
    if not root.is_dir():
        return
    for dirpath, _dirs, _names in os.walk(root, topdown=False):
        if keep_root and Path(dirpath) == root:
            continue
        with contextlib.suppress(OSError):  # not empty (or gone already): keep it
            os.rmdir(dirpath)


class Retention:
    """One cleanup pass (``run_once``) or a loop of them (``run``), for one node."""

    def __init__(
        self,
        db: Database,
        *,
        spool_dir: Path,
        results_dir: Path,
        quarantine_dir: Path,
        policy: RetentionPolicy,
    ) -> None:
        self.db = db
        self.spool_dir = spool_dir
        self.results_dir = results_dir
        self.quarantine_dir = quarantine_dir
        self.policy = policy

    @classmethod
    def from_settings(cls, db: Database, settings: Settings) -> Retention:
        return cls(
            db,
            spool_dir=settings.spool_dir,
            results_dir=settings.results_dir,
            quarantine_dir=settings.quarantine_dir,
            policy=RetentionPolicy.from_settings(settings),
        )

    def run_once(self, *, now: datetime | None = None, dry_run: bool = False) -> CleanupReport:
        now = now or utcnow()
        report = CleanupReport(dry_run=dry_run)
        cutoff = _cutoff(now, self.policy.spool_days)
        if cutoff is not None:
            self._spool(cutoff, report)
        cutoff = _cutoff(now, self.policy.results_days)
        if cutoff is not None:
            self._results(cutoff, report)
        cutoff = _cutoff(now, self.policy.quarantine_days)
        if cutoff is not None and self.quarantine_dir.is_dir():
            n, size = self._delete(_old_files(self.quarantine_dir, cutoff), report)
            report.quarantine_files += n
            report.quarantine_bytes += size
            if not dry_run:
                _prune_empty_dirs(self.quarantine_dir, keep_root=True)
        if report.files or report.errors:
            log.info(
                "retention pass" + (" (dry run)" if dry_run else ""),
                extra={
                    "fields": {
                        k: v for k, v in report.as_dict().items() if k != "spool_studies"
                    }
                    | {"studies": len(report.spool_studies)}
                },
            )
        return report

    def _spool(self, cutoff: datetime, report: CleanupReport) -> None:
        for study_uid in purgeable_studies(self.db, cutoff):
            if not is_valid_uid(study_uid):  # it becomes a path: never follow anything else
                report.errors.append(f"study UID not usable as a path: {study_uid!r}")
                continue
            study_dir = self.spool_dir / study_uid
            if not study_dir.is_dir():
                continue  # purged already
            n, size = self._delete(_old_files(study_dir, cutoff), report)
            if not report.dry_run:
                _prune_empty_dirs(study_dir, keep_root=False)
            if n:
                report.spool_studies.append(study_uid)
                report.spool_files += n
                report.spool_bytes += size
                log.info(
                    "study spool purged" + (" (dry run)" if report.dry_run else ""),
                    extra={"fields": {"study_uid": study_uid, "files": n, "bytes": size}},
                )

    def _results(self, cutoff: datetime, report: CleanupReport) -> None:
        root = self.results_dir.resolve()
        candidates: list[tuple[Path, int]] = []
        for rel in confirmed_results(self.db, cutoff):
            path = (self.results_dir / rel).resolve()
            if not path.is_relative_to(root):
                report.errors.append(f"result path outside the results directory: {rel!r}")
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # deleted by an earlier pass
            if st.st_mtime < cutoff.timestamp():
                candidates.append((path, st.st_size))
        n, size = self._delete(iter(candidates), report)
        report.results_files += n
        report.results_bytes += size
        if not report.dry_run and n:
            for path, _ in candidates:
                _prune_parents(path.parent, root)

    @staticmethod
    def _delete(files: Iterator[tuple[Path, int]], report: CleanupReport) -> tuple[int, int]:
        count = total = 0
        for path, size in files:
            if not report.dry_run:
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    report.errors.append(f"{path}: {exc}")
                    fields = {"path": str(path), "error": str(exc)}
                    log.error("cannot delete", extra={"fields": fields})
                    continue
            count += 1
            total += size
        return count, total

    def run(self, stop: threading.Event, interval_s: float) -> None:
        """Loop until ``stop`` is set; errors are logged and the loop goes on."""
        while not stop.wait(interval_s):
            try:
                self.run_once()
            except Exception:
                log.exception("retention pass failed")


def _prune_parents(directory: Path, root: Path) -> None:
    """Remove ``directory`` and its parents up to (not including) ``root`` while empty."""
    while directory != root and directory.is_relative_to(root):
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent
