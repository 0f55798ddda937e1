"""The node's HTTP side: /healthz, /readyz, /metrics, the status page at / and its thumbnails.

One stdlib ``ThreadingHTTPServer`` in a daemon thread: a handful of requests a minute from an
orchestrator, Prometheus and an operator's browser need no framework, and nothing here may slow
the listeners. Everything is read-only (GET and HEAD; anything else is 405).

* ``/healthz`` says the process is alive and serving; orchestrators restart it when it is not.
  It is never behind the password, so a liveness probe needs no secret.
* ``/readyz`` says whether the node can do its work: the database answers, the broker accepts a
  connection, the model bundle is there (and the embedded worker runs). 503 names what failed,
  so a load balancer stops sending and an operator sees why. Checks run in parallel, each
  bounded by a timeout, so a hung dependency makes the probe fail, not hang.
* Binds loopback by default; ``http_password`` puts HTTP Basic auth on every other path.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import text

from radfinder_node.database import Database
from radfinder_node.jobs import BundleMissingError, read_bundle_ref
from radfinder_node.metrics import NodeMetrics
from radfinder_node.status_page import render_status_page
from radfinder_node.status_snapshot import take_snapshot
from radfinder_node.thumbnails import ThumbnailError, Thumbnails

if TYPE_CHECKING:
    from celery import Celery  # type: ignore[import-untyped]

    from radfinder_node.config import Settings
    from radfinder_node.node import Node

log = logging.getLogger("radfinder_node.web")

# A check returns None when fine, else the reason it is not; raising counts as not fine.
Check = Callable[[], str | None]
CHECK_TIMEOUT_S = 3.0
_CSP = (
    "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    seconds: float


# ------------------------------------------------------------------------------ checks


def database_check(db: Database) -> Check:
    def check() -> str | None:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None

    return check


def broker_check(app: Celery, timeout_s: float = CHECK_TIMEOUT_S) -> Check:
    """Open (and close) a fresh broker connection: the pooled one may look alive while the
    broker is gone, which is exactly what readiness must notice."""

    def check() -> str | None:
        conn = app.connection_for_write(connect_timeout=timeout_s)
        try:
            conn.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=timeout_s
            )
            conn.default_channel  # noqa: B018 - Redis and AMQP talk to the server here
        finally:
            conn.release()
        return None

    return check


def engine_check(bundle_path: Path, worker_alive: Callable[[], bool] | None) -> Check:
    """The bundle must be readable; a node that runs its own worker needs that worker alive.
    The engine itself loads on the first job (seconds of work that a probe must not do)."""

    def check() -> str | None:
        try:
            ref = read_bundle_ref(bundle_path)
        except BundleMissingError as exc:
            return str(exc)
        if worker_alive is not None and not worker_alive():
            return f"embedded worker for {ref.name} {ref.version} is not running"
        return None

    return check


class Readiness:
    """Runs named checks in parallel, each bounded by ``timeout_s``."""

    def __init__(self, checks: Mapping[str, Check], timeout_s: float = CHECK_TIMEOUT_S) -> None:
        self.checks = dict(checks)
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, 2 * len(self.checks)), thread_name_prefix="readyz"
        )

    def run(self) -> list[CheckResult]:
        t0 = time.perf_counter()
        futures = {name: self._pool.submit(_timed, check) for name, check in self.checks.items()}
        results = []
        for name, future in futures.items():
            left = max(0.0, self.timeout_s - (time.perf_counter() - t0))
            try:
                reason, seconds = future.result(timeout=left)
            except FutureTimeout:
                reason, seconds = f"no answer within {self.timeout_s:g} s", self.timeout_s
            results.append(CheckResult(name, reason is None, reason or "ok", round(seconds, 4)))
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _timed(check: Check) -> tuple[str | None, float]:
    t0 = time.perf_counter()
    try:
        reason = check()
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".strip()[:500]
    return reason, time.perf_counter() - t0


# ------------------------------------------------------------------------------ server


@dataclass
class WebApp:
    """What the handler serves; each part optional so a worker can serve only /metrics."""

    metrics: NodeMetrics
    readiness: Readiness | None = None
    page: Callable[[], str] | None = None
    thumbnails: Thumbnails | None = None
    password: str | None = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: WebApp) -> None:
        self.app = app
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "radfinder-node"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection is closed, not held by a thread forever

    # -- plumbing ---------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(
            "http request",
            extra={"fields": {"peer": self.client_address[0], "line": format % args}},
        )

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, status: int, message: str) -> None:
        self._send(
            status,
            (message + "\n").encode(),
            "text/plain; charset=utf-8",
            {"Cache-Control": "no-store"},
        )

    def _json(self, status: int, payload: object) -> None:
        body = json.dumps(payload, indent=2).encode()
        self._send(status, body, "application/json", {"Cache-Control": "no-store"})

    def _authorized(self) -> bool:
        password = self.server.app.password
        if not password:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        _user, sep, given = decoded.partition(":")
        return bool(sep) and hmac.compare_digest(given.encode(), password.encode())

    # -- methods ----------------------------------------------------------------------------

    def do_GET(self) -> None:
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:
            log.exception("http handler failed", extra={"fields": {"path": self.path[:200]}})
            with contextlib.suppress(OSError):
                self._text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the node log")

    do_HEAD = do_GET

    def _read_only(self) -> None:
        self._send(
            HTTPStatus.METHOD_NOT_ALLOWED,
            b"read-only: GET and HEAD only\n",
            "text/plain; charset=utf-8",
            {"Allow": "GET, HEAD"},
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _read_only

    def _route(self) -> None:
        path = urlsplit(self.path).path
        app = self.server.app
        if path == "/healthz":
            self._json(HTTPStatus.OK, {"status": "alive"})
            return
        if not self._authorized():
            self._send(
                HTTPStatus.UNAUTHORIZED,
                b"authentication required\n",
                "text/plain; charset=utf-8",
                {"WWW-Authenticate": 'Basic realm="radfinder-node", charset="UTF-8"'},
            )
            return
        if path == "/readyz" and app.readiness is not None:
            results = app.readiness.run()
            ready = all(r.ok for r in results)
            self._json(
                HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                {
                    "ready": ready,
                    "checks": {r.name: dataclasses.asdict(r) for r in results},
                    "failed": [f"{r.name}: {r.detail}" for r in results if not r.ok],
                },
            )
        elif path == "/metrics":
            self._send(HTTPStatus.OK, app.metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path in ("/", "/index.html") and app.page is not None:
            self._send(
                HTTPStatus.OK,
                app.page().encode("utf-8"),
                "text/html; charset=utf-8",
                {
                    "Cache-Control": "no-store",
                    "Content-Security-Policy": _CSP,
                    "X-Frame-Options": "DENY",
                },
            )
        elif path.startswith("/thumb/") and path.endswith(".png") and app.thumbnails:
            sop_uid = unquote(path[len("/thumb/") : -len(".png")])
            try:
                png = app.thumbnails.png(sop_uid)
            except ThumbnailError as exc:
                self._text(exc.status, str(exc))
                return
            self._send(
                HTTPStatus.OK,
                png,
                "image/png",
                {"Cache-Control": "private, max-age=86400, immutable"},
            )
        else:
            self._text(HTTPStatus.NOT_FOUND, f"no such page: {path[:200]}")


class WebServer:
    """The HTTP server thread; ``start`` returns the bound port."""

    def __init__(self, app: WebApp) -> None:
        self.app = app
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self.host: str | None = None

    def start(self, host: str, port: int) -> int:
        self._server = _Server((host, port), self.app)
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="http",
            daemon=True,
        )
        self._thread.start()
        log.info(
            "http server started",
            extra={"fields": {"host": host, "port": self.port, "auth": bool(self.app.password)}},
        )
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.app.readiness is not None:
            self.app.readiness.close()


# ------------------------------------------------------------------------------ wiring


def node_web_app(node: Node) -> WebApp:
    """The node's checks, page and thumbnails over its own database, metrics and broker."""
    s = node.settings
    worker_alive = None
    if s.embedded_worker and node.bundle_ref is not None:

        def worker_alive() -> bool:
            return node.worker is not None and node.worker.alive

    def listeners() -> str | None:
        down = [
            name
            for name, port, on in (
                ("dicom", node.port, True),
                ("hl7", node.hl7_port, s.hl7_enabled),
            )
            if on and port is None
        ]
        return f"not listening: {', '.join(down)}" if down else None

    readiness = Readiness(
        {
            "database": database_check(node.db),
            "broker": broker_check(node.celery),
            "engine": engine_check(s.bundle_path, worker_alive),
            "listeners": listeners,
        }
    )

    def page() -> str:
        snapshot = take_snapshot(node.db)
        acks = {
            sample.labels["ack"]: int(sample.value)
            for family in node.metrics.hl7_messages.collect()
            for sample in family.samples
            if sample.name.endswith("_total")
        }
        snapshot = dataclasses.replace(snapshot, engine=node.metrics.engine_labels(), hl7_acks=acks)
        return render_status_page(snapshot, title=f"radfinder-node {s.ae_title}")

    return WebApp(
        metrics=node.metrics,
        readiness=readiness,
        page=page,
        thumbnails=Thumbnails(node.db, s.spool_dir),
        password=s.http_password.get_secret_value() if s.http_password else None,
    )


def serve_worker_metrics(settings: Settings, port: int) -> WebServer:
    """A standalone worker's own /metrics (its job stage times, its engine) and /healthz, on
    the configured HTTP host and password; the node serves the shared database states."""
    from radfinder_node.metrics import process_metrics

    app = WebApp(
        metrics=process_metrics(),
        password=settings.http_password.get_secret_value() if settings.http_password else None,
    )
    server = WebServer(app)
    server.start(settings.http_host, port)
    return server
