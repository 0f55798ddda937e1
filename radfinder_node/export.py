"""The retraining export: linked reports, their volumes and snippet-slice pairs as a manifest.

Every night (and on ``radfinder-node export``) the reports that were mined since the last
export to a destination are written as training data in the manifest schema of
``engines.manifest`` (version 1), so ``radfinder-node train --data DIR/manifest-....jsonl``
trains on them:

- one row per current report (linked, not superseded, with text), with the volume of its
  study's primary series (the series the node selected for inference, else the axial series
  with most slices: :func:`radfinder_node.resolve.primary_series`, the series a citation
  without a series number means);
- the volume as NIfTI in patient space (``engines.data.ctrate.write_volume``: int16 stored
  values, rescale 1/-1024 in the row, qform = sform = the scanner's RAS geometry) and the
  row's ``affine`` and ``spacing`` from the DICOM geometry (``dicom_io.volume``);
- labels unknown (-1): a report says what it says, the labels come from a labeller later;
- a snippet per resolved pair whose slice lies in that volume: the clause, its z in mm (LPS)
  and the cited slice's SOP Instance UID.

De-identification (:mod:`radfinder_node.deid`) is on unless switched off: pseudonymous UIDs
and patient folder, report text scrubbed, dates shifted per patient.

Layout of a destination ``DIR``: ``volumes/<patient>/<series>.nii.gz`` and one
``manifest-<time>-<hash>.jsonl`` per export that found something new, every path relative to
``DIR``, so the manifests of one destination can be concatenated into one training set.

Incremental: the watermark is the set of reports each destination has received (table
``exported_reports``, one row per destination and report, with the ``mined_at`` it was
exported at), not a timestamp; a report mined while an export runs, whose ``mined_at`` is
older than rows already exported, is picked up by the next export instead of being skipped
forever. ``--since last`` exports what the destination does not have; ``--since DATE`` every
report mined at or after DATE (UTC), whether exported before or not. A report that cannot be
exported (its series does not assemble, no series) is recorded ``skipped`` with the reason and
logged, and not retried by ``last``. The manifest's name is a hash of the reports it holds, so
an export repeated after a crash between writing the manifest and committing the watermark
rewrites the same file instead of adding a duplicate; a lock file keeps two exports out of
one destination at a time.

A report corrected after its export stays in the earlier manifest; the correction comes in a
later one with the same ``volume_id``, so a reader that keeps the last row per volume across a
destination's manifests (in name order) reads the current text.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, Final

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import DateTime, Enum, ForeignKey, String, Text, exists, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from dicom_io.geometry import VolumeError
from dicom_io.spool import atomic_write
from dicom_io.volume import load_volume
from radfinder_node.config import Settings
from radfinder_node.database import Database
from radfinder_node.deid import (
    DICOM_KEYWORDS,
    Identifiers,
    Pseudonymizer,
    identifiers_from_dicom,
    identifiers_from_hl7,
    load_secret,
    scrub_text,
)
from radfinder_node.models import Base, Instance
from radfinder_node.report_models import PairState, Report, ReportState, SnippetSlicePair
from radfinder_node.resolve import SeriesRow, primary_series, series_rows
from radfinder_node.timeutil import as_utc, utcnow
from reports.hl7_parse import HL7Error, parse_message
from reports.manifest_writer import ManifestEntry, SnippetEntry, manifest_text

__all__ = [
    "ExportBusyError",
    "ExportResult",
    "ExportedReport",
    "export",
    "export_from_settings",
    "parse_since",
]

log = logging.getLogger("radfinder_node.export")

VOLUME_FORMAT: Final = "ctrate-nifti"
# What engines.data.ctrate.write_volume stores: HU + 1024 as int16.
RESCALE: Final = (1.0, -1024.0)
LOCK_FILE: Final = ".export.lock"
SOURCE: Final = "node"


class ExportedReport(Base):
    """The watermark: which report a destination has (or skipped, and why)."""

    __tablename__ = "exported_reports"

    destination: Mapped[str] = mapped_column(String(1024), primary_key=True)
    report_id: Mapped[int] = mapped_column(
        ForeignKey("reports.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    mined_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    state: Mapped[str] = mapped_column(Enum("exported", "skipped", name="export_state"))
    reason: Mapped[str | None] = mapped_column(Text)
    manifest: Mapped[str | None] = mapped_column(String(255))
    exported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ExportBusyError(RuntimeError):
    """Another export is writing to the same destination."""


@dataclass
class ExportResult:
    """What one export did (JSON-able through :meth:`summary`)."""

    destination: Path
    deid: bool
    manifest: Path | None = None
    rows: int = 0
    snippets: int = 0
    volumes_written: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "destination": str(self.destination),
            "manifest": None if self.manifest is None else str(self.manifest),
            "rows": self.rows,
            "snippets": self.snippets,
            "volumes_written": self.volumes_written,
            "skipped": self.skipped,
            "deid": self.deid,
        }


def parse_since(text: str) -> datetime | None:
    """``last`` -> None (what the destination does not have yet); a date or ISO datetime ->
    that instant in UTC (naive values are UTC)."""
    value = text.strip()
    if value.lower() == "last":
        return None
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            return datetime.combine(date.fromisoformat(value), time(), tzinfo=UTC)
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"--since takes 'last', a date (2026-01-31) or an ISO time: {text!r}"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


# ---------------------------------------------------------------------------------------------
# Reading what to export


@dataclass(frozen=True)
class _Pair:
    snippet: str
    z_mm: float
    sop_uid: str | None
    series_uid: str | None


@dataclass(frozen=True)
class _ReportData:
    """One report and everything its row needs, read in one short transaction."""

    report_id: int
    mined_at: datetime
    text: str
    raw: bytes
    db_ids: frozenset[str]
    db_uids: frozenset[str]
    patient_id: str | None
    pairs: tuple[_Pair, ...]
    series: SeriesRow | None
    paths: tuple[str, ...]


def _pending(session: Session, destination: str, since: datetime | None) -> list[int]:
    """Ids of the reports to export, oldest mined first."""
    query = select(Report.id).where(
        Report.state == ReportState.LINKED,
        Report.superseded_by_id.is_(None),
        Report.mined_at.is_not(None),
        Report.study_id.is_not(None),
        Report.text.is_not(None),
        Report.text != "",
    )
    if since is None:
        have = exists().where(
            ExportedReport.destination == destination,
            ExportedReport.report_id == Report.id,
            ExportedReport.mined_at == Report.mined_at,
        )
        query = query.where(~have)
    else:
        query = query.where(Report.mined_at >= since)
    return [int(i) for i in session.scalars(query.order_by(Report.mined_at, Report.id))]


def _read_report(session: Session, report_id: int) -> _ReportData | None:
    report = session.get(Report, report_id)
    if report is None or report.study_id is None or report.mined_at is None:
        return None
    study = report.study
    pairs = session.scalars(
        select(SnippetSlicePair)
        .where(
            SnippetSlicePair.report_id == report_id,
            SnippetSlicePair.state == PairState.RESOLVED,
            SnippetSlicePair.z_mm.is_not(None),
        )
        .order_by(SnippetSlicePair.start)
    ).all()
    series = primary_series(series_rows(session, report.study_id))
    paths: Sequence[str] = ()
    if series is not None:
        paths = session.scalars(
            select(Instance.path).where(Instance.series_id == series.id).order_by(Instance.id)
        ).all()
    ids = {
        report.accession_number,
        report.filler_order_number,
        report.placer_field1,
        report.patient_id,
        study.patient_id if study else None,
        study.accession_number if study else None,
    }
    uids = {report.study_uid, *report.study_uids, study.study_uid if study else None}
    return _ReportData(
        report_id=report.id,
        mined_at=as_utc(report.mined_at),
        text=report.text or "",
        raw=report.raw,
        db_ids=frozenset(v for v in ids if v),
        db_uids=frozenset(v for v in uids if v),
        patient_id=(study.patient_id if study else None) or report.patient_id,
        pairs=tuple(
            _Pair(p.snippet, float(p.z_mm), p.sop_uid, p.series_uid)
            for p in pairs
            if p.z_mm is not None
        ),
        series=series,
        paths=tuple(paths),
    )


def _header_values(path: Path) -> dict[str, list[str]]:
    """The identifying attributes of one instance (header only), as lists of strings."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(DICOM_KEYWORDS))
    out: dict[str, list[str]] = {}
    for keyword in DICOM_KEYWORDS:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        items = list(value) if isinstance(value, pydicom.multival.MultiValue) else [value]
        out[keyword] = [str(v) for v in items if str(v).strip()]
    return out


