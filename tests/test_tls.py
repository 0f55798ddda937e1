"""TLS on both listeners and for outgoing C-STORE, with certificates made here by the openssl CLI.

Peers are real: dcmtk's storescu (+tls) and pynetdicom for DICOM, a Python ssl socket for MLLP.
Each refusal is checked on both sides: the client fails, and the node stored nothing.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydantic
import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from conftest import node_settings, wait_for
from dicom_io.scu import Destination, send_datasets
from dicom_io.synthetic import SyntheticSeries
from dicom_io.tls import TLSConfigError, client_context, server_context
from radfinder_node.models import Instance
from radfinder_node.node import Node
from radfinder_node.report_models import Report
from reports.mllp import frame

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Certs:
    """A test PKI: ``ca`` signs ``server`` and ``client``; ``rogue`` is a client of another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _make_leaf(d: Path, name: str, ca: str, cn: str) -> None:
    ext = d / f"{name}.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.csr", "-subj", f"/CN={cn}",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", ext.name,
        cwd=d,
    )  # fmt: skip


def make_certs(d: Path) -> Certs:
    d.mkdir(parents=True, exist_ok=True)
    _make_ca(d, "ca")
    _make_ca(d, "rogue-ca")
    _make_leaf(d, "server", "ca", "localhost")
    _make_leaf(d, "client", "ca", "PACS-CLIENT")
    _make_leaf(d, "rogue", "rogue-ca", "PACS-CLIENT")
    return Certs(
        d / "ca.crt",
        d / "server.crt",
        d / "server.key",
        d / "client.crt",
        d / "client.key",
        d / "rogue-ca.crt",
        d / "rogue.crt",
        d / "rogue.key",
    )


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("pki"))


def tls_settings(certs: Certs, **overrides: object) -> dict[str, object]:
    values: dict[str, object] = {
        "tls_cert": certs.server_cert,
        "tls_key": certs.server_key,
        "tls_ca": certs.ca,
        "tls_require_client_cert": True,
        "dicom_tls": True,
        "hl7_tls": True,
        "embedded_worker": False,
    }
    values.update(overrides)
    return values


@pytest.fixture
def tls_node(make_node: Callable[..., Node], certs: Certs) -> Node:
    return make_node(**tls_settings(certs))


