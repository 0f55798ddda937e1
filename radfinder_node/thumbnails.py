"""Small PNG thumbnails of spooled slices, for the key images on the status page.

A thumbnail is looked up by SOP Instance UID through the database (never by a path from the
request), decoded by ``dicom_io`` (any transfer syntax the volume loader reads), windowed and
scaled down. A slice never changes under its UID, so rendered PNGs are kept in a small LRU cache:
a page refresh costs no decoding.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image
from sqlalchemy import select

from dicom_io.geometry import VolumeError
from dicom_io.key_images import WIDE_WINDOW, window_to_u8
from dicom_io.uids import is_valid_uid
from dicom_io.volume import load_volume
from radfinder_node.database import Database
from radfinder_node.models import Instance

log = logging.getLogger("radfinder_node.thumbnails")


class ThumbnailError(Exception):
    """Why no thumbnail can be made; ``status`` is the HTTP status that says so."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def render_thumbnail(
    path: Path, size: int = 160, window: tuple[float, float] = WIDE_WINDOW
) -> bytes:
    """PNG bytes of the (first frame of the) slice in ``path``, longest side ``size`` pixels."""
    hu = load_volume([path]).hu[0]
    image = Image.fromarray(window_to_u8(hu, window), mode="L")
    image.thumbnail((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


class Thumbnails:
    """Thumbnails of the instances in one node's spool, cached by SOP Instance UID."""

    def __init__(
        self, db: Database, spool_dir: Path, *, size: int = 160, cache_entries: int = 512
    ) -> None:
        self.db = db
        self.spool_dir = spool_dir
        self.size = size
        self.cache_entries = cache_entries
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.rendered = 0  # renders done (not cache hits): tests and metrics read it

    def png(self, sop_uid: str) -> bytes:
        if not is_valid_uid(sop_uid):
            raise ThumbnailError(f"not a UID: {sop_uid[:80]!r}", 400)
        with self._lock:
            cached = self._cache.get(sop_uid)
            if cached is not None:
                self._cache.move_to_end(sop_uid)
                return cached
        with self.db.transaction() as session:
            rel = session.scalar(select(Instance.path).where(Instance.sop_uid == sop_uid))
        if rel is None:
            raise ThumbnailError(f"no stored instance {sop_uid}", 404)
        path = self.spool_dir / rel
        if not path.is_file():
            raise ThumbnailError(f"instance {sop_uid} is no longer in the spool", 404)
        try:
            data = render_thumbnail(path, self.size)
        except VolumeError as exc:
            log.warning(
                "thumbnail not rendered", extra={"fields": {"sop_uid": sop_uid, "error": str(exc)}}
            )
            raise ThumbnailError(
                f"instance {sop_uid} is not a renderable CT slice: {exc}", 422
            ) from exc
        with self._lock:
            self.rendered += 1
            self._cache[sop_uid] = data
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)
        return data
