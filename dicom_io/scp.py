"""The C-STORE/C-ECHO service class provider: pynetdicom event handlers wired to the spool.

This adapter owns the DICOM side of receiving (contexts, statuses, spool and quarantine files,
per-association accounting). What a stored instance *means* — database rows, series state — is
the application's business, reached through the ``InstanceRecorder`` protocol; the success status
goes out only after the recorder returns, i.e. after the application has committed.

Who may associate is decided here too, when the A-ASSOCIATE-RQ arrives: an ``admission`` callable
(the application's allow-list) answers from the calling AE title and the peer's address, and a
per-address count caps the associations one peer may hold; both refuse with A-ASSOCIATE-RJ and the
reason PS3.8 Table 9-21 defines. With TLS the handshake runs in the connection's own thread with a
timeout (pynetdicom would run it in the accept loop, where one silent client stalls everyone).

The hot path, per instance: dicom_io.upper_layer receives the C-STORE in the association's DUL
thread (no polling reactors, no hand-offs) into a file opened by dicom_io.incoming; the handler
seals the file and starts its writeback, identifies it from the header bytes in memory
(dicom_io.header_scan, pydicom whenever that scan cannot vouch for the file), links it under its
final name and syncs file and directory in one round (dicom_io.spool.durable_link), has the
recorder commit its row, and only then returns the status that the fast path sends at once.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, cast

import pynetdicom
from pydicom import Dataset, dcmread
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from dicom_io import incoming as incoming_files
from dicom_io import upper_layer
from dicom_io.header_scan import scan as scan_header
from dicom_io.selection import summary_attributes
from dicom_io.spool import (
    InvalidUIDError,
    Quarantine,
    Spool,
    SpoolFullError,
    StoredFile,
    start_writeback,
    verify_seal,
)
from dicom_io.tls import peer_subject
from dicom_io.uids import is_valid_uid

log = logging.getLogger("dicom_io.scp")

VERIFICATION = "1.2.840.10008.1.1"
DUL_POLL_S = 0.0001  # the stock reactor's idle poll (where the fast path is off)
DEFER_BYTES = 16384

# C-STORE statuses (PS3.4 Annex B.2.3; the Cxxx range is "Cannot understand").
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_MISSING_UIDS = 0xC211
STATUS_UID_MISMATCH = 0xC212

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 Table 9-21.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service-user: calling AE not recognized
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient, service-provider (presentation): limit

TLS_HANDSHAKE_TIMEOUT_S = 10.0

# Decides from (calling AE title, peer address) whether to admit: None, or the reason not to.
Admission = Callable[[str, str], "str | None"]

# Study-level attributes the application records besides the selection summary.
STUDY_KEYWORDS = ("PatientID", "AccessionNumber", "StudyDate", "StudyDescription", "SeriesNumber")


@dataclass(frozen=True)
class ReceivedInstance:
    """One instance on disk, described for the application."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    # The header as read (pixel data not loaded), or None where the hot path identified the
    # instance without pydicom (dicom_io.header_scan): ``header`` then reads the stored file.
    dataset: Dataset | None = field(default=None, repr=False, kw_only=True)
    stored: StoredFile
    calling_ae: str
    peer: str
    # This association has already recorded an instance of the series: it stays in flight
    # (and so receiving) until the association ends, when association_closed is called.
    series_open: bool = field(default=False, kw_only=True)

    @cached_property
    def header(self) -> dict[str, Any]:
        """Selection and study attributes; computed on demand, since only the first instance
        of a series needs them and the hot path cannot spare the time."""
        ds = self.dataset
        if ds is None:
            ds = dcmread(self.stored.path, defer_size=DEFER_BYTES)
        return header_attributes(ds)


@dataclass(frozen=True)
class Rejected:
    """One instance refused and kept in quarantine (``path`` None if even that failed)."""

    reason: str
    status: int
    path: PurePosixPath | None
    size: int
    sop_uid: str | None
    calling_ae: str
    peer: str


