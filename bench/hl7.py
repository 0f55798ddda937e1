"""HL7 listener throughput: ORU^R01 messages/s over one persistent MLLP connection.

Two receivers, each in its own process, get the same messages from the same client, one at a
time as interface engines send them (next message after the ACK):

- floor: a minimal raw asyncio MLLP server that answers each frame with a fixed AA carrying
  the message's MSH-10. It parses nothing and stores nothing: the cost of the transport alone.
- radfinder-node ``serve``: parse (tokenizer + hl7apy MSH check), store the report with its
  raw bytes (one transaction, the WAL fsynced, as in production), link attempt, hl7apy ACK.

Every run uses fresh control ids and accession numbers, so nothing is a duplicate. Runs are
interleaved ``--repeat`` times; best and median count. Reports whose study never arrives stay
waiting, which is the common case for a RIS feed (most reports are not chest CTs).

    .venv/bin/python bench/hl7.py [--messages 500] [--repeat 3] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ports import free_port, wait_port  # noqa: E402
from reports.hl7_writer import oru_r01  # noqa: E402
from reports.mllp import frame  # noqa: E402

REPORT = """Clinical information: Cough for 3 weeks, former smoker.
Technique: Non-contrast CT of the chest, 1.5 mm axial reconstructions.
Findings:
Trachea and main bronchi are patent.
There is a 9 mm solid nodule in the right upper lobe (series 2, image 88).
A second 4 mm nodule is seen in the left lower lobe (series 2, image 201).
Mild centrilobular emphysema in both upper lobes.
No consolidation. No pleural effusion.
Heart size is normal. Coronary artery calcifications are present.
No mediastinal or hilar lymphadenopathy.
Degenerative changes of the thoracic spine.
Impression:
9 mm right upper lobe nodule; follow-up CT in 3 to 6 months is recommended.
Mild emphysema."""


def messages(n: int, run: str) -> list[bytes]:
    base = datetime(2026, 1, 5, 8, 0)
    return [
        oru_r01(
            REPORT,
            accession_number=f"B{run}{i:06d}",
            patient_id=f"P{i:06d}",
            patient_name="Bench^Patient",
            study_uid=f"1.2.826.0.1.3680043.8.498.{run}.{i}",
            placer_order=f"PO{run}{i:06d}",
            filler_order=None,
            observation_datetime=base + timedelta(seconds=i),
            sending_facility="BENCHRIS",
            control_id=f"{run}{i:08d}",
        )
        for i in range(n)
    ]


# --- the floor: a raw asyncio echo-ACK server --------------------------------------------------


async def _floor_main(port: int) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        while data := await reader.read(262144):
            buf += data
            while (end := buf.find(b"\x1c\r")) >= 0:
                msg, buf = buf[1:end], buf[end + 2 :]
                control = msg.split(b"\r", 1)[0].split(b"|")[9]
                writer.write(
                    b"\x0bMSH|^~\\&|FLOOR|FLOOR|||20260101000000||ACK^R01^ACK|1|P|2.5.1\rMSA|AA|"
                    + control
                    + b"\r\x1c\r"
                )
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def start_floor(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, __file__, "--floor-server", str(port)])
    wait_port(port, 60)
    return proc


def start_node(workdir: Path, port: int, database_url: str | None) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "RADFINDER_HOST": "127.0.0.1",
        "RADFINDER_LOG_LEVEL": "WARNING",
        "RADFINDER_EMBEDDED_WORKER": "false",
    }
    if database_url:
        env["RADFINDER_DATABASE_URL"] = database_url
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "radfinder_node.cli",
            "serve",
            "--data-dir",
            str(workdir),
            "--port",
            str(free_port()),
            "--hl7-port",
            str(port),
        ],
        env=env,
        cwd=ROOT,
        stderr=(workdir.parent / f"{workdir.name}.log").open("ab"),
    )
    wait_port(port, 60)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def send_all(port: int, batch: list[bytes]) -> tuple[float, list[float]]:
    """Seconds for the batch over one connection, and each message's round trip."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        latencies: list[float] = []
        buf = b""
        start = time.perf_counter()
        for msg in batch:
            t0 = time.perf_counter()
            sock.sendall(frame(msg))
            while b"\x1c\r" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("receiver closed the connection")
                buf += chunk
            ack, buf = buf.split(b"\x1c\r", 1)
            if b"MSA|AA|" not in ack and b"MSA|CA|" not in ack:
                raise RuntimeError(f"not accepted: {ack!r}")
            latencies.append(time.perf_counter() - t0)
        return time.perf_counter() - start, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database-url", help="default: SQLite in the node's data dir")
    parser.add_argument("--floor-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_server:
        asyncio.run(_floor_main(args.floor_server))
        return

    size = len(messages(1, "S")[0])
    print(f"{args.messages} ORU^R01 messages of {size} bytes, one connection, {args.repeat} runs")
    with tempfile.TemporaryDirectory(prefix="bench-hl7-") as tmp:
        floor_port, node_port = free_port(), free_port()
        floor = start_floor(floor_port)
        node = start_node(Path(tmp) / "node", node_port, args.database_url)
        results: dict[str, list[tuple[float, list[float]]]] = {"floor": [], "radfinder": []}
        try:
            send_all(node_port, messages(20, "W"))  # warm-up: imports, first hl7apy templates
            send_all(floor_port, messages(20, "W"))
            for r in range(args.repeat):
                batch = messages(args.messages, f"R{r}")
                results["floor"].append(send_all(floor_port, batch))
                results["radfinder"].append(send_all(node_port, batch))
        finally:
            stop(node)
            stop(floor)

    rates: dict[str, tuple[float, float]] = {}
    print(f"{'receiver':<12} {'best msg/s':>11} {'median msg/s':>13} {'p50 ms':>8} {'p99 ms':>8}")
    for name, runs in results.items():
        per_s = [args.messages / seconds for seconds, _ in runs]
        lat = sorted(x for _, lats in runs for x in lats)
        p50 = lat[len(lat) // 2] * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        rates[name] = (max(per_s), statistics.median(per_s))
        print(f"{name:<12} {max(per_s):>11.1f} {statistics.median(per_s):>13.1f} "
              f"{p50:>8.2f} {p99:>8.2f}")  # fmt: skip
    best = rates["radfinder"][0] / rates["floor"][0]
    median = rates["radfinder"][1] / rates["floor"][1]
    print(f"ratio radfinder / floor: best {best:.3f}, median {median:.3f}")


if __name__ == "__main__":
    main()
