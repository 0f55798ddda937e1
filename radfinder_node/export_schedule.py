"""The nightly retraining export: a Celery task and the beat schedule that sends it.

Beat only publishes a message at ``export_time`` (UTC, the Celery app's clock); a worker runs
the export, so a site needs no extra service beyond its workers and one beat: ``serve`` runs
beat in a thread beside its embedded worker, and a site with separate workers runs
``radfinder-node beat`` once. Beat keeps its last run in ``<data_dir>/celerybeat-schedule``: a
node that was down at export time exports once when it comes back. The task is safe to run
twice (the export takes a lock per destination and writes only what the destination lacks), so
a redelivered message costs nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

from celery import Celery  # type: ignore[import-untyped]
from celery.beat import EmbeddedService  # type: ignore[import-untyped]
from celery.schedules import crontab  # type: ignore[import-untyped]

from radfinder_node.config import Settings

if TYPE_CHECKING:
    from radfinder_node.database import Database

__all__ = [
    "BEAT_ENTRY",
    "TASK_EXPORT",
    "beat_schedule",
    "register_export",
    "run_beat",
    "start_embedded_beat",
]

log = logging.getLogger("radfinder_node.export")

TASK_EXPORT: Final = "radfinder.export"
BEAT_ENTRY: Final = "nightly-export"
SCHEDULE_FILE: Final = "celerybeat-schedule"
# A message not started within this long is dropped: the next night's export covers it.
EXPIRES_S: Final = 12 * 3600


def beat_schedule(settings: Settings) -> dict[str, Any]:
    """Celery's ``beat_schedule`` for ``settings``: one daily entry, or none when switched off."""
    if not settings.export_nightly:
        return {}
    hour, minute = settings.export_hour_minute
    return {
        BEAT_ENTRY: {
            "task": TASK_EXPORT,
            "schedule": crontab(hour=hour, minute=minute),
            "options": {"queue": settings.queue, "expires": EXPIRES_S},
        }
    }


def register_export(app: Celery, settings: Settings, db: Database | None = None) -> None:
    """Bind the export task (with ``db`` when the embedding node lends its own) and the
    schedule to ``app``."""

    @app.task(  # type: ignore[untyped-decorator]
        name=TASK_EXPORT, shared=False, acks_late=True, reject_on_worker_lost=True
    )
    def nightly_export() -> dict[str, Any]:
        from radfinder_node.export import ExportBusyError, export_from_settings

        try:
            return export_from_settings(settings, db).summary()
        except ExportBusyError as exc:
            log.warning("export skipped", extra={"fields": {"reason": str(exc)}})
            return {"skipped": str(exc)}

    app.conf.beat_schedule = beat_schedule(settings)
    app.conf.beat_schedule_filename = str(settings.data_dir / SCHEDULE_FILE)


def start_embedded_beat(app: Celery, settings: Settings) -> Any | None:
    """Beat in a daemon thread of this process (``serve``); None when the schedule is off.
    Stop it with ``.stop()``."""
    if not app.conf.beat_schedule:
        return None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    beat = EmbeddedService(
        app, thread=True, schedule_filename=str(settings.data_dir / SCHEDULE_FILE)
    )
    beat.start()
    log.info(
        "export scheduled",
        extra={"fields": {"time_utc": settings.export_time, "queue": settings.queue}},
    )
    return beat


def run_beat(app: Celery, settings: Settings, loglevel: str = "INFO") -> int:
    """``radfinder-node beat``: the scheduler alone, in the foreground."""
    app.Beat(loglevel=loglevel, schedule=str(settings.data_dir / SCHEDULE_FILE), quiet=True).run()
    return 0
