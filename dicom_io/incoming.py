"""Receive C-STORE data sets straight into a file on the spool's filesystem.

pynetdicom can write an incoming data set to a temporary file fragment by fragment
(``STORE_RECV_CHUNKED_DATASET``) instead of collecting it in memory. We use that, with the file
created in the spool's ``.incoming`` directory, for three reasons: a 1 GB multi-frame object
never sits in RAM; the write overlaps the network transfer instead of following it; and
accepting the instance is an fsync and a rename on the same filesystem, not a copy.

pynetdicom opens the file through ``dimse_messages.NamedTemporaryFile``; we substitute a factory
whose files never raise from ``write``: a full disk is recorded on the file and reported by the
C-STORE handler as "out of resources", instead of aborting the association from inside
pynetdicom's reactor.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from pynetdicom import _config, dimse_messages

_lock = threading.Lock()
_registry: dict[str, IncomingFile] = {}
_directory: Path | None = None


class IncomingFile:
    """The file-like object pynetdicom writes a data set into (write/flush/close/name/file)."""

    def __init__(self, fd: int | None, name: str, error: OSError | None = None) -> None:
        self.name = name
        self.file = self  # pynetdicom calls ``.file.flush()``
        self.error = error
        self.size = 0
        self._fd = fd

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.error is None and self._fd is not None:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
                self.size += len(data)
            except OSError as exc:
                self._fail(exc)
        return len(data)

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
    directory = _directory or Path(tempfile.gettempdir())
    try:
        fd, name = tempfile.mkstemp(suffix=suffix, prefix="rx-", dir=directory)
        incoming = IncomingFile(fd, name)
    except OSError as exc:
        name = str(directory / f"rx-unwritable-{threading.get_ident()}{suffix}")
        incoming = IncomingFile(None, name, exc)
    with _lock:
        _registry[incoming.name] = incoming
    return incoming


def install(directory: Path) -> None:
    """Route pynetdicom's received data sets into ``directory`` (process-wide)."""
    global _directory
    directory.mkdir(parents=True, exist_ok=True)
    _directory = directory
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _named_temporary_file  # type: ignore[assignment,attr-defined]


def claim(path: str | os.PathLike[str]) -> IncomingFile | None:
    """The file object behind a received data set (once; the handler owns it from here)."""
    with _lock:
        return _registry.pop(str(path), None)
