"""Shared fixtures: real databases, a real node on a loopback port, generated CT series."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import psycopg
import pytest

from radfinder_node.config import Settings, load_settings
from radfinder_node.node import Node

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / ".." / "shared" / "data" / "real"
PG_ADMIN = os.environ.get("RADFINDER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the local server, dropped afterwards."""
    name = f"radfinder_test_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    yield f"postgresql+psycopg://{base.split('://', 1)[1]}/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node.db'}"
    return str(request.getfixturevalue("pg_url"))


def node_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "quiet_period_s": 0.5,
        "completion_poll_s": 0.1,
        "hl7_port": 0,  # any free port: tests never collide on 2575
        "http_port": 0,  # likewise for the HTTP server's 8080
        "log_json": False,
    }
    values.update(overrides)
    return load_settings(None, **values)


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def _make(**overrides: object) -> Node:
        overrides.setdefault("data_dir", tmp_path / f"node{len(nodes)}")
        node = Node(node_settings(**overrides))
        node.start()
        nodes.append(node)
        return node

    yield _make
    for node in nodes:
        node.stop()


@pytest.fixture
def node(make_node: Callable[..., Node]) -> Node:
    return make_node()


def small_phantom(
    slices: int = 24, size: int = 64
) -> tuple[np.ndarray, tuple[float, float, float]]:
    from engines.data.phantoms import basic_chest_phantom

    spacing = (2.5, 5.0, 5.0)
    return basic_chest_phantom((slices, size, size), spacing, seed=1), spacing


@pytest.fixture
def chest_series(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 24-slice synthetic chest CT written to disk."""
    from dicom_io.synthetic import write_ct_series

    hu, spacing = small_phantom()
    return write_ct_series(tmp_path / "series", hu, spacing)


def storescu(port: int, path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu sends every file under ``path`` to the node on loopback (Nagle off)."""
    return subprocess.run(
        [
            "storescu",
            *options,
            "-aet",
            "DCMTK",
            "-aec",
            "RADFINDER",
            "+sd",
            "+r",
            "127.0.0.1",
            str(port),
            str(path),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def port_open(port: int) -> bool:
    """Whether something accepts connections on the loopback port: a server's readiness probe."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_serve(
    data_dir: Path,
    *args: str,
    env: Mapping[str, str],
    ready: Callable[[], bool],
    log: str = "node.log",
    timeout: float = 60,
) -> subprocess.Popen[bytes]:
    """`radfinder-node serve` in a process of its own, as a site runs it (so kill -9 is real).

    Returns once ``ready`` holds; otherwise fails with the node's stderr, kept in ``log``
    beside ``data_dir``, as the message, since that is where a node that did not come up says why.
    """
    log_path = data_dir.parent / log
    proc = subprocess.Popen(
        [sys.executable, "-m", "radfinder_node.cli", "serve", "--data-dir", str(data_dir), *args],
        env={**os.environ, "RADFINDER_HOST": "127.0.0.1", **env},
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("ab"),
    )
    assert wait_for(ready, timeout=timeout, interval=0.2), log_path.read_text()
    return proc


@pytest.fixture(scope="session")
def tower():  # type: ignore[no-untyped-def]
    """The frozen MiniLM text tower (offline), loaded once for every model test."""
    import torch

    from engines.model import TextTower

    torch.set_num_threads(2)
    return TextTower.from_pretrained(None, max_length=64, freeze=True)
