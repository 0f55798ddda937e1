"""C-STORE SCU adapter: send a batch of objects to one destination over one association.

The caller is an outbox that retries, so this adapter never raises for anything the network or
the peer does: a peer that is down, refuses the association, rejects a presentation context or
aborts halfway yields one :class:`SendResult` per object, each saying what happened, and the
outbox decides what to retry. Only programming errors (bad arguments) raise.

One association per batch (an SR and a KOS, or a series), proposing exactly the SOP classes and
transfer syntaxes the batch needs; uncompressed objects also offer the other uncompressed syntax
so that a peer accepting only Implicit VR still gets them. We advertise an unlimited maximum PDU
(``max_pdu=0``), and pynetdicom then fragments to the largest PDU the peer announced.

Two timeouts, because they answer different questions. ``timeout_s`` bounds connecting,
association negotiation and a socket read or write that stalls: a dead or unreachable peer is
found within it, and nothing has reached the peer's storage. ``dimse_timeout_s`` bounds the wait
for a C-STORE response once the request has gone out; a PACS writing to a busy disk can take
minutes, so it is generous. When it runs out (or the association ends while a response is
awaited) the object may well be stored: that result is *ambiguous* (``SendResult.ambiguous``),
the association is aborted (PS3.7 9.1.1.2) and an outbox that retries delivers at least once.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pydicom import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.status import code_to_category

__all__ = ["Destination", "SendResult", "send_datasets"]

log = logging.getLogger("dicom_io.scu")

_UNCOMPRESSED: Final = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_MAX_CONTEXTS: Final = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255
# Same reasoning as the SCP: pynetdicom's reactor sleeps this long between PDUs when idle.
_DUL_POLL_S: Final = 0.0001
_AE_TITLE: Final = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # AE VR: no backslash or control
_DESTINATION: Final = re.compile(
    r"^(?P<ae>[^@]+)@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d+)(?P<tls>\+tls)?$"
)


def _check_ae_title(value: str, what: str) -> str:
    if not _AE_TITLE.fullmatch(value) or not value.strip():
        raise ValueError(f"{what} must be 1..16 printable characters without '\\': {value!r}")
    return value


@dataclass(frozen=True)
class Destination:
    """A C-STORE peer. ``str()`` gives back the ``AE@HOST:PORT[+tls]`` form ``parse`` accepts."""

    ae_title: str
    host: str
    port: int
    tls: bool = False  # the peer speaks DICOM over TLS (PS3.15 B.1); its certificate is verified

    def __post_init__(self) -> None:
        _check_ae_title(self.ae_title, "called AE title")
        if not self.host:
            raise ValueError("destination host is empty")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"destination port must be 1..65535, got {self.port}")

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AE@HOST:PORT`` (an IPv6 host in brackets: ``PACS@[::1]:104``); ``+tls`` at the end
        (``PACS@pacs.example.org:2762+tls``) sends over TLS."""
        m = _DESTINATION.match(text.strip())
        if m is None:
            raise ValueError(f"destination must look like AE@HOST:PORT[+tls], got {text!r}")
        host = m["host"][1:-1] if m["host"].startswith("[") else m["host"]
        return cls(m["ae"], host, int(m["port"]), tls=m["tls"] is not None)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}{'+tls' if self.tls else ''}"


@dataclass(frozen=True)
class SendResult:
    """What happened to one object. ``status`` is the peer's C-STORE status, None if none came.

    ``sop_instance_uid`` is empty only for an item that could not even be read. ``ambiguous``:
    the request went out but no valid response came back, so the peer may have stored the object
    (a resend can give it a second copy of the same instance). ``attempted`` is False for an
    object not started because the batch's ``deadline`` had passed: nothing was sent, so it is
    not a failed try.
    """

    sop_instance_uid: str
    status: int | None
    error: str | None
    ambiguous: bool = False
    attempted: bool = True

    @property
    def ok(self) -> bool:
        """Stored by the peer: success, or a warning (coercion, elements discarded) that still
        means the peer holds the object, so an outbox must not send it again."""
        return (
            self.error is None
            and self.status is not None
            and code_to_category(self.status) in ("Success", "Warning")
        )


@dataclass(frozen=True)
class _Item:
    """One object to send, with what the presentation context needs."""

    payload: Dataset | Path
    sop_class: UID
    sop_instance: str
    transfer_syntax: UID


