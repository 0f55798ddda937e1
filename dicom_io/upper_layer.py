"""The C-STORE receive fast path: pynetdicom 3.0.4 without its polling reactors on the hot path.

pynetdicom runs each association in two threads that poll each other. The DUL thread checks its
socket with select(0) and sleeps between checks, reads every PDU 4 KiB per recv() call, turns
each P-DATA into a DIMSE message through pydicom (the command set decoded into a Dataset, the
file meta of a received data set built and written element by element), and queues the
message; the association thread takes it on its next 1 ms tick, runs the handler, builds the
response through pydicom again and queues it; the DUL thread sends it on its next tick. Per
C-STORE that is two polls, two thread hand-offs (each a wake-up of a thread that must win the
GIL back) and a few thousand Python calls, most of them pydicom's: about 2.5 ms per instance with
a handler that does nothing (bench/RESULTS.md), against 3.4 ms for Orthanc's whole C-STORE.

The fast path keeps pynetdicom for everything but that hot path: association negotiation, PDU
decoding, the upper-layer state machine, release and abort, the service classes, events and
status validation, and every message other than a plain C-STORE request and its response. It
changes five things, each a narrow override of pynetdicom 3.0.4 (FAST_PATH_PYNETDICOM; with any
other release :func:`fast_path_available` is False and the listener runs pynetdicom unchanged,
since these overrides copy or depend on that release's internals):

- :class:`FastDUL`: the reactor waits for its socket in a blocking poll() instead of sleeping
  between polls, so a PDU is read the moment it arrives;
- :class:`FastSocket`: a PDU is read with recv_into() in as few calls as the kernel allows;
- :class:`LeanDIMSE`: a C-STORE request's command set is decoded by hand (a dozen fixed
  elements), its data set streamed into a file opened by :mod:`dicom_io.incoming` with the
  same file meta pynetdicom would write (byte for byte), and the request served in the DUL
  thread that completed it, by pynetdicom's own StorageServiceClass (events, handler, status
  validation). A plain success or failure response (a status, nothing else) is encoded by hand,
  byte for byte what pynetdicom would send, and sent by the same thread at once. What the
  answer need not wait for (dropping the file's incoming name, opening the next request's file)
  is done after it, while the peer reads it. Anything it does not recognise is replayed to
  pynetdicom's own message assembly unchanged;
- :class:`InlineRequests`: requests that pynetdicom assembled (C-ECHO, and C-STOREs the lean
  path declined) are served in the DUL thread too, instead of waiting for the association
  thread's next tick;
- :class:`FastAssociation`: the association thread, left with release, abort and the network
  timeout, sleeps until the DUL wakes it instead of polling every millisecond (each poll took
  the GIL from the thread doing the work).

Serving in the DUL thread changes no ordering: PS3.7 asynchronous operations are not negotiated,
so a peer has one request outstanding and sends nothing else on the association until the
response arrives.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import pynetdicom
from pydicom.uid import UID
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass, VerificationServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket
from pynetdicom.utils import make_target

from dicom_io import incoming as incoming_files
from dicom_io.uids import is_valid_uid

log = logging.getLogger("dicom_io.upper_layer")

# The pynetdicom release these overrides were written against and tested with.
FAST_PATH_PYNETDICOM = "3.0.4"
# The reactor's idle wait on its socket: data wakes it at once; this bounds only how late it
# notices primitives other threads queue (A-ASSOCIATE-AC, A-RELEASE-RP, A-ABORT).
IDLE_WAIT_S = 0.002
# The association thread's idle wait: it is woken whenever the DUL has something for it, so
# this bounds only how late it notices the network timeout.
ASSOCIATION_IDLE_WAIT_S = 0.05

_HAS_POLL = hasattr(select, "poll")
_COMMAND_ELEMENT = struct.Struct("<HHI")  # Implicit VR Little Endian: group, element, length
_US = struct.Struct("<H")
_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
# Command elements a C-STORE-RQ may carry (PS3.7 Table 9.3-1); any other: pynetdicom decodes.
_STORE_RQ_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030,
                                0x1031})  # fmt: skip


def fast_path_available() -> bool:
    return str(getattr(pynetdicom, "__version__", "")) == FAST_PATH_PYNETDICOM


def use_fast_path(assoc: Association) -> None:
    """Put a freshly created acceptor association (reactors not started) on the fast path.

    The providers keep all their state; only their classes change (and the DIMSE queue, still
    empty, is replaced), so nothing pynetdicom set up in them is lost."""
    assoc.__class__ = FastAssociation
    wake = cast(FastAssociation, assoc)._wake = threading.Event()
    dul = assoc.dul
    dimse = assoc.dimse
    dimse.__class__ = LeanDIMSE
    lean = cast(LeanDIMSE, dimse)
    lean._lean_init()
    dimse.msg_queue = InlineRequests(assoc)
    # Release or abort reaches the association thread through this queue; the spare file goes
    # first, so none is left once the peer sees the association end.
    dul.to_user_queue = _WakingQueue(wake, before=lean.discard_spare)
    dul.__class__ = FastDUL
    cast(FastDUL, dul)._reactor = make_target(dul.run_reactor)  # contextvars, as pynetdicom
    if dul.socket is not None:
        dul.socket.__class__ = FastSocket


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that wakes the association thread whenever something is put in it (after
    calling ``before``)."""

    def __init__(self, wake: threading.Event, before: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake
        self._before = before

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self._before()
        super().put(item, block, timeout)
        self._wake.set()


class FastAssociation(Association):
    """pynetdicom's acceptor association with its reactor woken instead of polling.

    The stock ``_run_reactor`` sleeps 1 ms between checks for messages, release and abort:
    1,000 wake-ups a second per association, each taking the GIL from the thread that is
    receiving. With requests served in the DUL thread, this thread only has to react to what
    the DUL hands it (release and abort primitives, requests not served there) and to the DUL
    ending, each of which sets ``_wake``. ``_run_reactor`` is Association._run_reactor of
    pynetdicom 3.0.4 with that one change (marked).
    """

    _wake: threading.Event

    def kill(self) -> None:
        self._wake.set()
        super().kill()

    def _run_reactor(self) -> None:
        from pynetdicom import association as _association

        logger = _association.LOGGER
        self._is_paused = False
        while not self._kill:
            self._wake.wait(ASSOCIATION_IDLE_WAIT_S)  # changed: was time.sleep(0.001)
            self._wake.clear()
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                logger.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                logger.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                logger.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class FastDUL(DULServiceProvider):
    """pynetdicom's DUL reactor with its idle sleep replaced by a wait on the socket.

    ``run_reactor`` is DULServiceProvider.run_reactor of pynetdicom 3.0.4, unchanged except for
    the line marked below: where the stock loop sleeps ``_run_loop_delay`` and then polls the
    socket, this one blocks in poll() until the socket is readable or IDLE_WAIT_S passes. An
    arriving PDU is read at once instead of after up to a poll period, and an idle association
    costs 500 wake-ups a second instead of 10,000.
    """

    _reactor: Callable[[], None]

    def run(self) -> None:
        """The thread's body: our reactor (the Thread's own target, bound when pynetdicom
        created the provider, is the stock one)."""
        try:
            self._reactor()
        finally:
            cast(FastAssociation, self.assoc)._wake.set()  # the association thread must know

    def _wait_readable(self, timeout: float) -> None:
        sock = getattr(self.socket, "socket", None)
        if sock is None or not getattr(self.socket, "_is_connected", False):
            time.sleep(timeout)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: poll() would not see them
        with contextlib.suppress(OSError, ValueError):  # closed: the next read finds out
            if _HAS_POLL:  # no limit on descriptor numbers, unlike select()
                poller = select.poll()
                poller.register(sock, select.POLLIN)
                poller.poll(timeout * 1000)
            else:  # pragma: no cover - platforms without poll()
                select.select([sock], [], [], timeout)

    def run_reactor(self) -> None:
        from pynetdicom import dul as _dul

        self._idle_timer.start()
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                self._wait_readable(IDLE_WAIT_S)  # changed: was time.sleep(self._run_loop_delay)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                _dul.LOGGER.error("Exception in DUL.run(), aborting association")
                _dul.LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                cast(AssociationSocket, self.socket).send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self.state_machine.do_action(event)
            sleep = False


class FastSocket(AssociationSocket):
    """Reads a PDU with recv_into() into one buffer (the stock recv() asks for 4 KiB a call and
    grows a bytearray: 32 calls for each 128 KiB P-DATA-TF)."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        buf = bytearray(nr_bytes)
        got = 0
        with memoryview(buf) as view:
            while got < nr_bytes:
                n = sock.recv_into(view[got:], nr_bytes - got)
                if not n:  # connection closed: return what arrived, as the stock recv() does
                    break
                got += n
        if got < nr_bytes:
            del buf[got:]
        return buf


def _uid_element(element: int, uid: str) -> bytes:
    """An Explicit VR Little Endian UI element of group 0002 (padded to even length)."""
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HH2sH", 0x0002, element, b"UI", len(value)) + value


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and file meta group as pynetdicom writes them for a received data set
    (dsutils.create_file_meta + pydicom's write_file_meta_info), byte for byte."""
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    if len(version) % 2:
        version += b" "
    body = b"".join(
        (
            struct.pack("<HH2s2xI", 0x0002, 0x0001, b"OB", 2) + b"\x00\x01",
            _uid_element(0x0002, sop_class_uid),
            _uid_element(0x0003, sop_instance_uid),
            _uid_element(0x0010, transfer_syntax),
            _uid_element(0x0012, str(PYNETDICOM_IMPLEMENTATION_UID)),
            struct.pack("<HH2sH", 0x0002, 0x0013, b"SH", len(version)) + version,
        )
    )
    length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + length + body


def _command_uid(value: bytes) -> bytes:
    return value + b"\0" if len(value) % 2 else value


def store_response_pdu(
    context_id: int, message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int
) -> bytes:
    """The P-DATA-TF PDU carrying a C-STORE-RSP with only a status, as pynetdicom encodes it
    (command set in Implicit VR Little Endian, elements in tag order, one last fragment)."""
    cls = _command_uid(sop_class_uid.encode("ascii"))
    inst = _command_uid(sop_instance_uid.encode("ascii"))
    body = b"".join(
        (
            _COMMAND_ELEMENT.pack(0, 0x0002, len(cls)) + cls,
            _COMMAND_ELEMENT.pack(0, 0x0100, 2) + _US.pack(_C_STORE_RSP),
            _COMMAND_ELEMENT.pack(0, 0x0120, 2) + _US.pack(message_id),
            _COMMAND_ELEMENT.pack(0, 0x0800, 2) + _US.pack(_NO_DATA_SET),
            _COMMAND_ELEMENT.pack(0, 0x0900, 2) + _US.pack(status),
            _COMMAND_ELEMENT.pack(0, 0x1000, len(inst)) + inst,
        )
    )
    command = _COMMAND_ELEMENT.pack(0, 0x0000, 4) + struct.pack("<I", len(body)) + body
    pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBI", 0x04, 0x00, len(pdv)) + pdv


def _decode_command(command: bytes) -> dict[int, bytes] | None:
    """The elements of an Implicit VR Little Endian command set, or None if malformed."""
    out: dict[int, bytes] = {}
    off, end = 0, len(command)
    while off < end:
        if off + 8 > end:
            return None
        group, element, length = _COMMAND_ELEMENT.unpack_from(command, off)
        off += 8
        if group != 0 or off + length > end:
            return None
        out[element] = command[off : off + length]
        off += length
    return out


def _us(value: bytes | None) -> int | None:
    return _US.unpack(value)[0] if value is not None and len(value) == 2 else None


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("ascii").rstrip("\0 ")
    except UnicodeDecodeError:
        return None


class _Store:
    """A C-STORE request whose data set is arriving."""

    __slots__ = ("context_id", "file", "request")

    def __init__(self, context_id: int, request: C_STORE, file: incoming_files.IncomingFile):
        self.context_id = context_id
        self.request = request
        self.file = file


class LeanDIMSE(DIMSEServiceProvider):
    """DIMSE message assembly with a lean path for C-STORE requests (see the module docstring).

    ``receive_primitive`` is called by the DUL thread for every P-DATA. Between messages it
    collects command fragments itself; a C-STORE request it can vouch for is received here, any
    other message is handed to pynetdicom's own ``receive_primitive`` (the command set replayed
    as one fragment, then everything after it) until that message is complete.
    """

    _command: bytearray
    _store: _Store | None
    _spare: incoming_files.IncomingFile | None
    _spare_lock: threading.Lock

    def _lean_init(self) -> None:
        self._command = bytearray()
        self._store = None
        self._spare = None  # the next request's file, opened while the peer was busy
        self._spare_lock = threading.Lock()

    def discard_spare(self) -> None:
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            _discard(spare)

    def _take_spare(self) -> incoming_files.IncomingFile:
        with self._spare_lock:
            spare, self._spare = self._spare, None
        return spare if spare is not None else incoming_files.open_incoming()

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.message is not None:  # pynetdicom is assembling a message: it gets the rest
            super().receive_primitive(primitive)
            return
        pdvs = primitive.presentation_data_value_list
        for i, (context_id, data) in enumerate(pdvs):
            if self.message is not None:  # handed over earlier in this P-DATA
                self._to_pynetdicom(pdvs[i:])
                return
            control = data[0]
            store = self._store
            if store is not None:
                if control & 1 or context_id != store.context_id:
                    self._protocol_error(
                        "command fragment inside a data set"
                        if control & 1
                        else "data set fragment on another presentation context"
                    )
                    return
                store.file.write(memoryview(data)[1:])
                if control & 2:
                    self._store = None
                    self._serve(store)
                    self._after_response(store)
                continue
            if not control & 1:  # a data set without its command: pynetdicom's to judge
                self._to_pynetdicom(pdvs[i:])
                return
            self._command += memoryview(data)[1:]
            if not control & 2:
                continue
            command = bytes(self._command)
            self._command = bytearray()
            self._store = self._begin_store(context_id, command)
            if self._store is None:  # not ours: replay the whole command set to pynetdicom
                self._to_pynetdicom([(context_id, b"\x03" + command), *pdvs[i + 1 :]])
                return

    def _to_pynetdicom(self, pdvs: list[Any]) -> None:
        rest = P_DATA()
        # Appended, not assigned: the setter accepts only lists, the PDU decoder makes tuples.
        rest.presentation_data_value_list.extend(pdvs)
        super().receive_primitive(rest)

    def _protocol_error(self, what: str) -> None:
        """What pynetdicom does with an invalid DIMSE message: Evt19, the association aborts."""
        log.error("invalid DIMSE message", extra={"fields": {"error": what}})
        self.discard_partial()
        self.dul.event_queue.put("Evt19")

    def _begin_store(self, context_id: int, command: bytes) -> _Store | None:
        """A _Store with its file opened and file meta written, or None to let pynetdicom
        handle the message (not a C-STORE-RQ, or anything unusual about it)."""
        assoc = self.assoc
        if not _config.STORE_RECV_CHUNKED_DATASET:  # handlers expect the data set in memory
            return None
        fields = _decode_command(command)
        if (
            fields is None
            or not fields.keys() <= _STORE_RQ_ELEMENTS
            or _us(fields.get(0x0100)) != _C_STORE_RQ
            or _us(fields.get(0x0800)) in (None, _NO_DATA_SET)
        ):
            return None
        context = assoc._accepted_cx.get(context_id)
        message_id = _us(fields.get(0x0110))
        priority = _us(fields.get(0x0700))
        sop_class = _text(fields.get(0x0002))
        sop_instance = _text(fields.get(0x1000))
        if (
            context is None
            or message_id is None
            or priority is None
            or not sop_class
            or not sop_instance
            or not is_valid_uid(sop_class)
            or not is_valid_uid(sop_instance)
        ):
            return None
        request = C_STORE()
        try:
            request.MessageID = message_id
            request.AffectedSOPClassUID = UID(sop_class)
            request.AffectedSOPInstanceUID = UID(sop_instance)
            request.Priority = priority
            if 0x1030 in fields:
                request.MoveOriginatorApplicationEntityTitle = _text(fields[0x1030])
            if 0x1031 in fields:
                request.MoveOriginatorMessageID = _us(fields[0x1031])
            request.DataSet = BytesIO()  # empty, as pynetdicom leaves it for chunked receive
        except (ValueError, TypeError):
            return None
        if not request.is_valid_request or not _is_storage(assoc, sop_class):
            return None
        syntax = str(context.transfer_syntax[0])
        file = self._take_spare()
        file.write(file_meta(sop_class, sop_instance, syntax))
        request._context_id = context_id
        request._dataset_path = Path(file.name)
        # Left unset, so that StorageServiceClass does not remove the file's incoming name
        # before answering: _after_response does, once the answer is out.
        request._dataset_file = None
        return _Store(context_id, request, file)

    def _after_response(self, store: _Store) -> None:
        """Work the answer did not need to wait for, done while the peer reads it: drop the
        file's incoming name (the spool has linked it, see dicom_io.spool.durable_link) and
        open the next request's file."""
        store.file.close()
        incoming_files.claim(store.file.name)
        with contextlib.suppress(OSError):
            Path(store.file.name).unlink(missing_ok=True)
        if self.assoc.is_established:
            spare = incoming_files.open_incoming()
            with self._spare_lock:
                self._spare, old = spare, self._spare
            if old is not None:
                _discard(old)
            if not self.assoc.is_established:  # it ended meanwhile: nothing may stay behind
                self.discard_spare()

    def discard_partial(self) -> None:
        """Drop a data set cut off by the end of the association (abort, lost connection): its
        file is closed and removed (the stock path leaves such files to the next start), and
        so is the spare."""
        store, self._store = self._store, None
        if store is not None:
            _discard(store.file)
        self.discard_spare()

    def _serve(self, store: _Store) -> None:
        """Serve a received C-STORE as Association._serve_request would, in this thread."""
        assoc = self.assoc
        context = assoc._accepted_cx.get(store.context_id)
        if assoc._sent_release or not assoc.is_established or context is None:
            _discard(store.file)
            return
        _serve_in_dul(assoc, StorageServiceClass(assoc), store.request, context)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """A response with only a status goes out at once when the DUL thread sends it;
        everything else takes pynetdicom's way (encoded by pydicom, queued for the reactor)."""
        if (
            threading.current_thread() is self.dul
            and type(primitive) is C_STORE
            and primitive.MessageIDBeingRespondedTo is not None
            and isinstance(primitive.Status, int)
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and primitive.AffectedSOPClassUID
            and primitive.AffectedSOPInstanceUID
        ):
            pdu = store_response_pdu(
                context_id,
                primitive.MessageIDBeingRespondedTo,
                str(primitive.AffectedSOPClassUID),
                str(primitive.AffectedSOPInstanceUID),
                primitive.Status,
            )
            limit = self.maximum_pdu_size
            sock = self.dul.socket
            if sock is not None and (not limit or len(pdu) - 6 <= limit):
                sock.send(pdu)
                return
        super().send_msg(primitive, context_id)


def _discard(file: incoming_files.IncomingFile) -> None:
    file.close()
    incoming_files.claim(file.name)
    Path(file.name).unlink(missing_ok=True)


def _is_storage(assoc: Association, sop_class: str) -> bool:
    """Whether Association._serve_request would hand this SOP class to the Storage service
    (else the lean path declines and pynetdicom decides, e.g. aborts for an unknown class)."""
    if _config.UNRESTRICTED_STORAGE_SERVICE:
        return True
    extended = assoc.acceptor.accepted_common_extended.get(UID(sop_class))
    service_uid = extended[0] if extended else sop_class
    return uid_to_service_class(service_uid) is StorageServiceClass


def _serve_in_dul(assoc: Association, service: Any, request: Any, context: Any) -> None:
    try:
        service.SCP(request, context)
    except Exception:
        # As Association._serve_request does: log and abort. abort() waits for the DUL thread
        # (this one) to wind down, so it runs in a thread of its own.
        log.exception("serving a request failed; aborting the association")
        threading.Thread(target=assoc.abort, name="abort", daemon=True).start()


class InlineRequests(queue.Queue):  # type: ignore[type-arg]
    """The DIMSE message queue: C-STORE and C-ECHO requests that pynetdicom assembled in the
    DUL thread are served right there instead of waiting for the association thread's next
    tick; anything else (and anything put from another thread) is queued as before.

    Serving mirrors Association._serve_request for these two services: the same service
    classes run. A request it does not serve here (unknown context, release in progress) goes
    to the queue and the association thread deals with it exactly as pynetdicom would.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__()
        self._assoc = assoc

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if threading.current_thread() is self._assoc.dul and self._serve(*item):
            return
        super().put(item, block, timeout)
        cast(FastAssociation, self._assoc)._wake.set()

    def _serve(self, context_id: int | None, msg: Any) -> bool:
        assoc = self._assoc
        if context_id is None or not isinstance(msg, (C_STORE, C_ECHO)):
            return False
        if assoc._sent_release or not assoc.is_established or not msg.is_valid_request:
            return False
        context = assoc._accepted_cx.get(context_id)
        if context is None:
            return False
        service: Any = (
            StorageServiceClass(assoc)
            if isinstance(msg, C_STORE)
            else VerificationServiceClass(assoc)
        )
        _serve_in_dul(assoc, service, msg, context)
        return True
