"""Who may talk to the node, and how much: the calling-AE allow-list with host checks, the
per-peer and per-instance limits, and the TLS contexts, built once from the settings.

An AE title alone is no credential on a hospital network (any workstation can claim ``PACS``),
so an allow-list entry can pin the title to where it may come from:

- ``PACS``                      the title from any address (the old, title-only form)
- ``PACS@10.0.0.5``             from one address (IPv6: ``PACS@[fd00::5]`` or ``PACS@fd00::5``)
- ``PACS@10.0.0.0/24``          from a network
- ``PACS@pacs.example.org``     from any address the name resolves to (forward lookup, cached;
                                reverse DNS is under the peer's control and never consulted)
- ``*@10.0.0.0/24``             any title from a network

Address checks are made on the TCP peer address, with IPv4-mapped IPv6 addresses unwrapped, so a
listener bound to ``::`` sees the same addresses as one bound to ``0.0.0.0``.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dicom_io.tls import client_context, server_context

if TYPE_CHECKING:
    from radfinder_node.config import Settings

__all__ = [
    "AllowEntry",
    "CallingAEAllowList",
    "NodeSecurity",
    "normalise_address",
    "security_from_settings",
]

log = logging.getLogger("radfinder_node.security")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], set[IPAddress]]

ANY_AE = "*"
DNS_TTL_S = 60.0


def normalise_address(address: str) -> IPAddress | None:
    """The peer address as an IP (IPv4-mapped IPv6 unwrapped); None if it is not an IP."""
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _check_ae(title: str, entry: str) -> str:
    if title == ANY_AE:
        return title
    if not 0 < len(title) <= 16 or "\\" in title or not title.isprintable():
        raise ValueError(
            f"allow-list entry {entry!r}: AE title must be 1-16 printable characters "
            "without backslash, or *"
        )
    return title


def _hostname_valid(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    return 0 < len(name) <= 253 and all(
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(c.isascii() and (c.isalnum() or c == "-") for c in label)
        for label in labels
    )


@dataclass(frozen=True)
class AllowEntry:
    """One parsed allow-list entry; ``str()`` gives back its canonical text."""

    ae_title: str
    network: IPNetwork | None = None
    hostname: str | None = None

    @classmethod
    def parse(cls, text: str) -> AllowEntry:
        """``AE``, ``AE@ADDRESS``, ``AE@NETWORK/PREFIX`` or ``AE@HOSTNAME``; ValueError says why."""
        entry = text.strip()
        title, sep, host = entry.rpartition("@")
        if not sep:
            return cls(_check_ae(entry, text))
        title = _check_ae(title.strip(), text)
        host = host.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            raise ValueError(f"allow-list entry {text!r}: empty host after '@'")
        try:
            network = ipaddress.ip_network(host, strict=True)
        except ValueError as exc:
            if "/" in host or host.replace(".", "").isdigit() or ":" in host:
                raise ValueError(f"allow-list entry {text!r}: {exc}") from None
        else:
            if isinstance(network, ipaddress.IPv6Network) and network.prefixlen == 128:
                mapped = network.network_address.ipv4_mapped
                if mapped is not None:
                    network = ipaddress.ip_network(mapped)
            return cls(title, network=network)
        if not _hostname_valid(host):
            raise ValueError(f"allow-list entry {text!r}: {host!r} is not an address or host name")
        return cls(title, hostname=host.lower().rstrip("."))

    def admits_title(self, calling_ae: str) -> bool:
        return self.ae_title == ANY_AE or self.ae_title == calling_ae

    def __str__(self) -> str:
        if self.network is not None:
            net = self.network
            host = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
            return f"{self.ae_title}@[{host}]" if net.version == 6 else f"{self.ae_title}@{host}"
        if self.hostname is not None:
            return f"{self.ae_title}@{self.hostname}"
        return self.ae_title


def resolve_host(name: str) -> set[IPAddress]:
    """Every address ``name`` resolves to (A and AAAA); empty if it does not resolve."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return set()
    out: set[IPAddress] = set()
    for info in infos:
        ip = normalise_address(str(info[4][0]))
        if ip is not None:
            out.add(ip)
    return out


