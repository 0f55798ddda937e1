"""The HL7 listener: MLLP over asyncio, reports committed before they are acknowledged.

Interface engines keep one TCP connection open for days and send message after message, each
waiting for its ACK; hl7apy's own MLLP server closes after every message, so the transport is
a plain asyncio server. Messages of one connection are handled strictly in order (the ACK order
is the protocol); connections run in parallel. The database work is blocking SQLAlchemy, so it
runs in a small thread pool while the event loop keeps reading other connections.

The acknowledgement rules (DESIGN.md §6):

- AA only after the report's transaction committed. A crash before that leaves the sender
  without an ACK; it resends, and the (sending facility, MSH-10) key makes the resend a no-op
  if the first copy had committed after all.
- AE (content) or AR (unsupported) with the reason in MSA-3 and ERR for malformed messages and
  reports that cannot be linked; their bytes go to quarantine with the reason first.
- AR 207 without quarantine when we could not store a good message (database down): the
  message is fine, the sender should retry.
- Other message types (ADT, ORM, OMI, SIU, ...) get AA in their own trigger event and are
  ignored; an ACK sent to us is never answered (no ACK ping-pong).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from dicom_io.spool import Quarantine, atomic_write
from dicom_io.tls import subject_common_name
from radfinder_node.database import Database
from radfinder_node.linking import ControlIdReusedError, store_report, unlinkable_reason
from radfinder_node.metrics import NodeMetrics
from radfinder_node.models import QuarantinedObject
from radfinder_node.timeutil import utcnow
from reports.hl7_parse import (
    AckCode,
    ErrorCode,
    Header,
    HL7Error,
    ack_wanted,
    build_ack,
    parse_message,
    read_header,
)
from reports.mllp import Discarded, Frame, FrameDecoder, frame

log = logging.getLogger("radfinder_node.hl7")

_READ_CHUNK = 256 * 1024
TLS_HANDSHAKE_TIMEOUT_S = 10.0


class ReportReceiver:
    """One message in, the ACK to send out (or None): parse, quarantine or store, answer."""

    def __init__(
        self,
        db: Database,
        quarantine: Quarantine,
        *,
        accession_field: str = "OBR-18",
        on_stored: Callable[[], None] | None = None,
        application: str = "RADFINDER",
        durable: bool = True,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.db = db
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self.durable = durable
        self.quarantine = quarantine
        self.accession_field = accession_field
        self.on_stored = on_stored
        self.application = application
        self._prefix = secrets.token_hex(3).upper()
        self._counter = itertools.count(1)

    def _control_id(self) -> str:
        return f"RF{self._prefix}{next(self._counter):012d}"  # <= 20 chars (ST in 2.3-2.5.1)

    def _ack(
        self, header: Header | None, code: AckCode, error: HL7Error | None = None
    ) -> bytes | None:
        self.metrics.hl7_answered(code)  # each message reaches here once, with its decision
        if not ack_wanted(header, code == "AA"):
            return None
        return build_ack(
            header,
            code,
            control_id=self._control_id(),
            now=utcnow(),
            error=error,
            application=self.application,
            facility=self.application,
        )

    def receive(self, raw: bytes, peer: str) -> bytes | None:
        try:
            return self._receive(raw, peer)
        except Exception:  # a bug must not kill the connection or lose the message silently
            log.exception("hl7 message handling failed", extra={"fields": {"peer": peer}})
            error = HL7Error(
                "internal error while handling the message; resend later",
                ErrorCode.APPLICATION_INTERNAL_ERROR,
                "AR",
            )
            return self._ack(_header_or_none(raw), "AR", error)

    def _receive(self, raw: bytes, peer: str) -> bytes | None:
        try:
            message = parse_message(raw)
        except HL7Error as exc:
            return self._reject(raw, exc, peer)
        header = message.header
        fields = {
            "peer": peer,
            "type": f"{header.message_type}^{header.trigger_event}",
            "control_id": header.control_id,
            "sending_facility": header.sending_facility,
            "version": header.version,
        }
        if header.message_type == "ACK":
            log.info("hl7 ACK received and not answered", extra={"fields": fields})
            self.metrics.hl7_answered(None)
            return None
        report = message.report
        if report is None:
            log.info("hl7 message acknowledged and ignored", extra={"fields": fields})
            return self._ack(header, "AA")
        reason = unlinkable_reason(report, self.accession_field)
        if reason is not None:
            location = "OBR^1^3" if self.accession_field == "OBR-3" else "OBR^1^18"
            error = HL7Error(
                reason, ErrorCode.REQUIRED_FIELD_MISSING, header=header, location=location
            )
            return self._reject(raw, error, peer)
        try:
            outcome = store_report(
                self.db,
                message,
                raw,
                accession_field=self.accession_field,
                peer=peer,
                durable=self.durable,
            )
        except ControlIdReusedError as exc:
            error = HL7Error(str(exc), ErrorCode.DUPLICATE_KEY, header=header, location="MSH^1^10")
            return self._reject(raw, error, peer)
        except Exception:
            log.exception("report could not be stored", extra={"fields": fields})
            error = HL7Error(
                "the report could not be stored; resend later",
                ErrorCode.APPLICATION_INTERNAL_ERROR,
                "AR",
                header=header,
            )
            return self._ack(header, "AR", error)
        log.info(
            "report duplicate acknowledged" if outcome.duplicate else "report stored",
            extra={
                "fields": {
                    **fields,
                    "report_id": outcome.report_id,
                    "state": outcome.state.value,
                    "study_id": outcome.study_id,
                    "superseded": list(outcome.superseded),
                    "minable": report.text is not None,
                }
            },
        )
        if not outcome.duplicate and self.on_stored is not None:
            self.on_stored()
        return self._ack(header, "AA")

    def _reject(self, raw: bytes, error: HL7Error, peer: str) -> bytes | None:
        """Quarantine first, then AE/AR; if even quarantine fails, AR so the sender retries."""
        header = error.header
        try:
            self._quarantine(raw, error, peer)
        except Exception:
            log.exception("hl7 quarantine failed", extra={"fields": {"peer": peer}})
            retry = HL7Error(
                "the message could not be kept; resend later",
                ErrorCode.APPLICATION_INTERNAL_ERROR,
                "AR",
                header=header,
            )
            return self._ack(header, "AR", retry)
        log.warning(
            "hl7 message rejected",
            extra={
                "fields": {
                    "peer": peer,
                    "ack": error.ack,
                    "code": int(error.code),
                    "reason": error.reason,
                    "control_id": header.control_id if header else None,
                    "sending_facility": header.sending_facility if header else None,
                }
            },
        )
        return self._ack(header, error.ack, error)

    def _quarantine(self, raw: bytes, error: HL7Error, peer: str) -> None:
        header = error.header
        tmp = self.quarantine.root / ".hl7-incoming" / f"{secrets.token_hex(8)}.hl7"
        atomic_write(tmp, raw, fsync=self.quarantine.fsync)
        rel = self.quarantine.adopt(
            tmp,
            error.reason,
            kind="hl7",
            peer=peer,
            hl7_error_code=int(error.code),
            ack=error.ack,
            control_id=header.control_id if header else None,
            sending_facility=header.sending_facility if header else None,
        )
        with self.db.transaction() as session:
            session.add(
                QuarantinedObject(
                    kind="hl7",
                    reason=error.reason,
                    path=str(rel),
                    size_bytes=len(raw),
                    sop_uid=None,
                    calling_ae=None,
                    peer=peer[:64],
                    status=int(error.code),
                    received_at=utcnow(),
                )
            )

    def discarded(self, item: Discarded, peer: str) -> bytes | None:
        """Bytes the framer could not deliver: answer oversized messages, log the rest."""
        fields = {"peer": peer, "reason": item.reason, "bytes": item.size}
        if item.reason.startswith("frame of"):
            header = _header_or_none(item.head)
            error = HL7Error(
                f"message of {item.size} bytes exceeds the limit of this node",
                ErrorCode.APPLICATION_INTERNAL_ERROR,
                "AE",
                header=header,
            )
            return self._reject(item.head, error, peer)
        if item.head.strip(b" \t\r\n\x00"):
            log.warning("hl7 bytes discarded", extra={"fields": fields})
        else:
            log.debug("whitespace between hl7 frames", extra={"fields": fields})
        return None


def _header_or_none(raw: bytes) -> Header | None:
    try:
        return read_header(raw)
    except HL7Error as exc:
        return exc.header
    except Exception:
        return None


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


class HL7Listener:
    """asyncio MLLP server in its own thread; ``start`` returns the bound port."""

    def __init__(
        self,
        receiver: ReportReceiver,
        *,
        max_message_bytes: int = 32 * 1024 * 1024,
        idle_timeout_s: float = 0,
        workers: int = 4,
    ) -> None:
        self.receiver = receiver
        self.max_message_bytes = max_message_bytes
        self.idle_timeout_s = idle_timeout_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hl7-db")
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self.port: int | None = None
        self._tls: ssl.SSLContext | None = None

    @property
    def connections(self) -> int:
        return len(self._connections)

    def start(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None) -> int:
        """With ``ssl_context`` every connection is MLLP over TLS (client certificates checked
        as the context says, see :func:`dicom_io.tls.server_context`)."""
        self._tls = ssl_context
        self._thread = threading.Thread(
            target=self._run, args=(host, port), name="hl7-listener", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("HL7 listener did not start within 30 s")
        if self._error is not None:
            raise self._error
        assert self.port is not None
        return self.port

    def stop(self, timeout: float = 10.0) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=True)  # a transaction in flight finishes; its ACK is not sent

    def _run(self, host: str, port: int) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main(host, port))
        except BaseException as exc:  # pragma: no cover - reported through start()
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _main(self, host: str, port: int) -> None:
        self._stopping = asyncio.Event()
        try:
            server = await asyncio.start_server(
                self._serve, host, port, reuse_address=True, limit=_READ_CHUNK
            )
        except OSError as exc:
            self._error = OSError(exc.errno, f"HL7 listener cannot bind {host}:{port}: {exc}")
            self._ready.set()
            return
        self.port = int(server.sockets[0].getsockname()[1])
        log.info("hl7 listener started", extra={"fields": {"host": host, "port": self.port}})
        self._ready.set()
        async with server:
            await self._stopping.wait()
            server.close()
            # Closing the transports ends each connection at its next read; a message being
            # stored finishes (it was not acknowledged, the sender resends it).
            for writer in self._connections.values():
                writer.close()
            if self._connections:
                _, late = await asyncio.wait(list(self._connections), timeout=5)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        log.info("hl7 listener stopped")

    async def _start_tls(self, writer: asyncio.StreamWriter, peer: str) -> bool:
        """Upgrade before the first byte is read; the handshake is bounded and a failure (no
        or untrusted client certificate, plain MLLP to a TLS port) is logged with the peer,
        which asyncio's own TLS server would drop silently."""
        assert self._tls is not None
        try:
            await writer.start_tls(self._tls, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            log.warning(
                "hl7 tls handshake failed", extra={"fields": {"peer": peer, "error": str(exc)}}
            )
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return False
        subject = subject_common_name(writer.get_extra_info("peercert"))
        log.info("hl7 tls established", extra={"fields": {"peer": peer, "client": subject}})
        return True

    async def _read(self, reader: asyncio.StreamReader) -> bytes:
        if self.idle_timeout_s > 0:
            return await asyncio.wait_for(reader.read(_READ_CHUNK), self.idle_timeout_s)
        return await reader.read(_READ_CHUNK)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        peer = _peer_name(writer)
        if self._tls is not None and not await self._start_tls(writer, peer):
            self._connections.pop(task, None)
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        decoder = FrameDecoder(self.max_message_bytes)
        loop = asyncio.get_running_loop()
        messages = 0
        log.info("hl7 connection opened", extra={"fields": {"peer": peer}})
        try:
            while True:
                data = await self._read(reader)
                items = decoder.feed(data) if data else decoder.close()
                for item in items:
                    reply = await loop.run_in_executor(self._pool, self._handle, item, peer)
                    if isinstance(item, Frame):
                        messages += 1
                    if reply is not None and not writer.is_closing():
                        writer.write(frame(reply))
                        await writer.drain()
                if not data:
                    break
        except TimeoutError:
            log.info("hl7 connection idle, closing", extra={"fields": {"peer": peer}})
        except asyncio.CancelledError:
            # Only stop() cancels, after a grace period; ending quietly keeps asyncio from
            # logging the cancelled handler as an error.
            log.info("hl7 connection cancelled at shutdown", extra={"fields": {"peer": peer}})
        except (ConnectionError, OSError) as exc:
            log.info("hl7 connection lost", extra={"fields": {"peer": peer, "error": str(exc)}})
        finally:
            if decoder.buffered:
                log.warning(
                    "hl7 connection closed mid-message; it was not acknowledged",
                    extra={"fields": {"peer": peer, "bytes": decoder.buffered}},
                )
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._connections.pop(task, None)
            log.info(
                "hl7 connection closed", extra={"fields": {"peer": peer, "messages": messages}}
            )

    def _handle(self, item: Frame | Discarded, peer: str) -> bytes | None:
        if isinstance(item, Frame):
            return self.receiver.receive(item.data, peer)
        return self.receiver.discarded(item, peer)