def _hl7_identifiers(raw: bytes) -> Identifiers:
    try:
        return identifiers_from_hl7(parse_message(raw))
    except HL7Error:  # stored reports were parsed once; a parser change must not stop exports
        log.warning("stored HL7 message no longer parses; using database fields only")
        return Identifiers()


# ---------------------------------------------------------------------------------------------
# Writing volumes


@dataclass(frozen=True)
class _Volume:
    """A series written (or found written) under the destination."""

    series_uid: str
    volume_id: str
    rel_path: str
    spacing: tuple[float, float, float]
    affine: tuple[tuple[float, float, float, float], ...]
    z_range: tuple[float, float]
    sop_uids: frozenset[str]
    identifiers: Identifiers
    patient_key: str | None


def _write_nifti(path: Path, hu: np.ndarray[Any, Any], affine: np.ndarray[Any, Any]) -> None:
    """Temp file, fsync, rename: a crash never leaves a half-written volume under its name."""
    from engines.data.ctrate import write_volume  # nibabel + numpy; no torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name.removesuffix('.nii.gz')}.{os.getpid()}.tmp.nii.gz")
    try:
        write_volume(tmp, hu, affine)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Writer:
    """Turns reports into manifest entries, writing each series' volume once."""

    def __init__(
        self, destination: Path, spool_dir: Path, pseudonymizer: Pseudonymizer | None
    ) -> None:
        self.destination = destination
        self.spool_dir = spool_dir
        self.pz = pseudonymizer
        self.volumes: dict[str, _Volume | str] = {}
        self.written = 0

    def volume(self, data: _ReportData) -> _Volume | str:
        """The report's volume, or why there is none."""
        if data.series is None:
            return "the study has no axial series to export"
        if not data.paths:
            return f"series {data.series.series_uid} has no stored instances"
        uid = data.series.series_uid
        if uid not in self.volumes:
            self.volumes[uid] = self._load(uid, [self.spool_dir / p for p in data.paths])
        return self.volumes[uid]

    def _load(self, series_uid: str, paths: list[Path]) -> _Volume | str:
        # Reading problems skip this report (recorded, logged); a write that fails (disk full)
        # fails the whole export, which then records nothing and runs again next time.
        try:
            vol = load_volume(paths)
            header = _header_values(paths[0])
        except VolumeError as exc:
            return f"series {series_uid} cannot be assembled: {exc.reason}"
        except (InvalidDicomError, OSError, ValueError) as exc:
            return f"series {series_uid} cannot be read: {type(exc).__name__}: {exc}"
        patient_key = next(iter(header.get("PatientID", ())), None)
        if self.pz is None:
            volume_id = series_uid
            rel = f"volumes/{series_uid}.nii.gz"
        else:
            volume_id = self.pz.uid(series_uid)
            folder = self.pz.patient(patient_key) if patient_key else "pat-unknown"
            rel = f"volumes/{folder}/{volume_id}.nii.gz"
        target = self.destination / rel
        if not target.exists():
            _write_nifti(target, vol.hu, vol.affine)
            self.written += 1
        zs = [float((vol.affine @ np.array([k, 0.0, 0.0, 1.0]))[2]) for k in (0, len(vol.hu) - 1)]
        half = abs(float(vol.affine[2, 0])) / 2 + 1e-6
        affine = tuple(
            (float(r[0]), float(r[1]), float(r[2]), float(r[3])) for r in vol.affine.tolist()
        )
        return _Volume(
            series_uid=series_uid,
            volume_id=volume_id,
            rel_path=rel,
            spacing=(float(vol.spacing[0]), float(vol.spacing[1]), float(vol.spacing[2])),
            affine=affine,
            z_range=(min(zs) - half, max(zs) + half),
            sop_uids=frozenset(vol.sop_instance_uids),
            identifiers=identifiers_from_dicom(header),
            patient_key=patient_key,
        )

    def _cleaner(self, data: _ReportData, vol: _Volume) -> Callable[[str], str]:
        """The report's text scrubber: identity without de-identification."""
        pz = self.pz
        if pz is None:
            return str
        ids = (
            vol.identifiers
            | _hl7_identifiers(data.raw)
            | Identifiers(ids=data.db_ids, uids=data.db_uids)
        )
        key = vol.patient_key or data.patient_id
        shift = pz.shift_days(pz.patient(key) if key else "pat-unknown")
        return lambda text: scrub_text(text, ids, shift)

    def entry(self, data: _ReportData, vol: _Volume) -> ManifestEntry:
        clean = self._cleaner(data, vol)
        snippets = []
        lo, hi = vol.z_range
        for pair in data.pairs:
            if pair.series_uid != vol.series_uid and not lo <= pair.z_mm <= hi:
                continue  # another series, and outside this volume: nothing to point at
            snippet = clean(pair.snippet).strip()
            if not snippet:
                continue
            sop = pair.sop_uid if pair.sop_uid in vol.sop_uids else None
            if sop is not None and self.pz is not None:
                sop = self.pz.uid(sop)
            snippets.append(SnippetEntry(text=snippet, z_mm=pair.z_mm, sop_instance_uid=sop))
        return ManifestEntry(
            volume_id=vol.volume_id,
            volume_path=vol.rel_path,
            volume_format=VOLUME_FORMAT,
            spacing=vol.spacing,
            affine=vol.affine,
            rescale=RESCALE,
            geometry_source="dicom",
            report=clean(data.text),
            snippets=tuple(snippets),
            source=SOURCE,
        )


# ---------------------------------------------------------------------------------------------
# The export


@contextmanager
def _locked(destination: Path) -> Iterator[None]:
    destination.mkdir(parents=True, exist_ok=True)
    fd = os.open(destination / LOCK_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportBusyError(f"another export is writing to {destination}") from None
        yield
    finally:
        os.close(fd)


def _manifest_name(done: Sequence[tuple[int, datetime]], deid: bool) -> str:
    digest = hashlib.sha256(
        "\n".join(f"{rid}:{mined.isoformat()}" for rid, mined in done).encode()
    ).hexdigest()[:12]
    last = max(mined for _, mined in done).astimezone(UTC)
    return f"manifest-{last:%Y%m%dT%H%M%SZ}-{digest}{'' if deid else '-identified'}.jsonl"


def export(
    db: Database,
    *,
    spool_dir: Path,
    out_dir: Path,
    since: datetime | None = None,
    deid: bool = True,
    secret: bytes | None = None,
    fsync: bool = True,
) -> ExportResult:
    """Export to ``out_dir`` what it does not have (``since`` None) or everything mined since
    ``since``; see the module docstring. ``secret`` is required with ``deid``."""
    if deid and not secret:
        raise ValueError("de-identification needs a secret (deid_secret or the data dir's file)")
    pseudonymizer = Pseudonymizer(secret) if deid and secret else None
    destination = Path(out_dir).resolve()
    result = ExportResult(destination=destination, deid=deid)
    with _locked(destination):
        with db.transaction() as session:
            pending = _pending(session, str(destination), since)
        writer = _Writer(destination, Path(spool_dir), pseudonymizer)
        entries: list[ManifestEntry] = []
        done: list[tuple[int, datetime]] = []
        skipped: list[tuple[int, datetime, str]] = []
        for report_id in pending:
            with db.transaction() as session:
                data = _read_report(session, report_id)
            if data is None:
                continue
            vol = writer.volume(data)
            if isinstance(vol, str):
                skipped.append((report_id, data.mined_at, vol))
                continue
            entries.append(writer.entry(data, vol))
            done.append((report_id, data.mined_at))
        name = None
        if entries:
            name = _manifest_name(done, deid)
            atomic_write(destination / name, manifest_text(entries).encode("utf-8"), fsync=fsync)
            result.manifest = destination / name
        _record(db, str(destination), done, skipped, name)
    result.rows = len(entries)
    result.snippets = sum(len(e.snippets) for e in entries)
    result.volumes_written = writer.written
    result.skipped = [{"report_id": rid, "reason": why} for rid, _, why in skipped]
    for rid, _, why in skipped:
        log.warning("report not exported", extra={"fields": {"report_id": rid, "reason": why}})
    log.info("export done", extra={"fields": result.summary()})
    return result


def _record(
    db: Database,
    destination: str,
    done: Sequence[tuple[int, datetime]],
    skipped: Sequence[tuple[int, datetime, str]],
    manifest: str | None,
) -> None:
    """Advance the watermark: one transaction, after the manifest is durable."""
    now = utcnow()
    with db.transaction() as session:
        for report_id, mined, state, reason, name in [
            *((rid, m, "exported", None, manifest) for rid, m in done),
            *((rid, m, "skipped", why, None) for rid, m, why in skipped),
        ]:
            session.merge(
                ExportedReport(
                    destination=destination,
                    report_id=report_id,
                    mined_at=mined,
                    state=state,
                    reason=reason,
                    manifest=name,
                    exported_at=now,
                )
            )


def export_from_settings(
    settings: Settings,
    db: Database | None = None,
    *,
    out_dir: Path | None = None,
    since: datetime | None = None,
    deid: bool | None = None,
) -> ExportResult:
    """The export as the CLI and the nightly task run it: paths, secret and defaults from the
    node's settings (:class:`radfinder_node.config.Settings`)."""
    use_deid = settings.deid if deid is None else deid
    configured = settings.deid_secret.get_secret_value() if settings.deid_secret else None
    secret = load_secret(configured, settings.data_dir) if use_deid else None
    own = db is None
    database = db or Database(settings.effective_database_url)
    try:
        return export(
            database,
            spool_dir=settings.spool_dir,
            out_dir=out_dir or settings.effective_export_dir,
            since=since,
            deid=use_deid,
            secret=secret,
            fsync=settings.fsync,
        )
    finally:
        if own:
            database.dispose()
