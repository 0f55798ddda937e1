"""Ingest throughput: storescu -> {dcmtk storescp, Orthanc, radfinder-node}, side by side.

One generated 300-slice 512x512 CT series is sent by dcmtk's storescu over one association, then
over 4 parallel associations (the files split in four), to each receiver in turn; every
configuration runs ``--repeat`` times, interleaved, and the best time counts. All receivers get
TCP_NODELAY=1 (Debian's dcmtk 3.6.7 and Orthanc 1.10 leave Nagle on otherwise) and a 128 KiB
maximum PDU. radfinder-node runs as in production: durable spool (fsync), SQLite rows committed
before each success status. Every receiver is sent to only once it has settled after starting
(its process idle for half a second, see Receiver.settle). The machine's 1-minute load average
is recorded before every run and printed with the results (runs are only comparable on an
otherwise idle machine).

    .venv/bin/python bench/ingest.py [--slices 300] [--repeat 3] [--receivers node,orthanc]
"""

from __future__ import annotations

import abc
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ports import free_port, wait_port  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}
PDU = 131072


class Receiver(abc.ABC):
    name = ""
    aet = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def count(self) -> int: ...

    def settle(self, quiet_s: float = 0.5, limit_s: float = 15.0) -> None:
        """Wait until the receiver has finished starting up: its process used under 5% of a
        CPU for ``quiet_s``. An open port is not enough: radfinder-node opens its DICOM port
        before it starts its worker, scheduler and web server, and a run that began at once
        measured that start-up too."""
        if self.proc is None:
            return
        deadline = time.monotonic() + limit_s
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu() -> float:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

        while time.monotonic() < deadline:
            before = cpu()
            time.sleep(quiet_s)
            if cpu() - before < 0.05 * quiet_s:
                return

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