def _describe(index: int, item: Dataset | Path) -> _Item | SendResult:
    """Read what negotiation needs; an unreadable item becomes a failed result, not a raise."""
    try:
        if isinstance(item, Dataset):
            meta = getattr(item, "file_meta", None)
            ts = meta.get("TransferSyntaxUID") if meta is not None else None
            if ts is None:
                raise ValueError("dataset has no file_meta.TransferSyntaxUID")
            return _Item(item, UID(item.SOPClassUID), str(item.SOPInstanceUID), UID(ts))
        path = Path(item)
        meta = read_file_meta_info(path)
        return _Item(
            path,
            UID(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID),
            UID(meta.TransferSyntaxUID),
        )
    except Exception as exc:  # any unreadable input: report it, keep the batch going
        uid = str(getattr(item, "SOPInstanceUID", "")) if isinstance(item, Dataset) else ""
        return SendResult(uid, None, f"item {index} unreadable: {type(exc).__name__}: {exc}")


def _contexts(items: Sequence[_Item]) -> list[tuple[UID, list[UID]]]:
    """(SOP class, transfer syntaxes) per presentation context, in first-use order.

    Uncompressed objects share one context per SOP class offering both little-endian
    syntaxes; each compressed syntax gets its own context, since pynetdicom cannot transcode
    and the peer must accept that exact syntax.
    """
    wanted: dict[tuple[UID, UID | None], list[UID]] = {}
    for it in items:
        if it.transfer_syntax in _UNCOMPRESSED:
            ordered = [it.transfer_syntax, *(t for t in _UNCOMPRESSED if t != it.transfer_syntax)]
            wanted.setdefault((it.sop_class, None), ordered)
        else:
            wanted.setdefault((it.sop_class, it.transfer_syntax), [it.transfer_syntax])
    if len(wanted) > _MAX_CONTEXTS:
        raise ValueError(
            f"batch needs {len(wanted)} presentation contexts, one association allows "
            f"{_MAX_CONTEXTS}: split it"
        )
    return [(sop_class, ts) for (sop_class, _), ts in wanted.items()]