class InstanceRecorder(Protocol):
    def instance_stored(self, instance: ReceivedInstance) -> None:
        """Commit the instance; raising makes the SCP answer a failure."""

    def instance_rejected(self, rejected: Rejected) -> None:
        """Record a quarantined object."""

    def association_closed(self, series_uids: set[str]) -> None:
        """The association that sent these series ended: called while they still count as
        in flight (series_in_flight), so that whatever the recorder deferred while they were
        (see ReceivedInstance.series_open) is committed before completion may judge them."""


def header_attributes(ds: Dataset) -> dict[str, Any]:
    """What selection needs (functional groups included) plus the study-level identifiers."""
    out = summary_attributes(ds)
    for keyword in STUDY_KEYWORDS:
        value = ds.get(keyword)
        if keyword not in out and value not in (None, ""):
            out[keyword] = value if isinstance(value, int) else str(value)
    return out


@dataclass
class _AssocStats:
    peer: str
    calling_ae: str
    started: float = field(default_factory=time.monotonic)
    count: int = 0
    bytes: int = 0
    failures: int = 0
    series: set[str] = field(default_factory=set)
    recorded: set[str] = field(default_factory=set)  # series with an instance recorded
    tls: str | None = None  # "tls" or the client certificate's CN; None in the clear


@dataclass(frozen=True)
class _Refusal:
    rsd: tuple[int, int, int]
    reason: str


class _AdmittingACSE(ACSE):
    """pynetdicom's ACSE with the SCP's admission decision in front of its own negotiation."""

    def __init__(
        self, assoc: Association, admit: Callable[[Association, str], _Refusal | None]
    ) -> None:
        super().__init__(assoc)
        self._admit = admit

    def _negotiate_as_acceptor(self) -> None:
        rq = cast(A_ASSOCIATE, self.requestor.primitive)
        refusal = self._admit(self.assoc, str(rq.calling_ae_title or "").strip())
        if refusal is None:
            super()._negotiate_as_acceptor()
            return
        self.requestor.ae_title = rq.calling_ae_title
        self.send_reject(*refusal.rsd)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


class _Server(ThreadedAssociationServer):
    """The association server with what its request handlers need from the SCP."""

    scp: StorageSCP
    tls: ssl.SSLContext | None
    fast_path: bool


class _Handler(RequestHandler):
    """Per connection: the TLS handshake (bounded), then pynetdicom's handling with admission."""

    def handle(self) -> None:
        server = cast(_Server, self.server)
        if server.tls is not None:
            secured = _handshake(self.request, server.tls, self.client_address)
            if secured is None:
                return
            self.request = secured
        super().handle()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        server = cast(_Server, self.server)
        assoc.acse = _AdmittingACSE(assoc, server.scp._admit)
        if server.fast_path:
            upper_layer.use_fast_path(assoc)
        return assoc


def _handshake(raw: Any, context: ssl.SSLContext, address: Any) -> ssl.SSLSocket | None:
    """Server-side TLS handshake within TLS_HANDSHAKE_TIMEOUT_S; None (logged) if it failed."""
    peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
    try:
        raw.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
        secured = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
    except (OSError, ValueError) as exc:
        log.warning("tls handshake failed", extra={"fields": {"peer": peer, "error": str(exc)}})
        raw.close()
        return None
    try:
        secured.do_handshake()
        secured.settimeout(None)
    except (OSError, ValueError) as exc:  # ssl.SSLError, timeouts and resets are OSErrors
        log.warning("tls handshake failed", extra={"fields": {"peer": peer, "error": str(exc)}})
        secured.close()
        return None
    return secured