class Storescp(Receiver):
    name, aet = "dcmtk storescp", "STORESCP"

    def start(self) -> None:
        out = self.workdir / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        self.out = out
        self.proc = subprocess.Popen(
            [
                "storescp",
                "--fork",
                "-aet",
                self.aet,
                "-pdu",
                str(PDU),
                "-od",
                str(out),
                str(self.port),
            ],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def count(self) -> int:
        return sum(1 for p in self.out.iterdir() if p.is_file())


class Orthanc(Receiver):
    name, aet = "Orthanc", "ORTHANC"

    def start(self) -> None:
        store = self.workdir / "store"
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir(parents=True)
        self.http = free_port()
        cfg = {
            "Name": "bench",
            "StorageDirectory": str(store),
            "IndexDirectory": str(store),
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "HttpPort": self.http,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "MaximumPduLength": PDU,
            "StorageCompression": False,
            "Plugins": [],
        }
        conf = self.workdir / "orthanc.json"
        conf.write_text(json.dumps(cfg))
        self.proc = subprocess.Popen(
            ["Orthanc", str(conf)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port)
        wait_port(self.http)

    def count(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/statistics") as r:
            return int(json.load(r)["CountInstances"])


class Node(Receiver):
    name, aet = "radfinder-node", "RADFINDER"
    fsync = True
    source: Path | None = None  # another checkout's packages, first on PYTHONPATH

    def start(self) -> None:
        data = self.workdir / "data"
        shutil.rmtree(data, ignore_errors=True)
        self.data = data
        env = {
            **ENV,
            "RADFINDER_HOST": "127.0.0.1",
            "RADFINDER_MAX_PDU": str(PDU),
            "RADFINDER_LOG_LEVEL": "WARNING",
            "RADFINDER_FSYNC": "true" if self.fsync else "false",
            "RADFINDER_HL7_PORT": "0",  # free ports: never fight another node over 2575/8080
            "RADFINDER_HTTP_PORT": "0",
        }
        if self.source is not None:
            env["PYTHONPATH"] = str(self.source)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "radfinder_node.cli",
                "serve",
                "--data-dir",
                str(data),
                "--port",
                str(self.port),
                "--ae-title",
                self.aet,
            ],
            env=env,
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def count(self) -> int:
        env = {**os.environ}
        if self.source is not None:
            env["PYTHONPATH"] = str(self.source)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "radfinder_node.cli",
                "status",
                "--json",
                "--data-dir",
                str(self.data),
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=self.workdir,
            env=env,
        )
        return int(json.loads(out.stdout)["instances"])


NOOP_SCP = """
import sys
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
ae = AE(ae_title="NOOP")
ae.maximum_pdu_size = int(sys.argv[2])
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
def established(event):
    event.assoc.dul._run_loop_delay = 0.0001  # as radfinder-node did before its fast path
def store(event):
    event.encoded_dataset()
    return 0x0000
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True,
                evt_handlers=[(evt.EVT_C_STORE, store), (evt.EVT_ESTABLISHED, established)])
"""


class NodeNoFsync(Node):
    """The same node with fsync off: what durability costs (not a configuration to run)."""

    name = "radfinder-node, fsync off"
    fsync = False


class PynetdicomFloor(Receiver):
    """pynetdicom with a handler that stores nothing: the floor of any pynetdicom SCP."""

    name, aet = "pynetdicom no-op", "NOOP"

    def start(self) -> None:
        self.received = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-c", NOOP_SCP, str(self.port), str(PDU)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def count(self) -> int:
        return -1  # stores nothing; storescu's exit status vouches for the transfer


def send(receiver: Receiver, groups: list[list[Path]]) -> float:
    """Run one storescu per group concurrently; wall seconds until all finished."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                "storescu",
                "-aet",
                "BENCH",
                "-aec",
                receiver.aet,
                "-pdu",
                str(PDU),
                "127.0.0.1",
                str(receiver.port),
                *map(str, group),
            ],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for group in groups
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {receiver.name} failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_series(directory: Path, slices: int) -> list[Path]:
    from dicom_io.synthetic import write_ct_series
    from engines.data.phantoms import basic_chest_phantom

    spacing = (1.5, 0.7, 0.7)
    hu = basic_chest_phantom((slices, 512, 512), spacing, seed=7)
    return sorted(write_ct_series(directory, hu, spacing).paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--receivers",
        default="",
        help="comma-separated subset of: storescp, orthanc, node, node-nofsync, noop "
        "(default: all; the ratio lines need orthanc, storescp, node and noop)",
    )
    parser.add_argument(
        "--assocs", default="1,4", help="association counts to run, comma-separated"
    )
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="a directory holding another version's packages (e.g. `git archive HEAD "
        "radfinder_node dicom_io engines reports | tar -x -C DIR`): adds receiver "
        "'baseline', that version of the node, configured as 'node' (before/after runs)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="rf-bench-ingest-") as tmp_name:
        tmp = Path(tmp_name)
        files = make_series(tmp / "series", args.slices)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"series: {len(files)} slices, {mb:.1f} MB, 512x512 int16, Explicit VR LE")
        by_key: dict[str, Callable[[Path], Receiver]] = {
            "storescp": Storescp,
            "orthanc": Orthanc,
            "node": Node,
            "node-nofsync": NodeNoFsync,
            "noop": PynetdicomFloor,
        }
        if args.baseline_src is not None:
            source = args.baseline_src.resolve()

            class Baseline(Node):
                name = f"radfinder-node @{source.name}"

            Baseline.source = source
            by_key["baseline"] = Baseline
        keys = [k.strip() for k in args.receivers.split(",") if k.strip()] or list(by_key)
        unknown = set(keys) - set(by_key)
        if unknown:
            parser.error(f"unknown receivers: {sorted(unknown)}")
        receivers = [by_key[k] for k in keys]
        counts = [int(n) for n in args.assocs.split(",")]
        results: dict[tuple[str, int], list[float]] = {}
        loads: dict[tuple[str, int], list[float]] = {}
        print(f"load average at start: {_load()}")
        for parallel in counts:
            groups = [files[i::parallel] for i in range(parallel)]
            for _ in range(args.repeat):
                for make in receivers:
                    r = make(tmp / make.__name__)  # type: ignore[attr-defined]
                    os.sync()  # every receiver starts with no dirty pages from the previous run
                    time.sleep(1.0)
                    r.start()
                    r.settle()
                    loads.setdefault((r.name, parallel), []).append(os.getloadavg()[0])
                    try:
                        seconds = send(r, groups)
                        received = r.count()
                    finally:
                        r.stop()
                    if received not in (len(files), -1):
                        raise RuntimeError(f"{r.name} has {received} of {len(files)} instances")
                    results.setdefault((r.name, parallel), []).append(seconds)

        print(f"load average at end: {_load()}")
        print(
            f"\n{'receiver':<26} {'assocs':>6} {'best s':>8} {'median s':>9} {'images/s':>9}"
            f" {'load':>10}"
        )
        best: dict[tuple[str, int], float] = {}
        for (name, parallel), times in results.items():
            best[(name, parallel)] = min(times)
            seen = loads[(name, parallel)]
            print(
                f"{name:<26} {parallel:>6} {min(times):>8.3f} {statistics.median(times):>9.3f}"
                f" {len(files) / min(times):>9.1f} {min(seen):>4.2f}-{max(seen):<5.2f}"
            )
        print()
        for parallel in counts:
            if not {("radfinder-node", parallel), ("Orthanc", parallel)} <= best.keys():
                continue
            node = len(files) / best[("radfinder-node", parallel)]
            orthanc = len(files) / best[("Orthanc", parallel)]
            line = f"{parallel} assoc: radfinder-node / Orthanc = {node / orthanc:.2f}x"
            if ("dcmtk storescp", parallel) in best:
                dcmtk = len(files) / best[("dcmtk storescp", parallel)]
                line += f", radfinder-node / dcmtk storescp = {node / dcmtk:.2f}x"
            if ("pynetdicom no-op", parallel) in best:
                floor = len(files) / best[("pynetdicom no-op", parallel)]
                line += f", pynetdicom no-op / Orthanc = {floor / orthanc:.2f}x"
            print(line + " (images/s ratios)")


if __name__ == "__main__":
    main()
