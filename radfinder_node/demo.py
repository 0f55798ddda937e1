"""`radfinder-node demo`: the whole product on one machine in one command.

A node starts in this process on the embedded defaults (SQLite, the durable SQLite broker, the
embedded worker, the auto-chosen engine, which is ONNX Runtime on a CPU host, and the shipped
demo bundle) on a free loopback port. A synthetic chest-CT study (a scout and a 512 x 512 chest
series) is generated with known findings and sent over C-STORE like a scanner would, the node
selects the chest series, runs the job and writes the SR and the KOS. The demo then prints the
findings beside the phantom's truth, so a user sees at once how the shipped model does, and
draws the key images with their findings named.

Nothing leaves the machine: the node has no destinations and no HL7 listener. Unless
``--data-dir`` is given the node's data lives in a temporary directory that is removed at the
end; what the user keeps (table, PNG, SR, KOS) is copied to ``--out``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from sqlalchemy import func, select

from radfinder_node.config import Settings
from radfinder_node.job_models import Job, JobState
from radfinder_node.models import Series, SeriesState

if TYPE_CHECKING:
    from dicom_io.synthetic import SyntheticSeries
    from radfinder_node.node import Node

__all__ = [
    "DEFAULT_SHAPE",
    "DEFAULT_SPACING",
    "DEMO_FINDINGS",
    "DemoError",
    "DemoResult",
    "DemoRow",
    "demo_rows",
    "demo_settings",
    "format_table",
    "run_demo",
]

#: A realistic chest series: 200 slices of 1.5 mm, 512 x 512 at 0.7 mm (a 36 cm field of view).
DEFAULT_SHAPE: Final = (200, 512, 512)
DEFAULT_SPACING: Final = (1.5, 0.7, 0.7)
#: Findings the demo phantom is given: large, common, and seen on different slices.
DEMO_FINDINGS: Final = ("Cardiomegaly", "Lung nodule", "Pleural effusion", "Consolidation")
DEMO_AE: Final = "DEMO-SCANNER"

Say = Callable[[str], None]


class DemoError(RuntimeError):
    """The demo could not finish: the reason, for the user (series ignored, job failed...)."""


@dataclass(frozen=True)
class DemoRow:
    """One label: the model's answer beside the phantom's truth.

    ``key_instance`` is the InstanceNumber of the key slice the node chose, ``true_instance``
    the slice through the centre of the finding the phantom really has.
    """

    label: str
    probability: float
    threshold: float
    present: bool
    truth: bool
    key_sop_uid: str | None
    key_instance: int | None
    true_instance: int | None


@dataclass(frozen=True)
class DemoResult:
    rows: tuple[DemoRow, ...]
    png: Path
    sr: Path
    kos: Path | None
    table: str
    key_images: tuple[tuple[int, str], ...]  # (InstanceNumber, caption) per tile of the PNG
    study_uid: str
    series_uid: str
    bundle: str
    runtime: str
    timings: dict[str, float]


def demo_settings(data_dir: Path, bundle_path: Path | None = None) -> Settings:
    """Embedded defaults, with what a one-shot local run changes and why:

    * loopback and any free port, no HL7 listener, no HTTP server, no nightly export:
      nothing else on the machine is disturbed or needed;
    * a 1 s quiet period: the only sender is this process, which knows when it is done;
    * no fsync: the data directory is throw-away, and durability costs seconds on slow disks.

    The TOML file is not read (a site's radfinder.toml may point at PostgreSQL or Redis), and
    database and broker are set to None explicitly so the SQLite defaults hold.
    """
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": None,
        "broker_url": None,
        "host": "127.0.0.1",
        "port": 0,
        "hl7_enabled": False,
        "http_enabled": False,
        "export_nightly": False,
        "quiet_period_s": 1.0,
        "completion_poll_s": 0.2,
        "fsync": False,
        "embedded_worker": True,
        "destinations": [],
        "log_json": False,
        "log_level": "WARNING",
    }
    if bundle_path is not None:
        values["bundle_path"] = bundle_path
    return Settings(**values)


# ----------------------------------------------------------------------------- pure parts


def demo_rows(
    findings: Sequence[dict[str, Any]],
    sop_uids: Sequence[str],
    instance_numbers: Sequence[int],
    true_z: dict[str, int],
) -> list[DemoRow]:
    """Rows of the table from the job's findings (``Job.result["findings"]``).

    ``sop_uids[z]`` and ``instance_numbers[z]`` describe the chest series by z index;
    ``true_z`` maps each label the phantom really has to the z index of its centre.
    """
    z_of_uid = {uid: z for z, uid in enumerate(sop_uids)}
    rows = []
    for f in findings:
        uid = f.get("key_sop_instance_uid")
        key_instance = None
        if uid is not None:
            if uid not in z_of_uid:
                raise DemoError(f"{f['label']}: key slice {uid} is not in the chest series")
            key_instance = int(instance_numbers[z_of_uid[uid]])
        z = true_z.get(f["label"])
        rows.append(
            DemoRow(
                label=str(f["label"]),
                probability=float(f["probability"]),
                threshold=float(f["threshold"]),
                present=bool(f["present"]),
                truth=z is not None,
                key_sop_uid=uid,
                key_instance=key_instance,
                true_instance=None if z is None else int(instance_numbers[z]),
            )
        )
    return rows


def format_table(rows: Sequence[DemoRow]) -> str:
    """The findings table, one line per label, in the bundle's label order."""
    width = max([len("finding"), *(len(r.label) for r in rows)])
    head = (
        f"{'finding':<{width}}  {'prob':>6}  {'thresh':>6}  {'model':<7}  {'truth':<7}  "
        f"{'key image':>9}  {'true image':>10}  key SOP Instance UID"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        model = "PRESENT" if r.present else "absent"
        truth = "PRESENT" if r.truth else "absent"
        key = "" if r.key_instance is None else str(r.key_instance)
        true = "" if r.true_instance is None else str(r.true_instance)
        lines.append(
            f"{r.label:<{width}}  {r.probability:6.4f}  {r.threshold:6.4f}  {model:<7}  "
            f"{truth:<7}  {key:>9}  {true:>10}  {r.key_sop_uid or ''}"
        )
    agree = sum(r.present == r.truth for r in rows)
    tp = sum(r.present and r.truth for r in rows)
    lines.append("-" * len(head))
    lines.append(
        f"model agrees with the phantom on {agree}/{len(rows)} labels; "
        f"{tp}/{sum(r.truth for r in rows)} true findings found, "
        f"{sum(r.present and not r.truth for r in rows)} false positives"
    )
    return "\n".join(lines)


def key_image_captions(rows: Sequence[DemoRow]) -> list[tuple[str, int, str]]:
    """``(SOP UID, InstanceNumber, caption)`` per key slice, from the top of the chest down;
    a slice that is key to several findings is drawn once with all of them named."""
    by_uid: dict[str, list[DemoRow]] = {}
    for r in rows:
        if r.present and r.key_sop_uid is not None:
            by_uid.setdefault(r.key_sop_uid, []).append(r)
    out = []
    for uid, found in by_uid.items():
        instance = found[0].key_instance
        assert instance is not None  # demo_rows sets it with the UID
        names = ", ".join(f"{r.label} {r.probability:.2f}" for r in found)
        out.append((uid, instance, f"Image {instance}: {names}"))
    return sorted(out, key=lambda t: -t[1])


def _hu(path: Path) -> npt.NDArray[np.float32]:
    ds = dcmread(path)
    slope = float(getattr(ds, "RescaleSlope", 1.0))
    intercept = float(getattr(ds, "RescaleIntercept", 0.0))
    hu: npt.NDArray[np.float32] = (ds.pixel_array.astype(np.float32) * slope + intercept).astype(
        np.float32
    )
    return hu


# ----------------------------------------------------------------------------- the run


def _status_line(node: Node) -> str:
    """What `radfinder-node status` would say about the demo's node, on one line."""
    from radfinder_node.status import inference_status

    with node.db.transaction() as session:
        series = dict(
            session.execute(select(Series.state, func.count()).group_by(Series.state)).all()
        )
    jobs = inference_status(node.db)["jobs"]
    parts = [f"series {k.value} {v}" for k, v in sorted(series.items())]
    parts += [f"jobs {k} {v}" for k, v in jobs.items() if v]
    return ", ".join(parts)


def _draw_key_images(
    rows: Sequence[DemoRow], chest: SyntheticSeries, instance_numbers: Sequence[int], out_dir: Path
) -> tuple[Path, tuple[tuple[int, str], ...]]:
    """The PNG of the key slices, read back from the files the node received. With no finding
    present, the middle slice says so, so there is always a picture to look at."""
    from dicom_io.key_images import render_key_images

    captions = key_image_captions(rows)
    z_of_uid = {uid: z for z, uid in enumerate(chest.sop_uids)}
    if captions:
        slices = [(_hu(chest.paths[z_of_uid[uid]]), caption) for uid, _, caption in captions]
        tiles = tuple((instance, caption) for _, instance, caption in captions)
    else:
        mid = len(chest.paths) // 2
        caption = f"Image {instance_numbers[mid]}: no finding above its threshold"
        slices = [(_hu(chest.paths[mid]), caption)]
        tiles = ((instance_numbers[mid], caption),)
    return render_key_images(slices, out_dir / "key_images.png"), tiles


def _keep_objects(result: dict[str, Any], results_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Copy the SR (and the KOS, when a finding is present) out of the node's data directory,
    which may be a temporary one."""
    objects = {o["kind"]: o for o in result.get("objects", [])}
    if "sr" not in objects:
        raise DemoError("the job wrote no SR")
    kept: dict[str, Path] = {}
    for kind, name in (("sr", "findings_sr.dcm"), ("kos", "key_images_kos.dcm")):
        if kind in objects:
            kept[kind] = out_dir / name
            shutil.copyfile(results_dir / objects[kind]["path"], kept[kind])
    return kept


def _wait_for_job(node: Node, series_uid: str, timeout_s: float) -> Job:
    """The chest series' finished job; a clear error if the series was ignored or it failed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with node.db.transaction() as session:
            series = session.scalar(select(Series).where(Series.series_uid == series_uid))
            job = session.scalar(select(Job).where(Job.series_uid == series_uid))
            if job is not None and job.state in (JobState.DONE, JobState.FAILED):
                if job.state == JobState.FAILED:
                    raise DemoError(f"the job failed: {job.error}")
                return job
            if series is not None and series.state == SeriesState.IGNORED:
                raise DemoError(f"the node did not select the chest series: {series.state_reason}")
        time.sleep(0.2)
    raise DemoError(f"no result within {timeout_s:.0f} s (see `radfinder-node status`)")


def run_demo(
    out_dir: Path,
    *,
    data_dir: Path | None = None,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    seed: int = 0,
    findings: Sequence[str] = DEMO_FINDINGS,
    bundle_path: Path | None = None,
    timeout_s: float = 900.0,
    say: Say = print,
) -> DemoResult:
    """Run the demo; prints progress through ``say`` and returns what it found.

    Raises :class:`DemoError` when the node cannot produce a result, with the reason.
    """
    from engines.data.labels import LABELS

    unknown = [f for f in findings if f not in LABELS]
    if unknown:
        raise DemoError(f"unknown finding {unknown[0]!r}; the phantom knows {', '.join(LABELS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="radfinder-demo-") as tmp_name:
        tmp = Path(tmp_name)
        return _run(
            out_dir,
            data_dir or tmp / "node",
            tmp / "study",
            shape=shape,
            spacing=spacing,
            seed=seed,
            findings=findings,
            bundle_path=bundle_path,
            timeout_s=timeout_s,
            say=say,
        )


def _run(
    out_dir: Path,
    data_dir: Path,
    study_dir: Path,
    *,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    seed: int,
    findings: Sequence[str],
    bundle_path: Path | None,
    timeout_s: float,
    say: Say,
) -> DemoResult:
    from dicom_io.scu import Destination, send_datasets
    from dicom_io.synthetic_study import write_study
    from engines.data.phantoms import generate_phantom
    from radfinder_node.node import Node

    t0 = time.perf_counter()
    say(
        f"generating a chest CT: {shape[0]} x {shape[1]} x {shape[2]} voxels of "
        f"{spacing[0]} x {spacing[1]} x {spacing[2]} mm, findings: {', '.join(findings) or 'none'}"
    )
    phantom = generate_phantom(shape, spacing, seed=seed, labels=list(findings))
    study = write_study(
        study_dir,
        phantom.hu,
        spacing,
        seed=seed,
        accession_number=f"DEMO{seed:06d}",
        patient_id=f"DEMO{seed:06d}",
        patient_name="Demo^Phantom",
        patient_sex=str(phantom.patient.get("sex", "O")),
        patient_age=int(phantom.patient.get("age", 50)),
        with_scout=True,
    )
    true_z = {f.label: int(f.center_voxel[0]) for f in phantom.findings}
    dropped = phantom.patient.get("dropped_findings") or []
    if dropped:
        say(f"the phantom could not place (outside the field of view): {', '.join(dropped)}")
    del phantom  # the pixels now live in the files; keep the memory for the node

    settings = demo_settings(data_dir, bundle_path)
    node = Node(settings)
    node.start()
    try:
        assert node.port is not None
        if node.bundle_ref is None:
            raise DemoError(f"no model bundle at {settings.bundle_path}")
        say(
            f"node {settings.ae_title} listening on 127.0.0.1:{node.port}, bundle "
            f"{node.bundle_ref.name} {node.bundle_ref.version}, data in {data_dir}"
        )
        say(f"sending {len(study.paths)} instances (scout + chest series) over C-STORE")
        results = send_datasets(
            study.paths,
            Destination(settings.ae_title, "127.0.0.1", node.port),
            calling_ae=DEMO_AE,
            timeout_s=60,
        )
        failed = [r for r in results if not r.ok]
        if failed:
            raise DemoError(f"{len(failed)} instances not stored: {failed[0].error}")
        say("sent; waiting for series completion, selection and the inference job")
        job = _wait_for_job(node, study.chest.series_uid, timeout_s)
        result = job.result or {}
        rows = demo_rows(
            result.get("findings", []), study.chest.sop_uids, study.instance_numbers, true_z
        )
        table = format_table(rows)

        png, tiles = _draw_key_images(rows, study.chest, study.instance_numbers, out_dir)
        kept = _keep_objects(result, settings.results_dir, out_dir)
        timings = dict(job.timings or {})
        status = _status_line(node)
        demo = DemoResult(
            rows=tuple(rows),
            png=png,
            sr=kept["sr"],
            kos=kept.get("kos"),
            table=table,
            key_images=tiles,
            study_uid=study.study_uid,
            series_uid=study.chest.series_uid,
            bundle=f"{job.bundle_name} {job.bundle_version}",
            runtime=str(result.get("runtime", "")),
            timings=timings,
        )
    finally:
        node.stop()
    (out_dir / "findings.json").write_text(
        json.dumps(
            {
                "study_uid": demo.study_uid,
                "series_uid": demo.series_uid,
                "bundle": demo.bundle,
                "runtime": demo.runtime,
                "timings_s": demo.timings,
                "rows": [asdict(r) for r in demo.rows],
            },
            indent=1,
        )
    )
    say("")
    say(f"findings of {demo.bundle} ({demo.runtime}) against the phantom's truth:")
    say(table)
    say("")
    stages = ", ".join(f"{k} {v:.2f}" for k, v in demo.timings.items())
    say(f"job stages (s): {stages}")
    say(f"key images: {png.resolve()}")
    say(f"SR (TID 1500): {demo.sr.resolve()}")
    say(f"KOS: {demo.kos.resolve() if demo.kos else 'none (no finding present)'}")
    say(f"node status: {status}")
    say(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return demo


# ----------------------------------------------------------------------------- command line


def _triple(text: str, kind: type[int] | type[float]) -> tuple[Any, Any, Any]:
    import argparse

    parts = text.lower().split("x")
    try:
        z, y, x = (kind(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ZxYxX, got {text!r}") from None
    return z, y, x


def cmd_demo(args: Any) -> int:
    """`radfinder-node demo`: 0 when the node produced its results, 1 with the reason if not."""
    import sys

    from radfinder_node.logs import setup_logging

    setup_logging("WARNING", json_lines=False)
    findings = tuple(args.finding) if args.finding else DEMO_FINDINGS
    try:
        run_demo(
            args.out,
            data_dir=args.data_dir,
            shape=args.shape,
            spacing=args.spacing,
            seed=args.seed,
            findings=() if findings == ("none",) else findings,
            bundle_path=args.bundle,
            say=lambda line: print(line, flush=True),
        )
    except DemoError as exc:
        print(f"radfinder-node demo: {exc}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub: Any) -> None:
    """Register ``demo`` on the CLI's subparsers (one call in ``cli.build_parser``)."""
    demo = sub.add_parser(
        "demo", help="start a node, send it a generated chest CT, print and draw the findings"
    )
    demo.add_argument(
        "--data-dir", type=Path, help="node data (default: a temporary directory, removed)"
    )
    demo.add_argument(
        "--out", type=Path, default=Path("data/demo"), help="PNG, SR, KOS, findings.json"
    )
    demo.add_argument(
        "--shape",
        type=lambda t: _triple(t, int),
        default=DEFAULT_SHAPE,
        help="ZxYxX voxels of the chest series (at least 20 slices)",
    )
    demo.add_argument(
        "--spacing", type=lambda t: _triple(t, float), default=DEFAULT_SPACING, help="ZxYxX mm"
    )
    demo.add_argument("--seed", type=int, default=0, help="phantom anatomy and UIDs")
    demo.add_argument(
        "--finding",
        action="append",
        metavar="LABEL",
        help=f"a finding the phantom has (repeatable; 'none' for none; "
        f"default: {', '.join(DEMO_FINDINGS)})",
    )
    demo.add_argument("--bundle", type=Path, help="model bundle (default: the demo bundle)")
    demo.set_defaults(func=cmd_demo)
