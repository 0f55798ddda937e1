"""Image references resolved against what the node received: (series, image) -> slice and z.

A report says "series 3, image 45"; the training manifest needs the SOP Instance UID of that
slice and its patient z in mm (DESIGN §3, §6). Series number and InstanceNumber are looked up
among the study's rows; z is read from the instance's spool file (header only, no pixels) as
the position of ImagePositionPatient along the slice normal of ImageOrientationPatient, the
convention of dicom_io.geometry, so for an axial series it is the patient z (LPS) the model's
depth head is trained on.

A reference without a series ("image 449") means the series the radiologist was reading: the
study's primary axial series, chosen as

1. the series the node selected for inference (state ``selected``), the one with most
   instances if several; else
2. the axial series (orientation from ImageOrientationPatient, localizers excluded) with most
   instances, ties to the lowest series number.

Nothing is dropped: a reference that cannot be resolved comes back with ``sop_instance_uid``
None and the reason (series not in the study, image not in the series, two instances with one
number, non-axial series, spool file missing or unreadable, no geometry in its header).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_io.geometry import VolumeError, slice_normal
from dicom_io.selection import orientation_label
from radfinder_node.models import Instance, Series, SeriesState
from reports.mining import ImageReference

__all__ = ["Resolution", "SeriesRow", "primary_series", "resolve_references"]

log = logging.getLogger("radfinder_node.resolve")

_HEADER_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "NumberOfFrames")


@dataclass(frozen=True)
class Resolution:
    """Where a reference points; ``reason`` is None exactly when it resolved."""

    ref: ImageReference
    sop_instance_uid: str | None
    series_uid: str | None
    z_mm: float | None
    reason: str | None

    @property
    def resolved(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class SeriesRow:
    """What choosing a series needs from the database."""

    id: int
    series_uid: str
    number: int | None
    state: SeriesState
    attributes: Mapping[str, Any]
    instances: int

    @property
    def orientation(self) -> str | None:
        return orientation_label(self.attributes.get("ImageOrientationPatient"))

    @property
    def is_localizer(self) -> bool:
        image_type = self.attributes.get("ImageType") or ()
        if isinstance(image_type, str):
            image_type = image_type.split("\\")
        return any(str(v).upper() == "LOCALIZER" for v in image_type)


def primary_series(rows: Sequence[SeriesRow]) -> SeriesRow | None:
    """The series a reference without a series number means (see the module docstring)."""

    def rank(r: SeriesRow) -> tuple[int, int]:
        return -r.instances, r.number if r.number is not None else 1 << 30

    selected = [r for r in rows if r.state == SeriesState.SELECTED]
    if selected:
        return min(selected, key=rank)
    axial = [r for r in rows if r.orientation == "AXIAL" and not r.is_localizer]
    return min(axial, key=rank) if axial else None


def series_rows(session: Session, study_id: int) -> list[SeriesRow]:
    """The study's series with their instance counts, the input of :func:`primary_series`."""
    counts = (
        select(Instance.series_id, func.count(Instance.id).label("n"))
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id == study_id)
        .group_by(Instance.series_id)
        .subquery()
    )
    rows = session.execute(
        select(
            Series.id,
            Series.series_uid,
            Series.series_number,
            Series.state,
            Series.attributes,
            func.coalesce(counts.c.n, 0),
        )
        .outerjoin(counts, counts.c.series_id == Series.id)
        .where(Series.study_id == study_id)
    ).all()
    return [SeriesRow(r[0], r[1], r[2], r[3], r[4] or {}, int(r[5])) for r in rows]


@dataclass(frozen=True)
class _Slice:
    sop_uid: str
    path: str


def _instances(
    session: Session, series_ids: set[int], numbers: set[int]
) -> dict[tuple[int, int], list[_Slice]]:
    """Instances of the given series with the given numbers, by (series id, number)."""
    out: dict[tuple[int, int], list[_Slice]] = {}
    if not series_ids or not numbers:
        return out
    rows = session.execute(
        select(Instance.series_id, Instance.instance_number, Instance.sop_uid, Instance.path)
        .where(Instance.series_id.in_(series_ids), Instance.instance_number.in_(numbers))
        .order_by(Instance.id)
    ).all()
    for series_id, number, sop_uid, path in rows:
        if number is not None:
            out.setdefault((series_id, number), []).append(_Slice(sop_uid, path))
    return out


