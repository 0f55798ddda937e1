"""`radfinder-node`: serve, config show, status, volume, synth."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from radfinder_node.config import Settings, load_settings
from radfinder_node.logs import setup_logging


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    return load_settings(args.config, data_dir=getattr(args, "data_dir", None), **extra)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args, port=args.port, ae_title=args.ae_title, host=args.host)
    setup_logging(settings.log_level, settings.log_json)
    from radfinder_node.node import Node

    Node(settings).serve_forever()
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    data = settings.model_dump(mode="json")
    data["effective_database_url"] = settings.effective_database_url
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        import tomli_w

        print(tomli_w.dumps({k: v for k, v in data.items() if v is not None}))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from radfinder_node.database import Database
    from radfinder_node.status import node_status

    db = Database(settings.effective_database_url)
    try:
        status = node_status(db)
    finally:
        db.dispose()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(f"studies      {status['studies']}")
        for state, n in status["series"].items():
            print(f"series {state:<10} {n}")
        print(f"instances    {status['instances']}")
        print(f"quarantined  {status['quarantined']}")
    return 0


def cmd_volume(args: argparse.Namespace) -> int:
    from dicom_io.volume import VolumeError, load_volume_dir

    try:
        volume = load_volume_dir(args.directory, series_uid=args.series_uid)
    except VolumeError as exc:
        out: dict[str, Any] = {"ok": False, "error": type(exc).__name__, "reason": exc.reason}
        print(json.dumps(out, indent=2) if args.json else f"error: {exc.reason}")
        return 2
    geometry = {"ok": True, **volume.geometry()}
    if args.json:
        print(json.dumps(geometry, indent=2))
    else:
        for key, value in geometry.items():
            print(f"{key}: {value}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from dicom_io.synthetic import write_ct_series
    from engines.data.phantoms import basic_chest_phantom

    spacing = (args.slice_spacing, args.pixel_spacing, args.pixel_spacing)
    hu = basic_chest_phantom((args.slices, args.size, args.size), spacing, seed=args.seed)
    series = write_ct_series(args.out, hu, spacing)
    print(
        json.dumps(
            {
                "study_uid": series.study_uid,
                "series_uid": series.series_uid,
                "files": len(series.paths),
                "directory": str(Path(args.out).resolve()),
            }
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radfinder-node", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML file (default ./radfinder.toml)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the node: DICOM listener and completion")
    serve.add_argument("--data-dir", type=Path)
    serve.add_argument("--port", type=int)
    serve.add_argument("--ae-title")
    serve.add_argument("--host")
    serve.set_defaults(func=cmd_serve)

    config = sub.add_parser("config", help="configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the effective configuration")
    show.add_argument("--data-dir", type=Path)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_config_show)

    status = sub.add_parser("status", help="counts of what the node holds")
    status.add_argument("--data-dir", type=Path)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    volume = sub.add_parser("volume", help="assemble a series directory into a volume")
    volume.add_argument("directory", type=Path)
    volume.add_argument("--series-uid", help="pick one series when DIR holds several")
    volume.add_argument("--json", action="store_true")
    volume.set_defaults(func=cmd_volume)

    synth = sub.add_parser("synth", help="write a synthetic chest-CT series (for tests, demos)")
    synth.add_argument("out", type=Path)
    synth.add_argument("--slices", type=int, default=300)
    synth.add_argument("--size", type=int, default=512)
    synth.add_argument("--slice-spacing", type=float, default=1.5)
    synth.add_argument("--pixel-spacing", type=float, default=0.7)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError) as exc:
        print(f"radfinder-node: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
