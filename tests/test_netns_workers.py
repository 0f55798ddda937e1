"""A site's topology without containers: one node on the host, two `radfinder-node worker`
processes on two other "hosts" (network namespaces joined to this one by veth pairs), sharing
PostgreSQL, Redis and the spool.

PostgreSQL and Redis listen on 127.0.0.1 only, which a namespace cannot reach (its loopback is
its own), so the test forwards each veth host address to them, and asserts that every
connection it forwarded came from a namespace address: the workers really talked over the
veth links. Only loopback and the namespaces' 10.213.x addresses are ever used.

The workers hold each job a few seconds once claimed (``RADFINDER_TEST_JOB_HOLD_S``, the test
hook in radfinder_node.tasks), so one can be killed with SIGKILL mid-job. Its message is
unacknowledged (late acks) and the job stays `running`; the node's reconciler re-queues it once
it is older than ``job_timeout_s`` and the other worker runs it. Every result reaches the PACS
(a dcmtk storescp) exactly once.

Needs root and iproute2 (skipped with the reason otherwise).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import asyncio
import contextlib
import ipaddress
import json
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from test_outbox import StoreSCP
from test_worker import job_rows, micro_bundle, outbound_rows

from conftest import free_port, node_settings, small_phantom, storescu, wait_for
from dicom_io.synthetic import write_ct_series
from radfinder_node.job_models import JobState, OutboundState
from radfinder_node.node import Node
from radfinder_node.tasks import HOLD_ENV
from radfinder_node.timeutil import as_utc

__all__ = ["micro_bundle"]  # the session fixture, shared with test_worker

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SERIES = 5
HOLD_S = 3.0  # each job waits this long once claimed: time to kill its worker mid-job
JOB_TIMEOUT_S = 45.0  # > hold + first job (imports, engine load): 18 s on a busy 2-core machine
PG = ("127.0.0.1", 5432)
REDIS = ("127.0.0.1", 6379)


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check)


def _why_not() -> str | None:
    """The reason this machine cannot run the test, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"rfprobe{os.getpid()}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.213.N.0/29 not on any interface here (two /30 links inside it)."""
    used = [
        ipaddress.ip_interface(line.split()[3]).network
        for line in _run("ip", "-o", "-4", "addr", "show").stdout.splitlines()
    ]
    for _ in range(100):
        net = ipaddress.ip_network(f"10.213.{secrets.randbelow(256)}.0/29")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.213.x.0/29 subnet")


@dataclass
class Namespace:
    """One worker "host": a namespace, a veth link to this one, a /30 on it."""

    name: str
    host_if: str
    ns_if: str
    host_addr: str
    ns_addr: str

    def create(self) -> None:
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _run("ip", "link", "set", self.ns_if, "netns", self.name)
        _run("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        _run("ip", "-n", self.name, "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_if)
        _run("ip", "-n", self.name, "link", "set", self.ns_if, "up")
        _run("ip", "-n", self.name, "link", "set", "lo", "up")

    def destroy(self) -> None:
        _run("ip", "netns", "del", self.name, check=False)  # takes its veth end, and the pair
        _run("ip", "link", "del", self.host_if, check=False)

    def exec(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]


@pytest.fixture
def namespaces() -> Iterator[list[Namespace]]:
    reason = _why_not()
    if reason is not None:
        pytest.skip(reason)
    net = _free_subnet()
    tag = secrets.token_hex(2)
    hosts = list(net.hosts())  # .1-.6: link 0 is .1/.2, link 1 is .5/.6
    made = [
        Namespace(f"rfw{tag}-{i}", f"rfh{tag}{i}", f"rfn{tag}{i}", str(hosts[4 * i]),
                  str(hosts[4 * i + 1]))
        for i in range(2)
    ]
    try:
        for ns in made:
            ns.create()
        yield made
    finally:
        for ns in made:
            ns.destroy()


@dataclass
class Forwarder:
    """TCP from ``binds`` (veth host addresses) to a loopback service, in a thread; records
    the address of every peer it served."""

    binds: list[str]
    target: tuple[str, int]
    peers: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(str(writer.get_extra_info("peername")[0]))
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def start(self) -> Forwarder:
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            try:
                for addr in self.binds:
                    server = await asyncio.start_server(self._serve, addr, 0)
                    self.ports[addr] = server.sockets[0].getsockname()[1]
            except BaseException as exc:
                failure.append(exc)
            ready.set()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(main())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="forwarder", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)


@dataclass
class Worker:
    name: str
    ns: Namespace
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _unacked_cleanup(queue: str) -> None:
    """Drop the killed worker's unacknowledged message from kombu's Redis bookkeeping (it is
    restored after the visibility timeout into a queue nobody will read again)."""
    client = redis.Redis(*REDIS)
    for tag, raw in client.hgetall("unacked").items():
        with contextlib.suppress(ValueError, IndexError, TypeError):
            if json.loads(raw)[2] == queue:
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)
    client.delete(queue)