class StorageSCP:
    """Receives instances into a spool; reports them to a recorder before answering success."""

    def __init__(
        self,
        spool: Spool,
        quarantine: Quarantine,
        recorder: InstanceRecorder,
        *,
        ae_title: str = "RADFINDER",
        allowed_calling_aes: Iterable[str] = (),
        maximum_pdu_size: int = 0,
        admission: Admission | None = None,
        max_associations_per_peer: int = 0,
        max_instance_bytes: int = 0,
        fast_path: bool | None = None,
    ) -> None:
        """``allowed_calling_aes`` is a plain title list (pynetdicom's own check);
        ``admission`` the application's richer decision (titles with hosts). A limit of 0 is
        no limit. ``fast_path`` (default: whenever the pynetdicom release is the one it was
        written for) serves requests without pynetdicom's polling reactors
        (dicom_io.upper_layer)."""
        if max_associations_per_peer < 0 or max_instance_bytes < 0:
            raise ValueError("limits must be >= 0 (0 = no limit)")
        self.spool = spool
        self.quarantine = quarantine
        self.recorder = recorder
        self.admission = admission
        self.max_associations_per_peer = max_associations_per_peer
        self.max_instance_bytes = max_instance_bytes
        available = upper_layer.fast_path_available()
        self.fast_path = available if fast_path is None else fast_path
        if self.fast_path and not available:
            raise ValueError(
                f"the receive fast path needs pynetdicom {upper_layer.FAST_PATH_PYNETDICOM}, "
                f"not {pynetdicom.__version__}"
            )
        incoming_files.install(spool.incoming, max_instance_bytes)
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_pdu_size = maximum_pdu_size
        self.ae.maximum_associations = 64
        self.ae.network_timeout = 60
        self.ae.dimse_timeout = 60
        self.ae.acse_timeout = 30
        allowed = [a.strip() for a in allowed_calling_aes if a.strip()]
        if allowed:
            self.ae.require_calling_aet = allowed
        self._add_contexts()
        self._lock = threading.Lock()
        self._assocs: dict[int, _AssocStats] = {}
        self._by_peer: dict[str, set[Association]] = {}
        self._server: ThreadedAssociationServer | None = None

    def _add_contexts(self) -> None:
        from pynetdicom import AllStoragePresentationContexts

        syntaxes = list(ALL_TRANSFER_SYNTAXES)  # incl. JPEG Lossless, JPEG-LS, J2K, RLE, deflate
        self.ae.add_supported_context(VERIFICATION)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                self.ae.add_supported_context(cx.abstract_syntax, syntaxes)

    # -- server lifecycle -------------------------------------------------------------------
    def start(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None) -> int:
        """Start listening in background threads; returns the bound port (0 picks a free one).

        With ``ssl_context`` every connection must complete a TLS handshake first (see
        :func:`dicom_io.tls.server_context` for client-certificate checking)."""
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        # What AE.start_server(block=False) does, with our handler class; TLS is left to the
        # handler (ssl_context=None here) so the accept loop never waits on a handshake.
        server = cast(
            _Server,
            self.ae.make_server(
                (host, port),
                evt_handlers=handlers,
                server_class=_Server,
                request_handler=_Handler,
            ),
        )
        server.scp = self
        server.tls = ssl_context
        server.fast_path = self.fast_path
        thread = threading.Thread(
            target=make_target(server.serve_forever), name=f"AcceptorServer@{port}", daemon=True
        )
        thread.start()
        self.ae._servers.append(server)  # AssociationServer.shutdown() removes it again
        self._server = server
        return int(server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def series_in_flight(self) -> set[str]:
        """Series that an open association has sent to: not complete while it stays open."""
        with self._lock:
            return (
                set().union(*(a.series for a in self._assocs.values())) if self._assocs else set()
            )

    # -- admission ------------------------------------------------------------------------
    def _admit(self, assoc: Association, calling_ae: str) -> _Refusal | None:
        """Called in the association's thread with its A-ASSOCIATE-RQ; None admits it."""
        address = str(assoc.requestor.address)
        refusal: _Refusal | None = None
        try:
            reason = self.admission(calling_ae, address) if self.admission is not None else None
        except Exception as exc:  # a broken check must not open the door: refuse
            log.exception("admission check failed", extra={"fields": {"peer": address}})
            reason = f"admission check failed: {type(exc).__name__}"
        if reason is not None:
            refusal = _Refusal(REJECT_CALLING_AE, reason)
        elif self.max_associations_per_peer:
            with self._lock:
                held = {a for a in self._by_peer.get(address, ()) if a.is_alive()}
                if len(held) >= self.max_associations_per_peer:
                    refusal = _Refusal(
                        REJECT_LOCAL_LIMIT,
                        f"{address} already holds {len(held)} associations "
                        f"(limit {self.max_associations_per_peer})",
                    )
                else:
                    held.add(assoc)
                self._by_peer[address] = held
        if refusal is not None:
            log.warning(
                "association rejected",
                extra={
                    "fields": {
                        "peer": f"{address}:{assoc.requestor.port}",
                        "calling_ae": calling_ae,
                        "reason": refusal.reason,
                        "result_source_diagnostic": list(refusal.rsd),
                    }
                },
            )
        return refusal

    def _release(self, assoc: Association) -> None:
        address = str(assoc.requestor.address)
        with self._lock:
            held = self._by_peer.get(address)
            if held is not None:
                held.discard(assoc)
                if not held:
                    del self._by_peer[address]

    # -- handlers ---------------------------------------------------------------------------
    def _stats(self, event: evt.Event) -> _AssocStats:
        key = id(event.assoc)
        with self._lock:
            stats = self._assocs.get(key)
            if stats is None:  # events can race EVT_ESTABLISHED; never lose accounting
                stats = self._assocs[key] = _AssocStats(*_peer(event))
            return stats

    def _on_established(self, event: evt.Event) -> None:
        stats = self._stats(event)
        # pynetdicom's DUL reactor sleeps this long whenever its socket is idle, i.e. between
        # the response to one C-STORE and the next request: 1 ms by default, a third of the
        # per-instance budget. 0.1 ms costs a little CPU only while an association is open.
        dul = getattr(event.assoc, "dul", None)
        if dul is not None and hasattr(dul, "_run_loop_delay"):
            dul._run_loop_delay = DUL_POLL_S
        # Small responses must not wait for Nagle's algorithm (the 40 ms stall peers see).
        raw = getattr(getattr(dul, "socket", None), "socket", None)
        if isinstance(raw, socket.socket):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(raw, ssl.SSLSocket):
            stats.tls = peer_subject(raw) or "tls"

    def _on_closed(self, event: evt.Event) -> None:
        self._release(event.assoc)
        _discard_partial(event.assoc)
        with self._lock:
            stats = self._assocs.get(id(event.assoc))
            recorded = set(stats.recorded) if stats is not None else set()
        if stats is None:  # a connection that never became an association (rejected, probe)
            return
        if recorded:  # before its series stop counting as in flight
            try:
                self.recorder.association_closed(recorded)
            except Exception:
                log.error("recording the end of an association failed", exc_info=True)
        with self._lock:
            self._assocs.pop(id(event.assoc), None)
        log.info(
            "association closed",
            extra={
                "fields": {
                    "peer": stats.peer,
                    "calling_ae": stats.calling_ae,
                    "instances": stats.count,
                    "bytes": stats.bytes,
                    "failures": stats.failures,
                    "series": len(stats.series),
                    "duration_s": round(time.monotonic() - stats.started, 3),
                    "aborted": bool(event.assoc.is_aborted),
                    "tls": stats.tls,
                }
            },
        )

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        stats = self._stats(event)
        req = event.request
        try:
            path = Path(event.dataset_path)
        except AttributeError as exc:  # a C-STORE without a data set
            stats.failures += 1
            log.warning("c-store without a data set", extra={"fields": {"error": str(exc)}})
            return STATUS_CANNOT_UNDERSTAND
        incoming = incoming_files.claim(path)
        if incoming is not None and incoming.error is not None:
            incoming.close()
            if isinstance(incoming.error, incoming_files.InstanceTooLargeError):
                path.unlink(missing_ok=True)  # already gone; nothing half-written stays
                return self._too_large(stats, incoming.error, _req_uid(req))
            stats.failures += 1
            path.unlink(missing_ok=True)
            log.error(
                "receiving data set failed",
                extra={"fields": {"sop_uid": _req_uid(req), "error": str(incoming.error)}},
            )
            return STATUS_OUT_OF_RESOURCES
        try:
            return self._accept(stats, event, path, incoming)
        finally:
            if incoming is not None:
                incoming.close()

    def _accept(
        self,
        stats: _AssocStats,
        event: evt.Event,
        path: Path,
        incoming: incoming_files.IncomingFile | None,
    ) -> int:
        """File one received data set: seal it and start its writeback (dicom_io.spool),
        identify it (from memory when the header allows, dicom_io.header_scan; else with
        pydicom), make it durable under its name, record it."""
        req = event.request
        size = incoming.size if incoming is not None else path.stat().st_size
        stats.bytes += size
        fd = incoming.fd if incoming is not None else None
        if incoming is not None and fd is not None and self.spool.fsync:
            try:  # the seal first: it is part of what the sync below makes durable
                incoming.seal()
                start_writeback(fd)
            except OSError as exc:
                stats.failures += 1
                path.unlink(missing_ok=True)
                log.error("spool write failed", extra={"fields": {"error": str(exc)}})
                return STATUS_OUT_OF_RESOURCES
        ds: Dataset | None = None
        fast = _identify_scanned(incoming.head, size, req) if incoming is not None else None
        if fast is not None:
            ids, instance_number = fast
        else:
            try:
                # Big values (pixel data) are not read, only their extent checked.
                ds = dcmread(path, defer_size=DEFER_BYTES)
                _check_complete(ds, size)
                ids = _identify(ds, req)
                instance_number = _int_or_none(ds.get("InstanceNumber"))
            except _Reject as rej:
                return self._reject(stats, path, rej.reason, rej.status, _req_uid(req))
            except Exception as exc:
                return self._reject(
                    stats,
                    path,
                    f"undecodable data set: {type(exc).__name__}: {exc}",
                    STATUS_CANNOT_UNDERSTAND,
                    _req_uid(req),
                )
        study_uid, series_uid, sop_uid, sop_class = ids
        if not self.spool.fsync:
            fd = None  # nothing to sync: adopt by rename
        try:
            stored = self.spool.adopt(path, study_uid, series_uid, sop_uid, fd=fd, size=size)
        except InvalidUIDError as exc:  # defence in depth; identification validated already
            return self._reject(stats, path, str(exc), STATUS_MISSING_UIDS, sop_uid)
        except OSError as exc:
            stats.failures += 1
            path.unlink(missing_ok=True)
            event_name = "spool full" if isinstance(exc, SpoolFullError) else "spool write failed"
            log.error(event_name, extra={"fields": {"sop_uid": sop_uid, "error": str(exc)}})
            return STATUS_OUT_OF_RESOURCES
        received = ReceivedInstance(
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=sop_uid,
            sop_class_uid=sop_class,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            instance_number=instance_number,
            stored=stored,
            calling_ae=stats.calling_ae,
            peer=stats.peer,
            dataset=ds,
            series_open=series_uid in stats.recorded,
        )
        with self._lock:
            stats.series.add(series_uid)
        try:
            self.recorder.instance_stored(received)
        except Exception as exc:
            stats.failures += 1
            if not stored.replaced:  # leave nothing the database does not know about
                self.spool.remove(stored.relative)
            log.error(
                "recording instance failed",
                exc_info=True,
                extra={"fields": {"sop_uid": sop_uid, "error": str(exc)}},
            )
            return STATUS_OUT_OF_RESOURCES
        stats.count += 1
        with self._lock:
            stats.recorded.add(series_uid)
        return STATUS_SUCCESS

    def _too_large(
        self,
        stats: _AssocStats,
        error: incoming_files.InstanceTooLargeError,
        sop_uid: str | None,
    ) -> Dataset:
        """Refuse an instance over the limit: recorded (without a file), failure status."""
        stats.failures += 1
        reason = f"instance of {error.received} bytes exceeds the limit of {error.limit} bytes"
        log.warning(
            "instance rejected",
            extra={
                "fields": {
                    "reason": reason,
                    "status": f"0x{STATUS_OUT_OF_RESOURCES:04X}",
                    "sop_uid": sop_uid,
                    "calling_ae": stats.calling_ae,
                    "peer": stats.peer,
                }
            },
        )
        rejected = Rejected(
            reason,
            STATUS_OUT_OF_RESOURCES,
            None,
            error.received,
            sop_uid,
            stats.calling_ae,
            stats.peer,
        )
        try:
            self.recorder.instance_rejected(rejected)
        except Exception:
            log.error("recording rejection failed", exc_info=True)
        rsp = Dataset()
        rsp.Status = STATUS_OUT_OF_RESOURCES
        rsp.ErrorComment = f"instance exceeds {error.limit} bytes"[:64]  # LO
        return rsp

    def _reject(
        self, stats: _AssocStats, src: Path, reason: str, status: int, sop_uid: str | None
    ) -> int:
        stats.failures += 1
        path: PurePosixPath | None = None
        size = src.stat().st_size if src.exists() else 0
        try:
            path = self.quarantine.adopt(
                src,
                reason,
                status=f"0x{status:04X}",
                calling_ae=stats.calling_ae,
                peer=stats.peer,
                sop_uid=sop_uid,
            )
        except OSError as exc:
            src.unlink(missing_ok=True)
            log.error("quarantine write failed", extra={"fields": {"error": str(exc)}})
        rejected = Rejected(reason, status, path, size, sop_uid, stats.calling_ae, stats.peer)
        log.warning(
            "instance rejected",
            extra={
                "fields": {
                    "reason": reason,
                    "status": f"0x{status:04X}",
                    "quarantine": str(path),
                    "calling_ae": stats.calling_ae,
                    "peer": stats.peer,
                }
            },
        )
        try:
            self.recorder.instance_rejected(rejected)
        except Exception:
            log.error("recording rejection failed", exc_info=True)
        return status


def instance_from_spool(spool: Spool, path: Path) -> ReceivedInstance:
    """Describe a file already in the spool, to re-index it after the database lost its row
    (power loss after the file was made durable). Raises ValueError if it cannot be filed,
    among them a file whose seal shows it incomplete: cut short by a crash before it was
    acknowledged (see dicom_io.spool)."""
    if verify_seal(path) is False:
        raise ValueError(f"{path} is incomplete (its seal does not match): never acknowledged")
    ds = dcmread(path, defer_size=DEFER_BYTES)
    _check_complete(ds, path.stat().st_size)
    try:
        study_uid, series_uid, sop_uid, sop_class = _identify(ds, None)
    except _Reject as rej:
        raise ValueError(rej.reason) from None
    rel = spool.relative_path(study_uid, series_uid, sop_uid)
    if spool.root / rel != path:
        raise ValueError(f"{path} is not where its UIDs place it ({rel})")
    return ReceivedInstance(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        stored=StoredFile(path=path, relative=rel, size=path.stat().st_size, replaced=True),
        calling_ae="",
        peer="spool",
        dataset=ds,
    )


class _Reject(Exception):
    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def _discard_partial(assoc: Association) -> None:
    """Close and remove the file of a data set the connection's end cut off (whichever path
    was receiving it), so neither a descriptor nor a file outlives the association."""
    dimse = assoc.dimse
    if isinstance(dimse, upper_layer.LeanDIMSE):
        dimse.discard_partial()
    message = getattr(dimse, "message", None)
    file = getattr(message, "_data_set_file", None)
    if isinstance(file, incoming_files.IncomingFile):
        file.close()
        incoming_files.claim(file.name)
        Path(file.name).unlink(missing_ok=True)


def _peer(event: evt.Event) -> tuple[str, str]:
    req = event.assoc.requestor
    return f"{req.address}:{req.port}", str(req.ae_title).strip()


def _req_uid(req: Any) -> str | None:
    uid = getattr(req, "AffectedSOPInstanceUID", None)
    return str(uid) if uid else None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _check_complete(ds: Dataset, file_size: int) -> None:
    """pydicom silently shortens an element whose declared length runs past the end of the
    stream; such a data set was cut off in transit or written wrong, and must not be filed."""
    for tag in ds.keys():  # noqa: SIM118 - iterating ds itself would convert (and read) values
        elem = ds.get_item(tag, keep_deferred=True)  # raw: reading a deferred value is the bug
        length = getattr(elem, "length", None)
        if not isinstance(length, int) or length == 0xFFFFFFFF:
            continue
        value = getattr(elem, "value", None)
        tell = getattr(elem, "value_tell", None)
        if value is None and isinstance(tell, int):  # deferred: check its extent on disk
            short = tell + length > file_size
            have = file_size - tell
        else:
            short = isinstance(value, bytes) and len(value) < length
            have = len(value) if isinstance(value, bytes) else length
        if short:
            raise ValueError(
                f"element {elem.tag} declares {length} bytes but the data set ends after {have}"
            )


_STUDY_UID, _SERIES_UID, _SOP_UID, _SOP_CLASS, _INSTANCE_NUMBER = (
    0x0020000D,
    0x0020000E,
    0x00080018,
    0x00080016,
    0x00200013,
)
_SCANNED = (_STUDY_UID, _SERIES_UID, _SOP_UID, _SOP_CLASS, _INSTANCE_NUMBER)


def _identify_scanned(
    head: bytes | bytearray, size: int, req: Any
) -> tuple[tuple[str, str, str, str], int | None] | None:
    """What _identify and the Instance Number give, from the header bytes in memory; None
    whenever anything is not plainly right (the caller then reads the file with pydicom, so
    every refusal, and its reason, stays pydicom's and _identify's)."""
    values = scan_header(head, size, _SCANNED)
    if values is None:
        return None
    uids: list[str] = []
    for tag in (_STUDY_UID, _SERIES_UID, _SOP_UID, _SOP_CLASS):
        raw = values.get(tag)
        try:
            uid = raw.decode("ascii").rstrip("\0 ").strip() if raw is not None else ""
        except UnicodeDecodeError:
            return None
        if not is_valid_uid(uid):
            return None
        uids.append(uid)
    affected = str(getattr(req, "AffectedSOPInstanceUID", "") or "")
    if affected and affected != uids[2]:
        return None
    number: int | None = None
    raw = values.get(_INSTANCE_NUMBER)
    if raw is not None:
        text = raw.decode("ascii", "replace").strip(" \0")
        if text:
            if not text.isdigit() or len(text) > 12:
                return None  # signs, decimals, several values: as pydicom reads them
            number = int(text)
    return (uids[0], uids[1], uids[2], str(UID(uids[3]))), number


def _identify(ds: Dataset, req: Any) -> tuple[str, str, str, str]:
    """Study/Series/SOP Instance/SOP Class UIDs, validated; raises _Reject with the reason."""
    uids: dict[str, str] = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = str(ds.get(keyword, "") or "").strip()
        if not value:
            raise _Reject(f"missing {keyword}", STATUS_MISSING_UIDS)
        if not is_valid_uid(value):
            raise _Reject(
                f"{keyword} is not a valid DICOM UID: {value[:80]!r}", STATUS_MISSING_UIDS
            )
        uids[keyword] = value
    affected = str(getattr(req, "AffectedSOPInstanceUID", "") or "")
    if affected and affected != uids["SOPInstanceUID"]:
        raise _Reject(
            f"SOPInstanceUID {uids['SOPInstanceUID']} differs from the request's {affected}",
            STATUS_UID_MISMATCH,
        )
    # Some writers leave (0008,0016) empty (e.g. TotalSegmentator's example series); the
    # request's Affected SOP Class UID, which also goes into the file meta, is authoritative.
    sop_class = str(ds.get("SOPClassUID", "") or "").strip() or str(
        getattr(req, "AffectedSOPClassUID", "") or ""
    )
    if not is_valid_uid(sop_class):
        raise _Reject("no valid SOP Class UID in data set or request", STATUS_MISSING_UIDS)
    return (
        uids["StudyInstanceUID"],
        uids["SeriesInstanceUID"],
        uids["SOPInstanceUID"],
        str(UID(sop_class)),
    )