class CallingAEAllowList:
    """Decides whether a calling AE title may associate from a peer address.

    Callable as ``allow_list(calling_ae, address)``: None when admitted, else the reason, which
    the SCP logs and answers with A-ASSOCIATE-RJ "calling AE title not recognized". Host names
    are resolved when first needed and again after ``ttl_s``, in the association's own thread.
    """

    def __init__(
        self,
        entries: Iterable[str],
        *,
        resolver: Resolver = resolve_host,
        ttl_s: float = DNS_TTL_S,
    ) -> None:
        self.entries: tuple[AllowEntry, ...] = tuple(
            AllowEntry.parse(e) for e in entries if e.strip()
        )
        self._resolver = resolver
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._resolved: dict[str, tuple[float, set[IPAddress]]] = {}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def _addresses(self, hostname: str) -> set[IPAddress]:
        now = time.monotonic()
        with self._lock:
            cached = self._resolved.get(hostname)
        if cached is not None and now - cached[0] < self._ttl_s:
            return cached[1]
        addresses = self._resolver(hostname)
        if not addresses:
            log.warning("allow-list host does not resolve", extra={"fields": {"host": hostname}})
        with self._lock:
            self._resolved[hostname] = (now, addresses)
        return addresses

    def _host_matches(self, entry: AllowEntry, ip: IPAddress | None) -> bool:
        if entry.network is None and entry.hostname is None:
            return True
        if ip is None:
            return False
        if entry.network is not None:
            return ip.version == entry.network.version and ip in entry.network
        assert entry.hostname is not None
        return ip in self._addresses(entry.hostname)

    def __call__(self, calling_ae: str, address: str) -> str | None:
        if not self.entries:
            return None
        title = calling_ae.strip()
        candidates = [e for e in self.entries if e.admits_title(title)]
        if not candidates:
            return f"calling AE title {title!r} is not on the allow-list"
        ip = normalise_address(address)
        if any(self._host_matches(e, ip) for e in candidates):
            return None
        return f"calling AE title {title!r} is not allowed from {address}"


@dataclass(frozen=True)
class NodeSecurity:
    """Everything the listeners and the outbox need to enforce the site's security settings."""

    allow_list: CallingAEAllowList
    max_associations_per_peer: int
    max_instance_bytes: int
    dicom_tls: ssl.SSLContext | None
    hl7_tls: ssl.SSLContext | None
    outgoing_tls: ssl.SSLContext | None

    def describe(self) -> dict[str, object]:
        """For the start-up log line: what is enforced, without key material."""
        return {
            "allowed_calling_aes": [str(e) for e in self.allow_list.entries],
            "max_associations_per_peer": self.max_associations_per_peer,
            "max_instance_bytes": self.max_instance_bytes,
            "dicom_tls": self.dicom_tls is not None,
            "hl7_tls": self.hl7_tls is not None,
            "client_cert_required": any(
                c is not None and c.verify_mode == ssl.CERT_REQUIRED
                for c in (self.dicom_tls, self.hl7_tls)
            ),
        }


def _wants_tls(destinations: Sequence[str]) -> bool:
    from dicom_io.scu import Destination

    return any(Destination.parse(d).tls for d in destinations)


def security_from_settings(settings: Settings) -> NodeSecurity:
    """Parse the allow-list and load the TLS material; raises ValueError (TLSConfigError) with
    the file or entry at fault, so a bad certificate stops the node at start-up."""
    listener: ssl.SSLContext | None = None
    if settings.dicom_tls or settings.hl7_tls:
        if settings.tls_cert is None:
            raise ValueError("dicom_tls/hl7_tls need tls_cert (and tls_key unless it is inside)")
        listener = server_context(
            settings.tls_cert,
            settings.tls_key,
            ca=settings.tls_ca,
            require_client_cert=settings.tls_require_client_cert,
        )
    outgoing: ssl.SSLContext | None = None
    if _wants_tls(settings.destinations):
        outgoing = client_context(ca=settings.tls_ca, cert=settings.tls_cert, key=settings.tls_key)
    return NodeSecurity(
        allow_list=CallingAEAllowList(settings.allowed_calling_aes),
        max_associations_per_peer=settings.max_associations_per_peer,
        max_instance_bytes=settings.max_instance_bytes,
        dicom_tls=listener if settings.dicom_tls else None,
        hl7_tls=listener if settings.hl7_tls else None,
        outgoing_tls=outgoing,
    )