def test_two_workers_in_two_namespaces(
    namespaces: list[Namespace], micro_bundle: Path, pg_url: str, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"  # the spool and results every "host" mounts
    queue = f"inference-netns-{secrets.token_hex(4)}"
    host_addrs = [ns.host_addr for ns in namespaces]
    pg_fwd = Forwarder(host_addrs, PG).start()
    redis_fwd = Forwarder(host_addrs, REDIS).start()
    pacs = StoreSCP(tmp_path / "pacs", free_port()).start()
    common = {
        "job_timeout_s": JOB_TIMEOUT_S,
        "queue": queue,
        "bundle_path": micro_bundle,
        "data_dir": shared,
    }
    node = Node(
        node_settings(
            **common,
            database_url=pg_url,
            broker_url=f"redis://{REDIS[0]}:{REDIS[1]}/0",
            embedded_worker=False,
            destinations=[pacs.destination],
            send_backoff_s=0.2,
            outbox_poll_s=0.2,
            reconcile_interval_s=1.0,
        )
    )
    node.start()
    workers: list[Worker] = []
    try:
        # The namespace's loopback is its own: the host's PostgreSQL is out of reach there.
        probe = _run(
            *namespaces[0].exec(
                sys.executable, "-c",
                f"import socket; socket.create_connection({PG!r}, timeout=2)",
            ),
            check=False,
        )
        assert probe.returncode != 0 and "Connection refused" in probe.stderr

        db_name = pg_url.rsplit("/", 1)[1]
        for i, ns in enumerate(namespaces):
            name = f"w{i + 1}"
            env = {
                **os.environ,
                "RADFINDER_DATA_DIR": str(shared),
                "RADFINDER_DATABASE_URL": (
                    f"postgresql+psycopg://postgres@{ns.host_addr}:{pg_fwd.ports[ns.host_addr]}"
                    f"/{db_name}"
                ),
                "RADFINDER_BROKER_URL": f"redis://{ns.host_addr}:{redis_fwd.ports[ns.host_addr]}/0",
                "RADFINDER_QUEUE": queue,
                "RADFINDER_BUNDLE_PATH": str(micro_bundle),
                "RADFINDER_JOB_TIMEOUT_S": str(JOB_TIMEOUT_S),
                "RADFINDER_LOG_JSON": "false",
                HOLD_ENV: str(HOLD_S),
            }
            log = tmp_path / f"{name}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    ns.exec(sys.executable, "-m", "radfinder_node.cli", "worker",
                            "-n", f"{name}@%h"),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            workers.append(Worker(name, ns, proc, log))
        for w in workers:
            assert wait_for(lambda w=w: " ready." in w.text(), timeout=120), w.text()[-3000:]

        hu, spacing = small_phantom()
        series = [write_ct_series(tmp_path / "series" / f"s{i}", hu, spacing)
                  for i in range(SERIES)]
        assert node.port is not None
        sent = storescu(node.port, tmp_path / "series")
        assert sent.returncode == 0, sent.stderr

        def worker_of(job_worker: str | None) -> str:
            return (job_worker or "").split("@", 1)[0]

        # Kill w1 in the middle of its second job (so it has finished one before).
        victim = workers[0]
        killed: list[int] = []

        def w1_busy_again() -> bool:
            rows = job_rows(node.db)
            done = [j for j in rows if j.state == JobState.DONE and worker_of(j.worker) == "w1"]
            running = [
                j for j in rows if j.state == JobState.RUNNING and worker_of(j.worker) == "w1"
            ]
            if done and running:
                killed.append(running[0].id)
                return True
            return False

        assert wait_for(w1_busy_again, timeout=180, interval=0.1), (
            [(j.id, j.state, j.worker) for j in job_rows(node.db)],
            victim.text()[-3000:],
        )
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        (killed_id,) = killed
        at_kill = next(j for j in job_rows(node.db) if j.id == killed_id)
        assert at_kill.state == JobState.RUNNING and at_kill.attempts == 1

        def all_done() -> bool:
            rows = job_rows(node.db)
            return len(rows) == SERIES and all(
                j.state in (JobState.DONE, JobState.FAILED) for j in rows
            )

        assert wait_for(all_done, timeout=JOB_TIMEOUT_S + 120, interval=0.2), (
            [(j.id, j.state, j.worker, j.error) for j in job_rows(node.db)],
            workers[1].text()[-3000:],
        )
        jobs = job_rows(node.db)
        assert all(j.state == JobState.DONE for j in jobs), [(j.id, j.error) for j in jobs]
        assert sorted(j.series_uid for j in jobs) == sorted(s.series_uid for s in series)
        # Spread over both workers; the killed job was run again, by the other one.
        by_worker = {worker_of(j.worker) for j in jobs if j.id != killed_id}
        assert by_worker == {"w1", "w2"}, [(j.id, j.worker) for j in jobs]
        again = next(j for j in jobs if j.id == killed_id)
        assert worker_of(again.worker) == "w2" and again.attempts == 2
        # Taken up only once the killed attempt was stale (the reconciler's job timeout).
        waited = (as_utc(again.started_at) - as_utc(at_kill.started_at)).total_seconds()
        assert waited >= JOB_TIMEOUT_S
        assert all(j.attempts == 1 for j in jobs if j.id != killed_id)

        # Every result reaches the PACS exactly once.
        expected = sorted(o["sop_uid"] for j in jobs for o in (j.result or {})["objects"])
        assert len(expected) == 2 * SERIES == len(set(expected))
        assert wait_for(
            lambda: len(outbound_rows(node.db)) == len(expected)
            and all(r.state == OutboundState.SENT for r in outbound_rows(node.db)),
            timeout=60,
        ), [(r.sop_uid, r.state, r.last_error) for r in outbound_rows(node.db)]
        wait_for(lambda: False, timeout=2.0)  # a few more outbox passes: nothing more goes
        assert pacs.received() == expected
        assert all(r.attempts == 1 for r in outbound_rows(node.db))

        # The workers reached PostgreSQL and Redis only over the veth links.
        ns_addrs = {ns.ns_addr for ns in namespaces}
        assert set(pg_fwd.peers) == ns_addrs and set(redis_fwd.peers) == ns_addrs
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.terminate()
                try:
                    w.proc.wait(30)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
                    w.proc.wait(10)
        node.stop()
        pacs.stop()
        pg_fwd.stop()
        redis_fwd.stop()
        _unacked_cleanup(queue)