def _tune(assoc: Any) -> None:
    """Nagle off and a short reactor poll: otherwise each small C-STORE-RSP waits ~40 ms."""
    dul = getattr(assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = _DUL_POLL_S
    raw = getattr(getattr(dul, "socket", None), "socket", None)
    if isinstance(raw, socket.socket):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _association_error(assoc: Any, destination: Destination, connected: bool) -> str:
    if not connected:
        if destination.tls:
            return (
                f"could not connect to {destination} (peer down, unreachable, timed out, or "
                "the TLS handshake failed: certificate not trusted or name mismatch)"
            )
        return f"could not connect to {destination} (peer down, unreachable or timed out)"
    if assoc.is_rejected:
        rsp = getattr(getattr(assoc, "acceptor", None), "primitive", None)
        if rsp is not None:
            return (
                f"association rejected by {destination} ({rsp.result_str}, "
                f"{rsp.source_str}: {rsp.reason_str})"
            )
        return f"association rejected by {destination}"
    return f"association with {destination} aborted or timed out during negotiation"


def send_datasets(
    items: Sequence[Dataset | Path],
    destination: Destination,
    *,
    calling_ae: str = "RADFINDER",
    timeout_s: float = 30,
    dimse_timeout_s: float = 120,
    tls: ssl.SSLContext | None = None,
    deadline: float | None = None,
) -> list[SendResult]:
    """C-STORE every item to ``destination`` over one association; one result per item, in order.

    ``Dataset`` items need ``file_meta.TransferSyntaxUID`` (as a written or read object has);
    ``Path`` items are Part 10 files. Never raises for a network or peer failure. A TLS
    destination uses ``tls`` (see :func:`dicom_io.tls.client_context`), else the system's CAs.
    ``timeout_s`` bounds connect, negotiation and stalled socket I/O; ``dimse_timeout_s`` the
    wait for each response (see the module docstring). No C-STORE starts after ``deadline``
    (a :func:`time.monotonic` value): a caller holding a lease on the objects passes the last
    moment at which a send can still finish inside it; the rest come back ``attempted=False``.
    """
    _check_ae_title(calling_ae, "calling AE title")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if dimse_timeout_s <= 0:
        raise ValueError(f"dimse_timeout_s must be positive, got {dimse_timeout_s}")
    described = [_describe(i, it) for i, it in enumerate(items)]
    results: list[SendResult | None] = [d if isinstance(d, SendResult) else None for d in described]
    todo = [(i, d) for i, d in enumerate(described) if isinstance(d, _Item)]
    if not todo:
        return _collected(results)

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.network_timeout = timeout_s  # the socket's timeout: a read or write that stalls
    ae.connection_timeout = timeout_s
    ae.dimse_timeout = dimse_timeout_s  # the peer may be writing to a slow disk meanwhile
    ae.maximum_pdu_size = 0
    for sop_class, syntaxes in _contexts([d for _, d in todo]):
        ae.add_requested_context(sop_class, syntaxes)

    connected: list[bool] = []

    def on_open(event: evt.Event) -> None:
        connected.append(True)
        _tune(event.assoc)

    tls_args: tuple[ssl.SSLContext, str] | None = None
    if destination.tls:
        from dicom_io.tls import client_context

        tls_args = (tls if tls is not None else client_context(), destination.host)
    started = time.monotonic()
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        max_pdu=0,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_open)],
        tls_args=tls_args,
    )
    if not assoc.is_established:
        error = _association_error(assoc, destination, bool(connected))
        for i, d in todo:
            results[i] = SendResult(d.sop_instance, None, error)
        log.warning(
            "store failed",
            extra={
                "fields": {"destination": str(destination), "objects": len(todo), "error": error}
            },
        )
        return _collected(results)

    try:
        for i, d in todo:
            if deadline is not None and time.monotonic() > deadline:
                results[i] = SendResult(
                    d.sop_instance,
                    None,
                    "not sent: the batch ran out of time before this object",
                    attempted=False,
                )
                continue
            results[i] = _store_one(assoc, d, destination, dimse_timeout_s)
    finally:
        if assoc.is_established:
            assoc.release()
    done = _collected(results)
    log.info(
        "store batch",
        extra={
            "fields": {
                "destination": str(destination),
                "objects": len(todo),
                "ok": sum(r.ok for r in done),
                "ambiguous": sum(r.ambiguous for r in done),
                "seconds": round(time.monotonic() - started, 4),
            }
        },
    )
    return done


def _collected(results: Sequence[SendResult | None]) -> list[SendResult]:
    done = [r for r in results if r is not None]
    if len(done) != len(results):  # a bug here would silently drop an object from the outbox
        raise RuntimeError("internal error: an item was left without a send result")
    return done


def _store_one(
    assoc: Any, item: _Item, destination: Destination, dimse_timeout_s: float
) -> SendResult:
    if not assoc.is_established:
        return SendResult(
            item.sop_instance, None, f"association with {destination} ended before this object"
        )
    started = time.monotonic()
    try:
        rsp = assoc.send_c_store(item.payload)
    except ValueError as exc:  # no accepted context for this SOP class / syntax
        return SendResult(item.sop_instance, None, f"not sent: {exc}")
    except (OSError, RuntimeError, AttributeError) as exc:
        return SendResult(item.sop_instance, None, f"not sent: {type(exc).__name__}: {exc}")
    status = rsp.get("Status") if rsp is not None else None
    if status is None:
        # The request went out and no valid response came back: the peer may have stored the
        # object, and the protocol state is unknown, so end the association (PS3.7 9.1.1.2;
        # pynetdicom already aborted it on a DIMSE timeout) and let the outbox decide.
        if assoc.is_established:
            assoc.abort()
        waited = time.monotonic() - started
        if waited >= dimse_timeout_s:  # an abort or a bad response would have ended it sooner
            why = f"no C-STORE response from {destination} within {dimse_timeout_s:g} s"
        else:
            why = (
                f"no C-STORE response from {destination}: association aborted by the peer, "
                "connection closed or invalid response"
            )
        return SendResult(
            item.sop_instance,
            None,
            f"{why}; the peer may have stored it; association ended",
            ambiguous=True,
        )
    code = int(status)
    if code_to_category(code) in ("Success", "Warning"):
        return SendResult(item.sop_instance, code, None)
    comment = rsp.get("ErrorComment")
    detail = f": {comment}" if comment else ""
    return SendResult(item.sop_instance, code, f"peer refused with status 0x{code:04X}{detail}")
