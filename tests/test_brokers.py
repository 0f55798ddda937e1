"""Jobs through real brokers: Redis (127.0.0.1:6379) with a `radfinder-node worker` subprocess,
RabbitMQ (127.0.0.1:5672) with an in-process worker. Each test uses its own queue name, so
concurrent runs never take each other's messages."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection
from test_worker import micro_bundle, wait_job

from conftest import node_settings, small_phantom, storescu
from dicom_io.synthetic import write_ct_series
from radfinder_node.celery_app import EMBEDDED_TRANSPORT, celery_config
from radfinder_node.job_models import Job, JobState
from radfinder_node.node import Node

__all__ = ["micro_bundle"]  # the session fixture, shared with test_worker

REDIS = "redis://127.0.0.1:6379/0"
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


def test_worker_settings_gpu_inference_needs(tmp_path: Path) -> None:
    embedded = celery_config(node_settings(data_dir=tmp_path, job_timeout_s=900))
    assert embedded["broker_url"] == f"sqlite:///{(tmp_path / 'broker.sqlite').resolve()}"
    assert embedded["broker_transport"] == EMBEDDED_TRANSPORT
    for config in (embedded, celery_config(node_settings(broker_url=REDIS))):
        assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
        assert config["worker_prefetch_multiplier"] == 1
        assert (config["worker_pool"], config["worker_concurrency"]) == ("solo", 1)
        assert config["task_default_queue"] == "inference"
    redis = celery_config(node_settings(broker_url=REDIS, job_timeout_s=900))
    assert redis["broker_transport_options"] == {"visibility_timeout": 1800}
    assert "broker_transport" not in redis
    pg = celery_config(node_settings(broker_url="sqla+postgresql+psycopg://u@h/db"))
    assert pg["broker_url"] == "sqla+postgresql+psycopg://u@h/db"
    assert pg["broker_transport_options"] == {}


@pytest.fixture
def queue() -> str:
    return f"inference-test-{secrets.token_hex(4)}"


def _delete_queue(url: str, name: str) -> None:
    with Connection(url) as conn, contextlib.suppress(Exception):  # gone already
        conn.default_channel.queue_delete(name)


def _send_series(node: Node, tmp_path: Path) -> str:
    hu, spacing = small_phantom()
    series = write_ct_series(tmp_path / "series", hu, spacing)
    assert node.port is not None
    assert storescu(node.port, series.paths[0].parent).returncode == 0
    return series.series_uid


def _check_done(job: Job, node: Node, worker_prefix: str) -> None:
    assert job.state == JobState.DONE, job.error
    assert job.attempts == 1
    assert job.worker is not None and job.worker.startswith(worker_prefix)
    assert job.result is not None and {o["kind"] for o in job.result["objects"]} == {"sr", "kos"}
    for obj in job.result["objects"]:
        assert (node.settings.results_dir / obj["path"]).is_file()


@pytest.fixture
def redis_worker(
    tmp_path: Path, queue: str, micro_bundle: Path
) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """`radfinder-node worker` as its own process, as a GPU host runs it."""
    data_dir = tmp_path / "node"
    log = (tmp_path / "worker.log").open("wb")
    env = {
        **os.environ,
        "RADFINDER_DATA_DIR": str(data_dir),
        "RADFINDER_BUNDLE_PATH": str(micro_bundle),
        "RADFINDER_LOG_JSON": "false",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "radfinder_node.cli", "worker", "-n", "gpu0@%h",
         "--broker", REDIS, "--queue", queue],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    yield data_dir, proc
    proc.terminate()
    try:
        proc.wait(timeout=30)
    finally:
        log.close()
        _delete_queue(REDIS, queue)


@pytest.mark.slow
@pytest.mark.integration
def test_redis_round_trip_with_a_worker_process(
    redis_worker: tuple[Path, subprocess.Popen[bytes]],
    queue: str,
    micro_bundle: Path,
    tmp_path: Path,
) -> None:
    data_dir, proc = redis_worker
    node = Node(
        node_settings(
            data_dir=data_dir,
            bundle_path=micro_bundle,
            broker_url=REDIS,
            queue=queue,
            embedded_worker=False,
        )
    )
    node.start()
    try:
        series_uid = _send_series(node, tmp_path)
        job = wait_job(node.db, series_uid, {JobState.DONE, JobState.FAILED}, timeout=120)
        assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        _check_done(job, node, "gpu0@")
    finally:
        node.stop()


@pytest.mark.slow
@pytest.mark.integration
def test_rabbitmq_round_trip_with_an_in_process_worker(
    queue: str, micro_bundle: Path, tmp_path: Path
) -> None:
    node = Node(
        node_settings(
            data_dir=tmp_path / "node",
            bundle_path=micro_bundle,
            broker_url=RABBITMQ,
            queue=queue,
        )
    )
    node.start()
    try:
        assert node.worker is not None and node.worker.alive
        series_uid = _send_series(node, tmp_path)
        job = wait_job(node.db, series_uid, {JobState.DONE, JobState.FAILED}, timeout=120)
        _check_done(job, node, "embedded-")
        with Connection(RABBITMQ) as conn:  # acknowledged: nothing left in the queue
            assert conn.default_channel.queue_declare(queue, passive=True).message_count == 0
    finally:
        node.stop()
        _delete_queue(RABBITMQ, queue)