def slice_z(path: Path) -> float:
    """Position of a slice along its normal (mm), from its header; ValueError says why not."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
    except FileNotFoundError:
        raise ValueError(f"spool file missing: {path}") from None
    except (InvalidDicomError, OSError, EOFError) as exc:
        raise ValueError(f"spool file unreadable: {path}: {exc}") from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError("multi-frame instance: an image number does not name one of its frames")
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is None or iop is None or len(ipp) != 3:
        raise ValueError("no ImagePositionPatient/ImageOrientationPatient in the header")
    try:
        _, _, normal = slice_normal([float(v) for v in iop])
    except VolumeError as exc:
        raise ValueError(exc.reason) from None
    return float(np.dot(np.asarray([float(v) for v in ipp]), normal))


class _Resolver:
    def __init__(self, rows: list[SeriesRow], spool_dir: Path) -> None:
        self.rows = rows
        self.spool_dir = spool_dir
        self.primary = primary_series(rows)
        self.by_number: dict[int, list[SeriesRow]] = {}
        for r in rows:
            if r.number is not None:
                self.by_number.setdefault(r.number, []).append(r)
        self.z_cache: dict[str, float | str] = {}

    def candidates(self, ref: ImageReference) -> list[SeriesRow] | str:
        if ref.series is None:
            if self.primary is None:
                return "no series given and the study has no axial series to assume"
            return [self.primary]
        found = self.by_number.get(ref.series)
        if not found:
            have = sorted(self.by_number)
            return f"series {ref.series} is not in the study (series received: {have})"
        return found

    def z(self, s: _Slice) -> float | str:
        if s.sop_uid not in self.z_cache:
            try:
                self.z_cache[s.sop_uid] = slice_z(self.spool_dir / s.path)
            except ValueError as exc:
                self.z_cache[s.sop_uid] = str(exc)
        return self.z_cache[s.sop_uid]

    def resolve(
        self, ref: ImageReference, slices: Mapping[tuple[int, int], list[_Slice]]
    ) -> Resolution:
        found = self.candidates(ref)
        if isinstance(found, str):
            return Resolution(ref, None, None, None, found)
        hits = [(r, s) for r in found for s in slices.get((r.id, ref.image), [])]
        if len(hits) > 1:
            selected = [h for h in hits if h[0].state == SeriesState.SELECTED]
            hits = selected if len(selected) == 1 else hits
        named = f"series {found[0].number}" if ref.series is not None else "the primary series"
        if not hits:
            sizes = ", ".join(f"{r.series_uid} has {r.instances}" for r in found)
            return Resolution(
                ref, None, found[0].series_uid, None, f"image {ref.image} not in {named} ({sizes})"
            )
        if len(hits) > 1:
            return Resolution(
                ref,
                None,
                None,
                None,
                f"ambiguous: {len(hits)} instances numbered {ref.image} in {named}",
            )
        row, s = hits[0]
        if row.orientation not in ("AXIAL", None):
            return Resolution(
                ref,
                None,
                row.series_uid,
                None,
                f"{named} is {row.orientation.lower()}, not axial: its slices have no "
                f"patient z (cited instance {s.sop_uid})",
            )
        z = self.z(s)
        if isinstance(z, str):
            return Resolution(ref, None, row.series_uid, None, f"{z} (instance {s.sop_uid})")
        return Resolution(ref, s.sop_uid, row.series_uid, z, None)


def resolve_references(
    session: Session, study_id: int, refs: Sequence[ImageReference], spool_dir: Path
) -> list[Resolution]:
    """One Resolution per reference, in order; reads only, never writes."""
    if not refs:
        return []
    resolver = _Resolver(series_rows(session, study_id), Path(spool_dir))
    wanted: set[int] = set()
    for ref in refs:
        found = resolver.candidates(ref)
        if not isinstance(found, str):
            wanted.update(r.id for r in found)
    slices = _instances(session, wanted, {ref.image for ref in refs})
    out = [resolver.resolve(ref, slices) for ref in refs]
    unresolved = [r for r in out if not r.resolved]
    if unresolved:
        log.info(
            "references unresolved",
            extra={
                "fields": {
                    "study_id": study_id,
                    "references": len(out),
                    "unresolved": len(unresolved),
                    "first_reason": unresolved[0].reason,
                }
            },
        )
    return out
