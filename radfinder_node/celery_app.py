"""The Celery app: one queue of inference jobs, configured for GPU workers.

Settings that matter and why:

* ``-P solo``, concurrency 1: CUDA contexts do not survive ``fork``, and one GPU runs one volume
  at a time anyway; more throughput means more worker processes, one per GPU.
* prefetch multiplier 1 and late acks (``acks_late`` + ``reject_on_worker_lost``): a worker
  holds at most the message it is running, and a message is acknowledged only after the job's
  outcome is committed, so a killed worker's message goes back to the broker instead of being
  lost with it.
* visibility timeout (Redis) of twice the longest job: Redis redelivers an unacked message after
  it, so a shorter one would hand a still-running job to a second worker.

The database, not the broker, holds each job's state; a message only says "look at job N".

Embedded default: kombu's SQLAlchemy transport on a SQLite file under the data directory,
through :class:`EmbeddedSqlTransport`. SQLite commits are fsynced and atomic, so a queued
message survives a crash or a power cut; kombu's filesystem transport writes message files
without fsync and loses whatever the page cache held. The subclass deletes a message when it is
delivered (the stock transport only hides it, so the table grows forever and a hidden message
is never shown again either way), waits on SQLite's lock instead of failing, and polls at
``broker_poll_s``. A delivered message whose worker died is lost in both cases; the reconciler
finds its job by state and sends it again.
"""

from __future__ import annotations

import logging
import threading
from json import loads
from pathlib import Path
from queue import Empty
from typing import TYPE_CHECKING, Any

import kombu.transport.sqlalchemy as kombu_sqla
from celery import Celery, bootsteps  # type: ignore[import-untyped]
from celery.worker import WorkController  # type: ignore[import-untyped]
from kombu.utils.encoding import bytes_to_str
from sqlalchemy import Engine, create_engine, make_url, text

from radfinder_node.config import Settings

if TYPE_CHECKING:
    from radfinder_node.database import Database

log = logging.getLogger("radfinder_node.celery")

TASK_INFER = "radfinder.infer"
EMBEDDED_TRANSPORT = "radfinder_node.celery_app:EmbeddedSqlTransport"
# Celery gives a task the OS host name, not the worker's node name; a solo worker runs its
# tasks in its own thread, so the thread knows which worker it is.
_identity = threading.local()
_ENGINE_OPTIONS = ("connect_args", "pool_size", "max_overflow", "pool_recycle", "pool_pre_ping")


