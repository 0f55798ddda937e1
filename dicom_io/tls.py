"""TLS contexts for the DICOM and MLLP listeners and for outgoing C-STORE.

One place builds every ``ssl.SSLContext`` so that the node's three TLS endpoints share the same
floor (TLS 1.2, as the BCP 195 profiles of DICOM PS3.15 Annex B require) and the same meaning of
"client certificates required": a handshake without a certificate signed by the configured CA
fails before a single DICOM or HL7 byte is read. Bad paths or a key that does not match its
certificate raise :class:`TLSConfigError` naming the file, at start-up, not at the first peer.
"""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["TLSConfigError", "client_context", "peer_subject", "server_context"]

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TLSConfigError(ValueError):
    """A certificate, key or CA bundle that cannot be used; the message names it."""


def _existing(path: Path, what: str) -> str:
    if not path.is_file():
        raise TLSConfigError(f"TLS {what} not found: {path}")
    return str(path)


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path | None) -> None:
    cert_file = _existing(cert, "certificate")
    key_file = _existing(key, "private key") if key is not None else None
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"cannot use TLS certificate {cert} with key {key or cert}: {exc.reason or exc}"
        ) from exc


def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=_existing(ca, "CA bundle"))
    except ssl.SSLError as exc:
        raise TLSConfigError(f"cannot read TLS CA bundle {ca}: {exc.reason or exc}") from exc


def server_context(
    cert: Path,
    key: Path | None = None,
    *,
    ca: Path | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    """A listener's context. With ``ca`` a client certificate, when one is offered, must chain to
    it; ``require_client_cert`` also refuses clients that offer none (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    _load_chain(ctx, cert, key)
    if ca is not None:
        _load_ca(ctx, ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    elif require_client_cert:
        raise TLSConfigError("client certificates are required but no CA bundle is configured")
    return ctx


def client_context(
    *,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
) -> ssl.SSLContext:
    """A context for connecting out: the peer's certificate is verified (against ``ca``, else the
    system store) and its name checked; ``cert``/``key`` are offered when the peer asks."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verify_mode CERT_REQUIRED, check_hostname
    ctx.minimum_version = MINIMUM_VERSION
    if ca is not None:
        _load_ca(ctx, ca)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None:
        _load_chain(ctx, cert, key)
    return ctx


def peer_subject(sock: object) -> str | None:
    """The common name of a TLS peer's verified certificate, for logs; None without one."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert = sock.getpeercert()
    except (OSError, ValueError):
        return None
    return subject_common_name(cert)


def subject_common_name(cert: object) -> str | None:
    """``commonName`` of a certificate as ``getpeercert()`` returns it (None if absent)."""
    if not isinstance(cert, dict):
        return None
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None
