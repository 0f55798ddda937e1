"""`radfinder-node`: serve, worker, config show, status, cleanup, volume, synth."""

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
    settings = _settings(
        args,
        port=args.port,
        ae_title=args.ae_title,
        host=args.host,
        destinations=args.destination,
        broker_url=args.broker,
        hl7_port=args.hl7_port,
        http_port=args.http_port,
    )
    setup_logging(settings.log_level, settings.log_json)
    from radfinder_node.node import Node

    Node(settings).serve_forever()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(
        args,
        broker_url=args.broker,
        queue=args.queue,
        engine_runtime=args.runtime,
        engine_device=args.device,
    )
    setup_logging(settings.log_level, settings.log_json)
    from radfinder_node.celery_app import run_worker

    if args.metrics_port is not None:
        from radfinder_node.web import serve_worker_metrics

        serve_worker_metrics(settings, args.metrics_port)
    return run_worker(settings, hostname=args.hostname, loglevel=settings.log_level)


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
        for state, n in status["reports"].items():
            print(f"reports {state:<16} {n}")
        for state, n in status["snippet_pairs"].items():
            print(f"snippet pairs {state:<10} {n}")
        for state, n in status["jobs"].items():
            print(f"jobs {state:<12} {n}")
        for state, n in status["outbox"].items():
            print(f"outbox {state:<10} {n}")
        for err in status["last_errors"]["jobs"]:
            print(f"job {err['job_id']} {err['state']} ({err['attempts']} tries): {err['error']}")
        for err in status["last_errors"]["outbox"]:
            print(
                f"send {err['sop_uid']} -> {err['destination']} {err['state']} "
                f"({err['attempts']} tries, {err['status']}): {err['error']}"
            )
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging(settings.log_level, settings.log_json)
    from radfinder_node.database import Database
    from radfinder_node.retention import Retention

    db = Database(settings.effective_database_url)
    try:
        report = Retention.from_settings(db, settings).run_once(dry_run=args.dry_run)
    finally:
        db.dispose()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        verb = "would delete" if report.dry_run else "deleted"
        for kind in ("spool", "results", "quarantine"):
            files, size = getattr(report, f"{kind}_files"), getattr(report, f"{kind}_bytes")
            print(f"{kind:<11} {verb} {files} files, {size} bytes")
        print(f"studies     {len(report.spool_studies)}")
        for error in report.errors:
            print(f"error: {error}")
    return 1 if report.errors else 0


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


def _triple(text: str) -> tuple[float, float, float]:
    parts = text.lower().split("x")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected ZxYxX, got {text!r}")
    z, y, x = (float(p) for p in parts)
    return z, y, x


def _shape(text: str) -> tuple[int, int, int]:
    z, y, x = _triple(text)
    return int(z), int(y), int(x)