class _EmbeddedChannel(kombu_sqla.Channel):
    def _engine_from_config(self) -> Engine:
        conninfo = self.connection.client
        options = {k: v for k, v in conninfo.transport_options.items() if k in _ENGINE_OPTIONS}
        url = str(conninfo.hostname)
        if url.startswith("sqlite"):
            database = make_url(url).database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            args = dict(options.pop("connect_args", {}))
            args.setdefault("timeout", 60)
            args.setdefault("check_same_thread", False)
            options["connect_args"] = args
        return create_engine(url, **options)

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        """Take the oldest visible message and delete it in the same transaction."""
        obj = self._get_or_create(queue)  # type: ignore[no-untyped-call]
        session = self.session
        if session.bind.name == "sqlite":
            session.execute(text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            msg = (
                session.query(self.message_cls)
                .with_for_update()
                .filter(self.message_cls.queue_id == obj.id)
                .filter(self.message_cls.visible.is_not(False))
                .order_by(self.message_cls.sent_at)
                .order_by(self.message_cls.id)
                .limit(1)
                .first()
            )
            if msg is None:
                raise Empty()
            payload = loads(bytes_to_str(msg.payload))  # type: ignore[no-untyped-call]
            session.delete(msg)
            return payload
        finally:
            session.commit()


class EmbeddedSqlTransport(kombu_sqla.Transport):
    """kombu's SQLAlchemy transport with the embedded-mode changes described above."""

    Channel = _EmbeddedChannel


def broker_connection(url: str) -> tuple[str, str | None]:
    """``(broker_url, broker_transport)``: ``sqla+sqlite:`` URLs use the embedded transport.

    Only SQLite is rewritten: other ``sqla+`` URLs keep kombu's transport, whose URL handling
    (``sqla+postgresql+psycopg://``) a transport override would break.
    """
    if url.startswith("sqla+sqlite:"):
        return url.removeprefix("sqla+"), EMBEDDED_TRANSPORT
    return url, None


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (pure; see the module docstring)."""
    url, transport = broker_connection(settings.effective_broker_url)
    # kombu's stock sqla transport hands every option to create_engine, so it gets none.
    options: dict[str, Any] = {}
    if transport is not None:
        options["polling_interval"] = settings.broker_poll_s
    elif url.startswith(("redis", "rediss", "sentinel", "sqs")):
        options["visibility_timeout"] = settings.visibility_timeout_s
    config: dict[str, Any] = {
        "broker_url": url,
        "broker_transport_options": options,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.queue,
        "task_routes": {TASK_INFER: {"queue": settings.queue}},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "worker_pool": "solo",
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": settings.result_backend is None,
        "enable_utc": True,
    }
    if transport is not None:
        config["broker_transport"] = transport
    if settings.result_backend:
        config["result_backend"] = settings.result_backend
    return config


def create_app(settings: Settings, db: Database | None = None) -> Celery:
    """A Celery app with the inference task bound to ``settings`` (and ``db`` when given).

    Each app carries its own task context, so a node and a test's second app in the same
    process never share a database handle by accident.
    """
    from radfinder_node.export_schedule import register_export
    from radfinder_node.tasks import register_tasks

    app = Celery("radfinder_node", set_as_current=False)
    app.config_from_object(celery_config(settings))
    register_tasks(app, settings, db)
    register_export(app, settings, db)  # the nightly retraining export and its beat schedule
    return app


def current_worker_name() -> str | None:
    """Node name of the worker running in this thread (``gpu0@host``), if one is."""
    name = getattr(_identity, "name", None)
    return name if isinstance(name, str) else None


def send_infer(app: Celery, job_id: int, *, countdown: float = 0.0) -> str:
    """Publish one "run job N" message (to run no sooner than ``countdown`` s); its task id."""
    result = app.send_task(
        TASK_INFER,
        args=[job_id],
        queue=app.conf.task_default_queue,
        countdown=countdown or None,
    )
    return str(result.id)


class EmbeddedWorker:
    """A solo-pool Celery worker in a thread of the node process (``serve`` needs no other).

    Stopping closes the consumer's loop (it returns within the 2 s drain timeout, after the
    job in hand, since a solo worker runs the job in this same thread) and then shuts the
    worker down in its own thread; no process-wide flag is touched, so other workers in the
    process keep running.
    """

    def __init__(self, app: Celery, *, queue: str, hostname: str) -> None:
        self.hostname = hostname
        self._app = app
        self._ready = threading.Event()
        self._worker = WorkController(
            app=app,
            hostname=hostname,
            pool="solo",
            concurrency=1,
            queues=[queue],
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            ready_callback=self._on_ready,
        )
        self._thread = threading.Thread(target=self._run, name="inference-worker", daemon=True)

    def _on_ready(self, consumer: Any) -> None:
        """Runs in the worker's thread as its loop starts. An event loop (amqp, Redis) may
        sleep in poll for many seconds with nothing scheduled; a 1 s tick bounds how long it
        takes to notice ``stop``."""
        hub = getattr(consumer, "hub", None)
        if hub is not None:
            hub.call_repeatedly(1.0, lambda: None)
        self._ready.set()

    def _run(self) -> None:
        # The solo pool looks tasks up in the thread's current app; make it this one (the
        # setting is thread-local, so other apps in the process are untouched).
        self._app.set_current()
        _identity.name = self.hostname
        try:
            self._worker.start()
        except Exception:
            log.exception("embedded worker stopped with an error")
        finally:
            self._worker.stop(in_sighandler=False)

    def start(self, timeout: float = 30.0) -> bool:
        """Start and wait until the worker consumes; False if it did not within ``timeout``."""
        self._thread.start()
        return self._ready.wait(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        if not self._thread.is_alive():
            return
        self._ready.wait(timeout)  # the consumer resets its state to RUN while starting
        consumer = self._worker.consumer
        if consumer is not None:
            consumer.blueprint.state = bootsteps.CLOSE
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("embedded worker did not stop in time", extra={"fields": {"s": timeout}})


def run_worker(settings: Settings, *, hostname: str, loglevel: str = "INFO") -> int:
    """``radfinder-node worker``: a standalone worker process (one per GPU) on the queue."""
    from celery.utils.nodenames import default_nodename, host_format  # type: ignore[import-untyped]

    from radfinder_node.reconciler import Reconciler
    from radfinder_node.tasks import context_of

    hostname = host_format(default_nodename(hostname))
    _identity.name = hostname
    app = create_app(settings)
    Reconciler(
        context_of(app).db,
        app,
        job_timeout_s=settings.job_timeout_s,
        queued_stale_s=settings.job_queued_stale_s,
        max_attempts=settings.job_max_attempts,
    ).recover_worker(hostname)
    argv = [
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "--prefetch-multiplier=1",
        f"--queues={settings.queue}",
        f"--hostname={hostname}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
    code = app.worker_main(argv)
    return int(code or 0)
