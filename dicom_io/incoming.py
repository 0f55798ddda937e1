"""Receive C-STORE data sets straight into a file on the spool's filesystem.

pynetdicom can write an incoming data set to a temporary file fragment by fragment
(``STORE_RECV_CHUNKED_DATASET``) instead of collecting it in memory. We use that, with the file
created in the spool's ``.incoming`` directory, for three reasons: a 1 GB multi-frame object
never sits in RAM; the write overlaps the network transfer instead of following it; and
accepting the instance is an fsync and a rename on the same filesystem, not a copy.

pynetdicom opens the file through ``dimse_messages.NamedTemporaryFile``; we substitute a factory
whose files never raise from ``write``: a full disk is recorded on the file and reported by the
C-STORE handler as "out of resources", instead of aborting the association from inside
pynetdicom's reactor. The same mechanism enforces the largest instance the node accepts: past
the limit the file is deleted at once and the rest of the data set is counted, not written, so a
peer cannot fill the disk with one object and nothing half-written is left to quarantine.

Each file also keeps, as it is written, what accepting it needs without reading it back: its
size, the CRC-32 of everything after the 128-byte preamble (for the seal, see
:mod:`dicom_io.spool`) and its first HEAD_BYTES bytes (file meta and data set header, parsed
from memory). The receive fast path in :mod:`dicom_io.scp` opens its files here too
(:func:`open_incoming`), so both paths hand the C-STORE handler the same kind of object.
"""

from __future__ import annotations

import os
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Any

from pynetdicom import _config, dimse_messages

from dicom_io.spool import PREAMBLE_BYTES, seal_bytes

# Enough for the file meta and the header of any ordinary image (pixel data comes last).
HEAD_BYTES = 65536

_lock = threading.Lock()
_registry: dict[str, IncomingFile] = {}
_directory: Path | None = None
_max_bytes = 0


class InstanceTooLargeError(OSError):
    """The data set outgrew the node's limit; ``received`` counts every byte that arrived."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"instance exceeds the limit of {limit} bytes")
        self.limit = limit
        self.received = 0


class IncomingFile:
    """The file-like object pynetdicom writes a data set into (write/flush/close/name/file)."""

    def __init__(
        self, fd: int | None, name: str, error: OSError | None = None, max_bytes: int = 0
    ) -> None:
        self.name = name
        self.file = self  # pynetdicom calls ``.file.flush()``
        self.error = error
        self.size = 0
        self.max_bytes = max_bytes
        self.crc = 0  # CRC-32 of the bytes after the preamble
        self.head = bytearray()  # the first HEAD_BYTES bytes
        self._fd = fd

    @property
    def fd(self) -> int | None:
        """The open descriptor (None once closed or failed): for syncing before closing."""
        return self._fd

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        if isinstance(self.error, InstanceTooLargeError):
            self.error.received += n
            return n
        if self.error is None and self.max_bytes and self.size + n > self.max_bytes:
            too_large = InstanceTooLargeError(self.max_bytes)
            too_large.received = self.size + n
            self._fail(too_large)
            return n
        if self.error is None and self._fd is not None:
            view = memoryview(data)
            if self.size < HEAD_BYTES:
                self.head += view[: HEAD_BYTES - self.size]
            skip = PREAMBLE_BYTES - self.size  # the preamble is not covered by the CRC
            if skip <= 0:
                self.crc = zlib.crc32(view, self.crc)
            elif skip < n:
                self.crc = zlib.crc32(view[skip:], self.crc)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
                self.size += n
            except OSError as exc:
                self._fail(exc)
        return n

    def seal(self) -> None:
        """Write the seal (size and CRC) into the preamble; the file must be complete."""
        if self._fd is None:
            raise OSError(f"{self.name} is closed")
        os.pwrite(self._fd, seal_bytes(self.size, self.crc), 0)

    def flush(self) -> None:
        """Writes are unbuffered: nothing to flush."""

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _fail(self, exc: OSError) -> None:
        # Give the space back at once: the rest of the data set is discarded as it arrives.
        self.error = exc
        self.close()
        Path(self.name).unlink(missing_ok=True)


def _named_temporary_file(
    delete: bool = False, mode: str = "wb", suffix: str = ".dcm", **_: Any
) -> IncomingFile:
    """What pynetdicom calls as ``NamedTemporaryFile``."""
    return open_incoming(suffix)


def open_incoming(suffix: str = ".dcm") -> IncomingFile:
    """A new, registered file in the incoming directory (see :func:`claim`); never raises:
    a file that cannot be created carries the error."""
    directory = _directory or Path(tempfile.gettempdir())
    try:
        fd, name = tempfile.mkstemp(suffix=suffix, prefix="rx-", dir=directory)
        incoming = IncomingFile(fd, name, max_bytes=_max_bytes)
    except OSError as exc:
        name = str(directory / f"rx-unwritable-{threading.get_ident()}{suffix}")
        incoming = IncomingFile(None, name, exc)
    with _lock:
        _registry[incoming.name] = incoming
    return incoming


def install(directory: Path, max_bytes: int = 0) -> None:
    """Route pynetdicom's received data sets into ``directory`` (process-wide), refusing any
    larger than ``max_bytes`` (file meta included; 0 = no limit)."""
    global _directory, _max_bytes
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    directory.mkdir(parents=True, exist_ok=True)
    _directory = directory
    _max_bytes = max_bytes
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _named_temporary_file  # type: ignore[assignment,attr-defined]


def claim(path: str | os.PathLike[str]) -> IncomingFile | None:
    """The file object behind a received data set (once; the handler owns it from here)."""
    with _lock:
        return _registry.pop(str(path), None)
