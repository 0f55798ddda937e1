"""deploy/ is checked, since Docker and systemd cannot run here: the compose file against the
Compose specification's JSON schema (vendored by check-jsonschema, a dev dependency) and
against this project's own settings and CLI; the systemd units with `systemd-analyze verify`;
the example configuration for every key; the Prometheus targets against the compose services.
The two-host topology itself is tested without containers in test_netns_workers.py.

Also the documented bundle upgrade: a new version behind the configured path is picked up by
the running node and worker between jobs, and every result records the version it ran with.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import tomli_w
import yaml
from pydicom import Dataset, dcmread
from test_worker import job_rows, micro_bundle, wait_job

from conftest import ROOT, node_settings, small_phantom, storescu, wait_for
from dicom_io.selection import DEFAULT_SELECTION
from dicom_io.synthetic import write_ct_series
from radfinder_node.cli import build_parser
from radfinder_node.config import Settings, load_settings
from radfinder_node.job_models import JobState
from radfinder_node.node import Node

__all__ = ["micro_bundle"]  # the session fixture, shared with test_worker

DEPLOY = ROOT / "deploy"
UNITS = ("radfinder-node.service", "radfinder-worker@.service", "radfinder-beat.service")


# ----------------------------------------------------------------------------- compose


def compose_schema() -> dict[str, Any]:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return schema


def schema_errors(document: Any) -> list[str]:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator_class(schema).iter_errors(document)
    ]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return document


_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's ``${VAR}`` / ``${VAR:-default}``, from the environment or the default."""
    return _VARIABLE.sub(lambda m: os.environ.get(m[1]) or (m[2] or ""), value)


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    assert schema_errors(compose) == []
    # The schema bites: misspelt keys and wrong shapes are reported.
    broken = copy.deepcopy(compose)
    broken["services"]["node"]["restart_policy"] = "always"
    broken["services"]["redis"]["ports"] = 6379
    errors = schema_errors(broken)
    assert any("restart_policy" in e for e in errors), errors
    assert any(e.startswith("services/redis/ports") for e in errors), errors


def test_compose_topology(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"orthanc", "postgres", "redis", "node", "beat", "worker-gpu", "worker-cpu"} <= set(
        services
    )
    gpu, cpu, node = services["worker-gpu"], services["worker-cpu"], services["node"]
    assert gpu["runtime"] == "nvidia"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    assert "profiles" not in node  # the node always runs
    for name in ("node", "beat", "worker-gpu", "worker-cpu"):
        service = services[name]
        assert {"postgres", "redis"} <= set(service["depends_on"])
        assert "radfinder-data:/var/lib/radfinder" in service["volumes"]
    assert set(compose["volumes"]) >= {"radfinder-data", "postgres-data"}
    # The HTTP endpoints are published on the host's loopback only.
    assert "127.0.0.1:8080:8080" in node["ports"]


