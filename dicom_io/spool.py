"""Durable spool and quarantine on a filesystem.

An instance is acknowledged only after its bytes are on disk, so every write goes to a
temporary file in the destination directory, is fsynced, and is renamed into place (the rename
is atomic, so a reader or a crash never sees half a file); the directory is fsynced so the
rename itself survives power loss. Paths are built from validated UIDs only.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from dicom_io.uids import is_valid_uid


class SpoolFullError(OSError):
    """The filesystem has no room (ENOSPC/EDQUOT); nothing was left behind."""


class InvalidUIDError(ValueError):
    """A UID that is not a valid DICOM UID; it must never become a path."""


@dataclass(frozen=True)
class StoredFile:
    path: Path
    relative: PurePosixPath
    size: int
    replaced: bool  # an object with the same SOP Instance UID was already there


_FULL = {errno.ENOSPC, errno.EDQUOT}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | memoryview, *, fsync: bool) -> bool:
    """Write ``data`` to ``path`` via temp file + rename; return True if it replaced a file.

    Raises SpoolFullError (after removing the temporary file) when the disk is full.
    """
    created = _make_parent(path)
    parent = path.parent
    tmp = parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        replaced = path.exists()
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in _FULL:
            raise SpoolFullError(exc.errno, f"no space left for {path.name}") from exc
        raise
    if fsync:
        _fsync_dir(parent)
        for top in created:  # make new directory entries durable up to the existing ancestor
            _fsync_dir(top.parent)
    return replaced


def _make_parent(path: Path) -> list[Path]:
    """Create ``path.parent``; return the topmost directories created (to fsync their parent)."""
    parent = path.parent
    if parent.is_dir():
        return []
    missing = parent
    while not missing.parent.is_dir():
        missing = missing.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in _FULL:
            raise SpoolFullError(exc.errno, f"no space to create {parent}") from exc
        raise
    return [missing]


def atomic_adopt(src: Path, dest: Path, *, fsync: bool) -> bool:
    """Move a fully written file to ``dest`` durably; return True if it replaced a file.

    The file is fsynced before the rename, so ``dest`` never names a half-written file. Across
    filesystems (EXDEV) it is copied through :func:`atomic_write` instead.
    """
    if fsync:
        fd = os.open(src, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    created = _make_parent(dest)
    replaced = dest.exists()
    try:
        os.replace(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        replaced = atomic_write(dest, src.read_bytes(), fsync=fsync)
        src.unlink(missing_ok=True)
        return replaced
    if fsync:
        _fsync_dir(dest.parent)
        for top in created:
            _fsync_dir(top.parent)
    return replaced


class Spool:
    """Received instances at ``<root>/<study>/<series>/<sop>.dcm``.

    ``<root>/.incoming`` holds instances still being received (on the same filesystem, so
    accepting one is a rename, not a copy).
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        self.incoming = root / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def relative_path(study_uid: str, series_uid: str, sop_uid: str) -> PurePosixPath:
        for name, uid in (("Study", study_uid), ("Series", series_uid), ("SOP Instance", sop_uid)):
            if not is_valid_uid(uid):
                raise InvalidUIDError(f"{name} UID is not a valid DICOM UID: {uid!r}")
        return PurePosixPath(study_uid, series_uid, f"{sop_uid}.dcm")

    def adopt(self, src: Path, study_uid: str, series_uid: str, sop_uid: str) -> StoredFile:
        """Accept a received file (see :func:`atomic_adopt`) under its UIDs."""
        rel = self.relative_path(study_uid, series_uid, sop_uid)
        path = self.root / rel
        size = src.stat().st_size
        replaced = atomic_adopt(src, path, fsync=self.fsync)
        return StoredFile(path=path, relative=rel, size=size, replaced=replaced)

    def remove(self, rel: PurePosixPath) -> None:
        (self.root / rel).unlink(missing_ok=True)

    def sweep_temporary(self) -> int:
        """Delete temp files a crash left behind; none of them was ever acknowledged."""
        count = 0
        for tmp in [*self.root.rglob(".*.tmp"), *self.incoming.iterdir()]:
            tmp.unlink(missing_ok=True)
            count += 1
        return count


class Quarantine:
    """Rejected input, kept byte for byte with a JSON sidecar that says why."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        root.mkdir(parents=True, exist_ok=True)

    def adopt(self, src: Path, reason: str, **meta: Any) -> PurePosixPath:
        """Keep the file ``src`` (moved, not copied); returns its path under the quarantine."""
        rel = self._describe(reason, src.stat().st_size, src.suffix, meta)
        atomic_adopt(src, self.root / rel, fsync=self.fsync)
        return rel

    def _describe(self, reason: str, size: int, suffix: str, meta: dict[str, Any]) -> PurePosixPath:
        """Write the sidecar first, so an object is never in quarantine without its reason."""
        now = time.gmtime()
        name = f"{time.strftime('%H%M%S', now)}-{secrets.token_hex(6)}"
        rel = PurePosixPath(time.strftime("%Y%m%d", now), name + suffix)
        sidecar = {"reason": reason, "size": size, "object": rel.name, **meta}
        atomic_write(
            self.root / rel.with_suffix(".json"),
            json.dumps(sidecar, default=str, indent=1).encode(),
            fsync=self.fsync,
        )
        return rel
