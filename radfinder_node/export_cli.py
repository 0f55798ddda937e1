"""`radfinder-node export` and `radfinder-node beat`: the retraining export from the shell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from radfinder_node.config import Settings
from radfinder_node.export import ExportBusyError, export_from_settings, parse_since


def run_export(
    settings: Settings, *, since: str, out: Path | None, no_deid: bool, stdout: TextIO
) -> int:
    """Print the export's summary as JSON; 0 when it ran (also when there was nothing new),
    3 when another export holds the destination."""
    try:
        result = export_from_settings(
            settings, out_dir=out, since=parse_since(since), deid=False if no_deid else None
        )
    except ExportBusyError as exc:
        print(json.dumps({"error": str(exc)}), file=stdout)
        return 3
    print(json.dumps(result.summary(), indent=2), file=stdout)
    return 0


def run_beat(settings: Settings) -> int:
    """The beat scheduler in the foreground (a site whose workers run elsewhere)."""
    from radfinder_node.celery_app import create_app
    from radfinder_node.export_schedule import run_beat as run

    return run(create_app(settings), settings, settings.log_level)