def _settings_of(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in [k for k in os.environ if k.startswith("RADFINDER_")]:
        monkeypatch.delenv(key)
    for key, value in service["environment"].items():
        monkeypatch.setenv(key, interpolate(str(value)))
    return load_settings(None)


def test_compose_environment_is_this_projects_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unknown RADFINDER_* variables are ignored silently, so each must name a setting."""
    services = compose["services"]
    fields = {f"RADFINDER_{name.upper()}" for name in Settings.model_fields}
    node = _settings_of(services["node"], monkeypatch)
    others = ("beat", "worker-gpu", "worker-cpu")
    workers = [_settings_of(services[n], monkeypatch) for n in others]
    for name in ("node", *others):
        unknown = {k for k in services[name]["environment"] if k.startswith("RADFINDER_")}
        assert unknown <= fields, unknown - fields
    assert node.embedded_worker is False
    for worker in workers:  # one database, broker, queue and data directory for all
        for key in ("effective_database_url", "effective_broker_url", "queue", "data_dir"):
            assert getattr(worker, key) == getattr(node, key), key
    assert node.effective_database_url.startswith("postgresql+psycopg://radfinder:")
    assert node.effective_broker_url == "redis://redis:6379/0"
    # Results go to the Orthanc service, under the AE title and port it is configured with.
    orthanc = services["orthanc"]["environment"]
    assert node.destinations == [
        f"{orthanc['ORTHANC__DICOM_AET']}@orthanc:{orthanc['ORTHANC__DICOM_PORT']}"
    ]
    # ... and Orthanc sends studies to the node's AE title and port.
    ((ae, host, port),) = json.loads(orthanc["ORTHANC__DICOM_MODALITIES"]).values()
    assert (ae, host, port) == (node.ae_title, "node", node.port)
    assert f"{node.port}:{node.port}" in services["node"]["ports"]


def test_compose_commands_parse_with_the_cli(compose: dict[str, Any]) -> None:
    parser = build_parser()
    services = compose["services"]
    assert parser.parse_args(services["node"]["command"]).command == "serve"
    assert parser.parse_args(services["beat"]["command"]).command == "beat"
    for name, device in (("worker-gpu", "cuda"), ("worker-cpu", "cpu")):
        args = parser.parse_args(services[name]["command"])
        assert (args.command, args.device, args.metrics_port) == ("worker", device, 9100)
        assert args.hostname.endswith("@%h")


def test_prometheus_scrapes_the_compose_services(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets["radfinder-node"] == [f"node:{Settings.model_fields['http_port'].default}"]
    parser = build_parser()
    workers = [
        f"{name}:{parser.parse_args(compose['services'][name]['command']).metrics_port}"
        for name in ("worker-gpu", "worker-cpu")
    ]
    assert targets["radfinder-worker"] == workers
    mounted = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounted


# ----------------------------------------------------------------------------- systemd


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this checkout's radfinder-node (verify checks that
    the command exists and is executable)."""
    exe = Path(sys.executable).parent / "radfinder-node"
    assert exe.is_file(), "the project is not installed in this environment"
    for name in UNITS:
        text = (DEPLOY / name).read_text()
        assert "ExecStart=/opt/radfinder/.venv/bin/radfinder-node " in text
        text = text.replace("/opt/radfinder/.venv/bin/radfinder-node", str(exe))
        (tmp_path / name).write_text(text)
    return tmp_path


def _verify(unit_dir: Path, *units: str) -> str:
    done = subprocess.run(
        ["systemd-analyze", "verify", *units],
        capture_output=True,
        text=True,
        cwd=unit_dir,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"},
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_units_verify(unit_dir: Path) -> None:
    out = _verify(
        unit_dir, "./radfinder-node.service", "./radfinder-beat.service",
        "radfinder-worker@0.service",
    )
    assert not [line for line in out.splitlines() if "radfinder" in line], out
    # verify reports what it finds (and this check notices): a misspelt directive.
    node = unit_dir / "radfinder-node.service"
    node.write_text(node.read_text().replace("Restart=always", "Restartt=always"))
    assert "Unknown key 'Restartt'" in _verify(unit_dir, "./radfinder-node.service")


def test_worker_unit_runs_one_worker_per_gpu() -> None:
    text = (DEPLOY / "radfinder-worker@.service").read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    argv = exec_start.split("=", 1)[1].split()[1:]
    # systemd expands %i (the instance, the GPU index) and %% (a literal %) before Celery sees it.
    argv = [a.replace("%i", "1").replace("%%", "%") for a in argv]
    args = build_parser().parse_args(argv)
    assert (args.command, args.hostname, args.device, args.metrics_port) == (
        "worker", "gpu1@%h", "cuda", 9101,
    )
    assert "Environment=CUDA_VISIBLE_DEVICES=%i" in text.splitlines()
    assert "Restart=always" in text.splitlines()


# ----------------------------------------------------------------------------- example config


def test_example_config_documents_every_key() -> None:
    text = (DEPLOY / "radfinder.toml.example").read_text()
    lines = text.splitlines()
    undocumented = []
    for name in Settings.model_fields:
        pattern = re.compile(rf"^((# )?{name}\s*=|\[{name}\])")  # a key or a table
        found = [i for i, line in enumerate(lines) if pattern.match(line)]
        if not found:
            undocumented.append(f"{name}: missing")
            continue
        i = found[0]
        inline = "#" in lines[i].lstrip("# ").partition("=")[2]
        above = i > 0 and lines[i - 1].startswith("#") and not pattern.match(lines[i - 1])
        if not (inline or above):
            undocumented.append(f"{name}: no comment")
    assert undocumented == []
    # As shipped it loads (unknown keys would fail), and shows the default selection rules.
    settings = load_settings(DEPLOY / "radfinder.toml.example")
    assert settings.data_dir == Path("/var/lib/radfinder")
    assert tomllib.loads(text)["selection"] == DEFAULT_SELECTION


def test_example_values_are_the_defaults() -> None:
    """Uncommented keys show the default, except data_dir (a site's path)."""
    shown = tomllib.loads((DEPLOY / "radfinder.toml.example").read_text())
    defaults = Settings.model_construct().model_dump()
    differing = {
        k: (v, defaults[k])
        for k, v in shown.items()
        if k not in ("data_dir", "selection") and v != defaults[k]
    }
    assert differing == {}


# ----------------------------------------------------------------------------- bundle upgrade


def _bundle_copy(source: Path, out: Path, version: str) -> Path:
    shutil.copytree(source, out)
    manifest = tomllib.loads((out / "bundle.toml").read_text())
    manifest["version"] = version
    (out / "bundle.toml").write_text(tomli_w.dumps(manifest))
    return out


def _switch(link: Path, target: Path) -> None:
    """The documented upgrade step: a new symlink renamed over the old one (atomic)."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.name)
    os.replace(tmp, link)


def _algorithm_version(sr: Dataset) -> str:
    """The SR's Algorithm Version (DCM 111003) content item."""

    def items(ds: Dataset) -> Iterator[Dataset]:
        for item in ds.get("ContentSequence", []):
            yield item
            yield from items(item)

    for item in items(sr):
        code = item.get("ConceptNameCodeSequence")
        if code and code[0].CodeValue == "111003":
            return str(item.TextValue)
    raise AssertionError("no Algorithm Version in the SR")


def test_locate_bundle_finds_a_version_beside_the_current_one(tmp_path: Path) -> None:
    from radfinder_node.jobs import BundleRef, locate_bundle

    for version in ("1.0", "2.0"):
        (tmp_path / f"rf-{version}").mkdir()
        (tmp_path / f"rf-{version}" / "bundle.toml").write_text(
            f'name = "rf"\nversion = "{version}"\n'
        )
    (tmp_path / "notes").mkdir()  # not a bundle: passed over
    current = tmp_path / "current"
    _switch(current, tmp_path / "rf-2.0")
    assert locate_bundle(current, BundleRef("rf", "2.0")) == (tmp_path / "rf-2.0").resolve()
    assert locate_bundle(current, BundleRef("rf", "1.0")) == (tmp_path / "rf-1.0").resolve()
    assert locate_bundle(current, BundleRef("rf", "3.0")) is None
    assert locate_bundle(current, BundleRef("other", "1.0")) is None


@pytest.mark.slow
@pytest.mark.integration
def test_bundle_upgrade_is_picked_up_between_jobs(micro_bundle: Path, tmp_path: Path) -> None:
    from radfinder_node import engine_cache
    from radfinder_node.jobs import requeue

    bundles = tmp_path / "bundles"
    bundles.mkdir()
    old = _bundle_copy(micro_bundle, bundles / "radfinder-1.0", "1.0")
    new = _bundle_copy(micro_bundle, bundles / "radfinder-2.0", "2.0")
    current = bundles / "current"
    _switch(current, old)
    node = Node(node_settings(data_dir=tmp_path / "node", bundle_path=current))
    node.start()
    hu, spacing = small_phantom()

    def read(i: int) -> Any:
        series = write_ct_series(tmp_path / f"series{i}", hu, spacing)
        assert node.port is not None
        assert storescu(node.port, series.paths[0].parent).returncode == 0
        job = wait_job(node.db, series.series_uid, {JobState.DONE, JobState.FAILED})
        assert job.state == JobState.DONE, job.error
        return job

    def sr_version(job: Any) -> str:
        (sr,) = [o for o in job.result["objects"] if o["kind"] == "sr"]
        return _algorithm_version(dcmread(node.settings.results_dir / sr["path"]))

    try:
        first = read(1)
        assert (first.bundle_version, first.result["bundle"]["version"]) == ("1.0", "1.0")
        assert sr_version(first) == "1.0"
        engines = engine_cache.loaded()

        _switch(current, new)  # while the node and its worker run
        second = read(2)
        assert (second.bundle_version, second.result["bundle"]["version"]) == ("2.0", "2.0")
        assert sr_version(second) == "2.0"
        assert second.worker == first.worker  # the same worker, not restarted

        # A job made for 1.0 (queued before the upgrade, or re-run) still runs on 1.0, which
        # is installed beside the current one, and rewrites the same objects.
        assert requeue(node.db, node.celery, first.id, reason="test")
        assert wait_for(
            lambda: any(
                j.id == first.id and j.state == JobState.DONE and j.finished_at != first.finished_at
                for j in job_rows(node.db)
            ),
            timeout=60,
        )
        (again,) = [j for j in job_rows(node.db) if j.id == first.id]
        assert again.result is not None and again.result == first.result
        assert sr_version(again) == "1.0"
        # One engine per configured bundle: versions replace each other, never pile up.
        assert engine_cache.loaded() == engines
    finally:
        node.stop()