def storescu_tls(port: int, files: list[Path], *tls: str) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu with the given TLS options (``+tls KEY CERT``, ``+tla``, ``+cf CA``)."""
    return subprocess.run(
        ["storescu", *tls, "-aet", "DCMTK", "-aec", "RADFINDER", "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def instance_count(node: Node) -> int:
    with node.db.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def test_storescu_over_tls_with_a_client_certificate_is_stored(
    tls_node: Node, certs: Certs, chest_series: SyntheticSeries, caplog: pytest.LogCaptureFixture
) -> None:
    assert tls_node.port is not None
    files = list(chest_series.paths)
    caplog.set_level("INFO", logger="dicom_io.scp")
    done = storescu_tls(
        tls_node.port,
        files,
        "+tls", str(certs.client_key), str(certs.client_cert),
        "+cf", str(certs.ca),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert instance_count(tls_node) == len(files)
    stored = dcmread(tls_node.spool.root / tls_node.spool.relative_path(
        chest_series.study_uid, chest_series.series_uid, chest_series.sop_uids[0]
    ))  # fmt: skip
    assert stored.pixel_array.tobytes() == dcmread(files[0]).pixel_array.tobytes()
    assert wait_for(
        lambda: any(r.getMessage() == "association closed" for r in caplog.records), timeout=5
    )
    closed = [r for r in caplog.records if r.getMessage() == "association closed"]
    assert closed[-1].fields["tls"] == "PACS-CLIENT"  # type: ignore[attr-defined]
    assert closed[-1].fields["instances"] == len(files)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "client",
    ["no certificate", "certificate of another CA", "no TLS at all"],
)
def test_clients_without_a_trusted_certificate_are_refused(
    tls_node: Node,
    certs: Certs,
    chest_series: SyntheticSeries,
    client: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert tls_node.port is not None
    caplog.set_level("WARNING", logger="dicom_io.scp")
    options = {
        "no certificate": ("+tla", "+cf", str(certs.ca)),
        "certificate of another CA": (
            "+tls", str(certs.rogue_key), str(certs.rogue_cert), "+cf", str(certs.ca),
        ),
        "no TLS at all": (),
    }[client]  # fmt: skip
    done = storescu_tls(tls_node.port, list(chest_series.paths[:2]), *options)
    assert done.returncode != 0, done.stdout + done.stderr
    assert instance_count(tls_node) == 0
    assert wait_for(
        lambda: any(r.getMessage() == "tls handshake failed" for r in caplog.records), timeout=5
    )
    # the listener is unharmed: a trusted client is served right after
    ok = storescu_tls(
        tls_node.port,
        list(chest_series.paths[:1]),
        "+tls", str(certs.client_key), str(certs.client_cert), "+cf", str(certs.ca),
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert instance_count(tls_node) == 1


def test_a_silent_connection_does_not_hold_up_other_tls_clients(
    tls_node: Node, certs: Certs, chest_series: SyntheticSeries
) -> None:
    """The handshake runs per connection: a peer that connects and never speaks TLS must not
    stall the accept loop (pynetdicom's own server handshakes there, without a timeout)."""
    assert tls_node.port is not None
    silent = socket.create_connection(("127.0.0.1", tls_node.port))
    try:
        t0 = time.monotonic()
        ok = storescu_tls(
            tls_node.port,
            list(chest_series.paths[:3]),
            "+tls", str(certs.client_key), str(certs.client_cert), "+cf", str(certs.ca),
        )  # fmt: skip
        elapsed = time.monotonic() - t0
    finally:
        silent.close()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert instance_count(tls_node) == 3
    assert elapsed < 5, elapsed


def test_outgoing_c_store_over_tls_verifies_the_peer(
    tls_node: Node, certs: Certs, chest_series: SyntheticSeries
) -> None:
    """pynetdicom as the TLS client (the outbox's sender) against the node's TLS listener."""
    assert tls_node.port is not None
    destination = Destination.parse(f"RADFINDER@127.0.0.1:{tls_node.port}+tls")
    assert destination.tls and str(destination).endswith("+tls")
    good = client_context(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    results = send_datasets(list(chest_series.paths[:2]), destination, tls=good, timeout_s=10)
    assert [r.ok for r in results] == [True, True], results
    assert instance_count(tls_node) == 2

    # the node's certificate is not trusted by a client that only knows the rogue CA
    distrust = client_context(ca=certs.rogue_ca, cert=certs.client_cert, key=certs.client_key)
    results = send_datasets(list(chest_series.paths[2:3]), destination, tls=distrust, timeout_s=5)
    assert not results[0].ok and "TLS" in (results[0].error or "")
    # a trusted server, but no client certificate: the node refuses
    anonymous = client_context(ca=certs.ca)
    results = send_datasets(list(chest_series.paths[2:3]), destination, tls=anonymous, timeout_s=5)
    assert not results[0].ok
    assert instance_count(tls_node) == 2


def test_outbox_sends_to_a_tls_destination(
    make_node: Callable[..., Node], certs: Certs, chest_series: SyntheticSeries
) -> None:
    """The node's own outbox, configured with a ``+tls`` destination, reaches a TLS peer (a
    second node) with the client context built from the same settings."""
    pacs = make_node(**tls_settings(certs, ae_title="PACS", hl7_enabled=False))
    sender = make_node(
        tls_cert=certs.client_cert,
        tls_key=certs.client_key,
        tls_ca=certs.ca,
        embedded_worker=False,
        hl7_enabled=False,
        destinations=[f"PACS@127.0.0.1:{pacs.port}+tls"],
    )
    assert sender.security.outgoing_tls is not None
    assert sender.outbox.tls is sender.security.outgoing_tls
    results = send_datasets(
        list(chest_series.paths[:1]),
        Destination.parse(sender.settings.destinations[0]),
        calling_ae=sender.settings.ae_title,
        tls=sender.outbox.tls,
    )
    assert results[0].ok, results
    assert instance_count(pacs) == 1


class TlsMllpClient:
    """MLLP over a Python ssl socket: one connection, one message at a time."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self._buf = b""

    def send(self, message: bytes) -> bytes:
        self.sock.sendall(frame(message))
        while b"\x1c\r" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("listener closed the connection")
            self._buf += chunk
        head, self._buf = self._buf.split(b"\x1c\r", 1)
        return head[1:]

    def close(self) -> None:
        self.sock.close()


def _oru(control_id: str) -> bytes:
    from test_hl7_listener import oru

    return oru(control_id)


def report_count(node: Node) -> int:
    with node.db.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(Report)) or 0)


def test_mllp_over_tls_with_a_client_certificate(tls_node: Node, certs: Certs) -> None:
    assert tls_node.hl7_port is not None
    client = TlsMllpClient(
        tls_node.hl7_port, client_context(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    )
    try:
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        for i in range(3):
            ack = client.send(_oru(f"TLS{i}"))
            assert b"MSA|AA|TLS" + str(i).encode() in ack, ack
    finally:
        client.close()
    assert report_count(tls_node) == 3


@pytest.mark.parametrize("client", ["no certificate", "certificate of another CA", "plain"])
def test_mllp_clients_without_a_trusted_certificate_get_nothing_stored(
    tls_node: Node, certs: Certs, client: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert tls_node.hl7_port is not None
    caplog.set_level("WARNING", logger="radfinder_node.hl7")
    port = tls_node.hl7_port
    if client == "plain":
        with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
            raw.sendall(frame(_oru("PLAIN1")))
            assert b"MSA|" not in read_until_closed(raw)
    else:
        context = (
            client_context(ca=certs.ca)
            if client == "no certificate"
            else client_context(ca=certs.ca, cert=certs.rogue_cert, key=certs.rogue_key)
        )
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            c = TlsMllpClient(port, context)  # TLS 1.3: the refusal can come after connecting
            try:
                c.send(_oru("NOCERT1"))
            finally:
                c.close()
    assert wait_for(
        lambda: any(r.getMessage() == "hl7 tls handshake failed" for r in caplog.records),
        timeout=15,
    )
    assert report_count(tls_node) == 0


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (or resets) the connection."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionError:
        pass
    return data


def test_tls_settings_that_cannot_work_fail_at_start_up(tmp_path: Path, certs: Certs) -> None:
    with pytest.raises(pydantic.ValidationError, match="tls_cert"):
        node_settings(data_dir=tmp_path, dicom_tls=True)
    with pytest.raises(pydantic.ValidationError, match="tls_ca"):
        node_settings(
            data_dir=tmp_path,
            tls_cert=certs.server_cert,
            tls_key=certs.server_key,
            tls_require_client_cert=True,
        )
    missing = node_settings(
        data_dir=tmp_path, hl7_tls=True, tls_cert=tmp_path / "nope.crt", tls_key=certs.server_key
    )
    with pytest.raises(TLSConfigError, match=r"nope\.crt"):
        Node(missing)
    mismatched = node_settings(
        data_dir=tmp_path, dicom_tls=True, tls_cert=certs.server_cert, tls_key=certs.client_key
    )
    with pytest.raises(TLSConfigError, match=r"server\.crt"):
        Node(mismatched)


def test_contexts_refuse_old_protocols_and_require_client_certs(certs: Certs) -> None:
    server = server_context(
        certs.server_cert, certs.server_key, ca=certs.ca, require_client_cert=True
    )
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert server.minimum_version >= ssl.TLSVersion.TLSv1_2
    optional = server_context(certs.server_cert, certs.server_key, ca=certs.ca)
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    with pytest.raises(TLSConfigError, match="CA bundle"):
        server_context(certs.server_cert, certs.server_key, require_client_cert=True)
    client = client_context(ca=certs.ca)
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED
