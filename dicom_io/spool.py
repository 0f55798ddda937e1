"""Durable spool and quarantine on a filesystem.

An instance is acknowledged only after its bytes and its name are on disk. Writes go to a
temporary file and reach their final name by an atomic rename or link, so a reader never sees
half a file; file and directory are synced before the caller acknowledges anything. Paths are
built from validated UIDs only.

Two ways to make a received file durable:

- :func:`atomic_adopt` (quarantine, replacing an existing instance, files without an open
  descriptor): fsync the file, rename it into place, fsync the directory. The final name never
  names an incomplete file, even after a crash, at the price of two device cache flushes in a
  row, one per sync.
- :func:`durable_link`, the hot path for a new instance: link the file under its final name
  first, then fdatasync the file and fsync its directory *concurrently* (fdatasync covers the
  data and what reading it needs, size and block map; the new name and the link count are the
  directory's sync). On ext4 (and other journalling filesystems) the two then share one journal
  commit and one cache flush: with 526 KB files on this project's VM (ext4 on virtio, shared
  with other work) the pair took what one fdatasync takes (0.9 against 3.1 ms median for
  atomic_adopt's sequence). Nothing is acknowledged before both return, so durability at
  acknowledgement is unchanged. What changes is the crash window before it: the final name
  can reach the disk before all the data does. Such a file was never acknowledged, and it is
  recognisable: every received file carries a *seal* in its DICOM preamble (the 128 bytes
  PS3.10 leaves to the implementation): the file's size and the CRC-32 of everything after the
  preamble, written before the syncs. :func:`verify_seal` tells a complete file from one cut
  short by a crash, and re-indexing after an unclean stop files only complete ones
  (dicom_io.scp.instance_from_spool). An instance already in the spool is never replaced this
  way (its file may have been acknowledged): ``link`` refuses an existing name and the
  replacement goes through fdatasync, rename, directory fsync, as atomic_adopt does.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
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
# Hard links unsupported or refused here (some network and FUSE filesystems): adopt by rename.
_NO_LINK = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}

# The seal, at offset 0 of the preamble: magic, file size, CRC-32 of the bytes after the
# 128-byte preamble. The rest of the preamble stays zero.
PREAMBLE_BYTES = 128
SEAL_MAGIC = b"RADFINDER-SEAL-1"
_SEAL = struct.Struct("<16sQI")


def seal_bytes(size: int, crc: int) -> bytes:
    """The seal of a file of ``size`` bytes whose bytes after the preamble have CRC-32 ``crc``."""
    return _SEAL.pack(SEAL_MAGIC, size, crc & 0xFFFFFFFF)


def verify_seal(path: Path) -> bool | None:
    """True if the file is complete as sealed, False if it is sealed but incomplete or
    altered (cut short by a crash before it was acknowledged), None if it carries no seal
    (written by an earlier release, or not received over the network)."""
    with open(path, "rb") as f:
        head = f.read(_SEAL.size)
        if len(head) < _SEAL.size or not head.startswith(SEAL_MAGIC):
            return None
        _, size, crc = _SEAL.unpack(head)
        if os.fstat(f.fileno()).st_size != size:
            return False
        f.seek(PREAMBLE_BYTES)
        actual = 0
        while chunk := f.read(1 << 20):
            actual = zlib.crc32(chunk, actual)
    return actual == int(crc)


def _libc_sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError, AttributeError):
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    return None


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk without waiting (Linux sync_file_range
    with SYNC_FILE_RANGE_WRITE; elsewhere nothing). Purely an optimisation, it guarantees
    nothing: called once a received file is complete, it lets the data reach the disk (and
    ext4 allocate its blocks) while the instance is being identified, so that the syncs that
    follow wait for little more than the journal commit: with 526 KB files on this project's
    VM, 0.6 against 2.8-3.2 ms median for durable_link's syncs. Issued per chunk while
    receiving it was slower (each call waits on the device queue)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _sync_pool() -> ThreadPoolExecutor:
    """Threads that run one sync while the caller runs the other (a sync releases the GIL)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="spool-sync")
        return _pool


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
        for made in created:  # make new directory entries durable up to the existing ancestor
            _fsync_dir(made.parent)
    return replaced


def _make_parent(path: Path) -> list[Path]:
    """Create ``path.parent``; return the directories created, outermost first: each one's
    entry lives in its parent, which the caller fsyncs (all of them: a new study directory
    and the series directory inside it are two entries in two directories)."""
    parent = path.parent
    if parent.is_dir():
        return []
    created = [parent]
    while not created[-1].parent.is_dir():
        created.append(created[-1].parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in _FULL:
            raise SpoolFullError(exc.errno, f"no space to create {parent}") from exc
        raise
    return created[::-1]


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
        for made in created:
            _fsync_dir(made.parent)
    return replaced


def durable_link(src: Path, fd: int, dest: Path) -> bool:
    """Give the fully written, sealed file ``src`` (open as ``fd``) the new name ``dest`` and
    make both durable with one round of syncs (see the module docstring); returns True if an
    existing ``dest`` was replaced, which goes through :func:`atomic_adopt` instead.

    ``src`` keeps its name as well (a second link to the same file) unless ``dest`` was
    replaced or links are unsupported: removing it is one more directory update, which the
    caller can do after answering the peer; :meth:`Spool.sweep_temporary` removes any a crash
    leaves. On failure nothing is left under ``dest`` (unless it was there before).
    """
    created = _make_parent(dest)
    try:
        os.link(src, dest)
    except FileExistsError:
        os.fdatasync(fd)
        os.replace(src, dest)
        _fsync_dir(dest.parent)
        return True
    except OSError as exc:
        if exc.errno in _FULL:
            raise SpoolFullError(exc.errno, f"no space to file {dest.name}") from exc
        if exc.errno in _NO_LINK:
            return atomic_adopt(src, dest, fsync=True)
        raise
    try:
        data = _sync_pool().submit(os.fdatasync, fd)
        try:
            _fsync_dir(dest.parent)
            for made in created:  # new study/series directories: their entries too
                _fsync_dir(made.parent)
        finally:
            data.result()
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return False


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

    def adopt(
        self,
        src: Path,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        *,
        fd: int | None = None,
        size: int | None = None,
    ) -> StoredFile:
        """Accept a received file under its UIDs: through :func:`durable_link` when the
        caller still holds it open as ``fd`` (and has sealed it; ``src`` may then keep its
        name, for the caller to remove), else :func:`atomic_adopt`. ``size``, if known,
        saves a stat."""
        rel = self.relative_path(study_uid, series_uid, sop_uid)
        path = self.root / rel
        if size is None:
            size = src.stat().st_size
        if fd is not None and self.fsync:
            replaced = durable_link(src, fd, path)
        else:
            replaced = atomic_adopt(src, path, fsync=self.fsync)
        return StoredFile(path=path, relative=rel, size=size, replaced=replaced)

    def remove(self, rel: PurePosixPath) -> None:
        (self.root / rel).unlink(missing_ok=True)

    def sweep_temporary(self) -> int:
        """Delete temp files a crash left behind: none was ever acknowledged, or (a received
        file's first name, see :func:`durable_link`) it has its final name as well."""
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
