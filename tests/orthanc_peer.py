"""Debian's Orthanc as a real PACS peer for tests and benchmarks.

Each :class:`OrthancPeer` is its own Orthanc process: a generated JSON configuration (no
plugins, no Lua, no authentication), free loopback ports, a temporary storage directory and
``TCP_NODELAY=1`` (Orthanc 1.10 leaves Nagle on for DICOM otherwise, which adds ~40 ms to every
small C-STORE response). The REST helpers cover what an end-to-end test asks a PACS: upload,
push to a modality, find an object by UID and download it.

Orthanc 1.10 has no setting for the DICOM listener's address; it binds all interfaces on its
free port. The HTTP server accepts loopback clients only (``RemoteAccessAllowed: false``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Any

from pydicom import Dataset, dcmread

__all__ = ["OrthancError", "OrthancPeer", "free_port", "orthanc_available"]

EXECUTABLE = "Orthanc"


def orthanc_available() -> bool:
    """True when Debian's ``Orthanc`` binary is on PATH (``make debian-tools`` installs it)."""
    return shutil.which(EXECUTABLE) is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OrthancError(RuntimeError):
    """Orthanc did not start, or answered a REST call with an error (its body says why)."""


class OrthancPeer:
    """One Orthanc process; use as a context manager or call :meth:`start` / :meth:`stop`.

    ``modalities`` are the DICOM peers Orthanc may push to, ``{name: (AE, host, port)}``; more
    can be added once their ports are known with :meth:`add_modality`.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        max_pdu: int = 131072,
    ) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.max_pdu = max_pdu
        self.modalities = dict(modalities or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "orthanc.log"

    # ----------------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def destination(self) -> str:
        """``AE@HOST:PORT``, as the node's ``destinations`` setting takes it."""
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def config(self) -> dict[str, Any]:
        store = self.workdir / "storage"
        return {
            "Name": "radfinder-test-pacs",
            "StorageDirectory": str(store),
            "IndexDirectory": str(store),
            "TemporaryDirectory": str(self.workdir / "tmp"),
            "StorageCompression": False,
            "Plugins": [],
            "LuaScripts": [],
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "MaximumPduLength": self.max_pdu,
            "DicomScuTimeout": 30,
            "DicomAssociationCloseDelay": 0,  # release a push's association at once
            "DicomModalities": {
                name: [ae, host, port] for name, (ae, host, port) in self.modalities.items()
            },
            "SaveJobs": False,
            "StableAge": 60,
        }

    def start(self, timeout_s: float = 30.0) -> OrthancPeer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        conf = self.workdir / "orthanc.json"
        conf.write_text(json.dumps(self.config(), indent=1))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [EXECUTABLE, str(conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TCP_NODELAY": "1"},
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with {self.proc.returncode}: {self._log_tail()}"
                )
            try:
                self.get("/system")
                if self._dicom_open():
                    return self
            except (OSError, OrthancError):
                pass
            time.sleep(0.1)
        self.stop()
        raise OrthancError(f"Orthanc did not answer within {timeout_s} s: {self._log_tail()}")

    def _dicom_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=0.5):
                return True
        except OSError:
            return False

    def _log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> OrthancPeer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------------- REST

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | Any = None,
        *,
        content_type: str = "application/json",
        timeout_s: float = 120.0,
    ) -> bytes:
        """One REST call; the raw answer. Bytes are sent as-is, anything else as JSON."""
        data: bytes | None
        if body is None:
            data = None
        elif isinstance(body, bytes):
            data = body
        else:
            data = json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as rsp:
                payload: bytes = rsp.read()
                return payload
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {detail}") from exc

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, body: Any) -> Any:
        return json.loads(self.request("POST", path, body))

    def upload(self, files: Iterable[Path]) -> list[dict[str, Any]]:
        """``POST /instances`` each Part 10 file; Orthanc's answers (ID, ParentStudy, Status)."""
        out = []
        for path in files:
            answer = json.loads(
                self.request(
                    "POST", "/instances", Path(path).read_bytes(), content_type="application/dicom"
                )
            )
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise OrthancError(f"upload of {path} answered {answer}")
            out.append(answer)
        return out

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare (or update) a DICOM peer Orthanc may push to."""
        self.request("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})
        self.modalities[name] = (aet, host, port)

    def store_to_modality(self, name: str, resources: Iterable[str]) -> dict[str, Any]:
        """``POST /modalities/{name}/store``, synchronously: returns once the association ended
        (Orthanc's report: instance count, failures)."""
        answer: dict[str, Any] = self.post(
            f"/modalities/{name}/store",
            {"Resources": list(resources), "Synchronous": True},
        )
        return answer

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """Orthanc resources whose DICOM UID (patient, study, series or SOP) is ``uid``."""
        found: list[dict[str, Any]] = json.loads(
            self.request("POST", "/tools/lookup", uid.encode(), content_type="text/plain")
        )
        return found

    def instance_id(self, sop_uid: str) -> str | None:
        for item in self.lookup(sop_uid):
            if item.get("Type") == "Instance":
                return str(item["ID"])
        return None

    def study_id(self, study_uid: str) -> str | None:
        for item in self.lookup(study_uid):
            if item.get("Type") == "Study":
                return str(item["ID"])
        return None

    def has_instances(self, sop_uids: Iterable[str]) -> bool:
        return all(self.instance_id(uid) is not None for uid in sop_uids)

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Every instance Orthanc holds in the study, with its tags and its parent series."""
        sid = self.study_id(study_uid)
        if sid is None:
            return []
        found: list[dict[str, Any]] = self.get(f"/studies/{sid}/instances")
        return found

    def instance_file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")

    def dataset(self, sop_uid: str) -> Dataset:
        """The stored object, parsed: exactly the bytes the PACS holds."""
        iid = self.instance_id(sop_uid)
        if iid is None:
            raise OrthancError(f"Orthanc holds no instance {sop_uid}")
        return dcmread(BytesIO(self.instance_file(iid)))

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])