def cmd_synth(args: argparse.Namespace) -> int:
    from engines.data.ctrate import synthesize_ctrate
    from radfinder_node import synth
    from radfinder_node.progress import Progress

    kind = args.synth_command
    if kind == "preview":
        path = synth.synth_preview(args.out, args.seed, args.shape, args.spacing)
        print(json.dumps({"preview": str(path.resolve())}))
        return 0
    progress = Progress(args.n, f"synth {kind}")
    if kind == "dicom":
        manifest = synth.synth_dicom(
            args.out,
            args.n,
            args.seed,
            args.shape,
            args.spacing,
            transfer_syntax=args.transfer_syntax,
            shuffle=args.shuffle,
            with_scout=args.with_scout,
            with_non_chest=args.with_non_chest,
            progress=progress,
        )
        print(json.dumps({"studies": len(manifest), "directory": str(args.out.resolve())}))
    elif kind == "hl7":
        paths = synth.synth_hl7(
            args.out, args.n, args.seed, args.shape, args.spacing, progress=progress
        )
        print(json.dumps({"messages": len(paths), "directory": str(args.out.resolve())}))
    else:
        synthesize_ctrate(
            args.out,
            args.n,
            args.seed,
            args.shape,
            args.spacing,
            split=args.split,
            workers=args.workers,
            progress=progress,
        )
        print(json.dumps({"volumes": args.n, "directory": str(args.out.resolve())}))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from engines.training import train

    result = train(
        args.preset,
        args.data,
        args.out,
        steps=args.steps,
        epochs=args.epochs,
        batch=args.batch,
        accum=args.accum,
        resume=args.resume,
        seed=args.seed,
        workers=args.workers,
        localization=not args.no_localization,
        ablation=args.ablation,
        volume_cache=args.volume_cache,
        time_budget_s=args.time_budget,
    )
    print(
        json.dumps(
            {
                "run_dir": str(result.run_dir),
                "checkpoint": str(result.checkpoint),
                "step": result.step,
            }
        )
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from engines.evaluation import evaluate

    result = evaluate(
        args.bundle,
        args.data,
        args.out,
        bootstrap=args.bootstrap,
        seed=args.seed,
        no_localization=args.no_localization_run,
        split=args.split,
        workers=args.workers,
    )
    print(json.dumps({"out_dir": str(result.out_dir)}))
    return 0


def cmd_bundle_export(args: argparse.Namespace) -> int:
    from engines.bundle import export_bundle

    bundle = export_bundle(
        args.run, args.out, validation_data=args.validation_data, overwrite=args.overwrite
    )
    print(json.dumps({"bundle": str(args.out.resolve()), "name": bundle.name}))
    return 0


def cmd_mine(args: argparse.Namespace) -> int:
    setup_logging("INFO", json_lines=False)
    from radfinder_node.mine_cli import run

    return run(sys.stdin.buffer, sys.stdout, jsonl=args.jsonl)


def cmd_export(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging(settings.log_level, settings.log_json)
    from radfinder_node.export_cli import run_export

    return run_export(
        settings, since=args.since, out=args.out, no_deid=args.no_deid, stdout=sys.stdout
    )


def cmd_beat(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging(settings.log_level, settings.log_json)
    from radfinder_node.export_cli import run_beat

    return run_beat(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radfinder-node", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML file (default ./radfinder.toml)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the node: DICOM listener and completion")
    serve.add_argument("--data-dir", type=Path)
    serve.add_argument("--port", type=int)
    serve.add_argument("--ae-title")
    serve.add_argument("--host")
    serve.add_argument("--hl7-port", type=int, help="HL7 MLLP port (default 2575; 0 = any)")
    serve.add_argument(
        "--http-port", type=int, help="health, metrics and status page port (default 8080)"
    )
    serve.add_argument(
        "--destination",
        action="append",
        metavar="AE@HOST:PORT",
        help="send results here (repeatable; replaces the configured destinations)",
    )
    serve.add_argument("--broker", help="Celery broker URL (default: embedded SQLite)")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser(
        "worker", help="an inference worker: solo pool, prefetch 1, late acks (one per GPU)"
    )
    worker.add_argument("--data-dir", type=Path)
    worker.add_argument(
        "-n", "--hostname", default="radfinder@%h", help="worker name, e.g. gpu0@%%h"
    )
    worker.add_argument("--broker", help="Celery broker URL")
    worker.add_argument("--queue", help="queue to consume (default: inference)")
    worker.add_argument("--runtime", help="engine runtime: auto, onnx, torch, tensorrt")
    worker.add_argument("--device", help="engine device: auto, cpu, cuda, cuda:N")
    worker.add_argument(
        "--metrics-port",
        type=int,
        help="serve this worker's /metrics and /healthz on http_host:PORT (0 = any free port)",
    )
    worker.set_defaults(func=cmd_worker)

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

    cleanup = sub.add_parser(
        "cleanup", help="delete spool, results and quarantine files past their retention age"
    )
    cleanup.add_argument("--data-dir", type=Path)
    cleanup.add_argument("--dry-run", action="store_true", help="only count what would go")
    cleanup.add_argument("--json", action="store_true")
    cleanup.set_defaults(func=cmd_cleanup)

    volume = sub.add_parser("volume", help="assemble a series directory into a volume")
    volume.add_argument("directory", type=Path)
    volume.add_argument("--series-uid", help="pick one series when DIR holds several")
    volume.add_argument("--json", action="store_true")
    volume.set_defaults(func=cmd_volume)

    synth = sub.add_parser("synth", help="the synthetic world: studies, reports, datasets")
    synth_sub = synth.add_subparsers(dest="synth_command", required=True)
    study_size = {"shape": (300, 512, 512), "spacing": (1.5, 0.7, 0.7)}
    model_size = {"shape": (64, 128, 128), "spacing": (3.0, 2.5, 2.5)}
    for name, help_text, size in (
        ("dicom", "chest-CT studies as DICOM files with report.txt and truth.json", study_size),
        (
            "hl7",
            "ORU^R01 reports of the studies `synth dicom` makes with the same seed",
            study_size,
        ),
        ("ctrate", "a dataset in the CT-RATE layout (NIfTI, CSVs, citation truth)", model_size),
        ("preview", "a montage PNG with every finding at its key slice", study_size),
    ):
        p = synth_sub.add_parser(name, help=help_text)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--shape", type=_shape, default=size["shape"], help="ZxYxX voxels")
        p.add_argument("--spacing", type=_triple, default=size["spacing"], help="ZxYxX mm")
        if name != "preview":
            p.add_argument("--n", type=int, default=1)
        if name == "dicom":
            p.add_argument("--transfer-syntax", default="1.2.840.10008.1.2.1")
            p.add_argument("--shuffle", action="store_true", help="unordered file names")
            p.add_argument("--with-scout", action="store_true")
            p.add_argument("--with-non-chest", action="store_true")
        if name == "ctrate":
            p.add_argument("--split", default="train")
            p.add_argument("--workers", type=int, default=2)
        p.set_defaults(func=cmd_synth)

    train = sub.add_parser("train", help="train RadFinder (tiny on CPU, paper on GPUs)")
    train.add_argument("--preset", choices=["tiny", "paper"], default="tiny")
    train.add_argument(
        "--data",
        required=True,
        help="manifest .jsonl, a CT-RATE dataset folder, or synthetic[:N] (fresh phantoms)",
    )
    train.add_argument("--out", type=Path, required=True)
    train.add_argument("--steps", type=int)
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch", type=int)
    train.add_argument("--accum", type=int)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--workers", type=int, default=0)
    train.add_argument("--no-localization", action="store_true", help="ablation")
    train.add_argument(
        "--ablation",
        choices=["no-localization", "no-prompts", "clip"],
        help="train an ablation of the paper's objectives",
    )
    train.add_argument(
        "--volume-cache",
        type=Path,
        help="keep decoded volumes here for later epochs (raw .npy, ~2 bytes per voxel), and "
        "the tiny backbone's fixed stem of each (2.2x the steps per hour on a CPU)",
    )
    train.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="fit the run (and its LR schedule) into this many seconds",
    )
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="CT-RATE protocol: retrieval, AUC, localization")
    ev.add_argument("--bundle", type=Path, required=True, help="bundle dir or checkpoint")
    ev.add_argument("--data", required=True)
    ev.add_argument("--out", type=Path, required=True)
    ev.add_argument("--split", default="valid")
    ev.add_argument("--bootstrap", type=int, default=1000)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--workers", type=int, default=0)
    ev.add_argument("--no-localization-run", type=Path, help="checkpoint trained without it")
    ev.set_defaults(func=cmd_evaluate)

    bundle = sub.add_parser("bundle", help="model bundles")
    bundle_sub = bundle.add_subparsers(dest="bundle_command", required=True)
    export = bundle_sub.add_parser("export", help="write a bundle from a training run")
    export.add_argument("run", type=Path)
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--validation-data", help="data to choose thresholds on (Youden J)")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(func=cmd_bundle_export)

    mine = sub.add_parser("mine", help="image references in report text (stdin) as JSON")
    mine.add_argument(
        "--jsonl", action="store_true", help='one {"id", "text"} per line in, one line out each'
    )
    mine.set_defaults(func=cmd_mine)

    exp = sub.add_parser(
        "export", help="write linked reports, volumes and snippet-slice pairs as training data"
    )
    exp.add_argument("--data-dir", type=Path)
    exp.add_argument(
        "--since",
        default="last",
        metavar="DATE|last",
        help="last: what --out does not have yet (default); DATE: every report mined since",
    )
    exp.add_argument("--out", type=Path, help="destination (default: export_dir)")
    exp.add_argument("--no-deid", action="store_true", help="keep identifiers (stays on site)")
    exp.set_defaults(func=cmd_export)

    beat = sub.add_parser("beat", help="the scheduler of the nightly export (sites with workers)")
    beat.add_argument("--data-dir", type=Path)
    beat.set_defaults(func=cmd_beat)

    from radfinder_node.demo import add_parser as add_demo_parser

    add_demo_parser(sub)
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
