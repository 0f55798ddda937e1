"""DICOM UIDs: validation (PS3.5 §9.1), the only strings allowed to become spool path parts,
and deterministic derivation of the UIDs the node writes."""

from __future__ import annotations

import re
import uuid

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid UID: dotted numeric components, no leading zeros, <= 64."""
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


# Namespace of :func:`uid_from_key`; never change it, or re-run jobs would mint new objects.
_KEY_NAMESPACE = uuid.UUID("5f0b7c52-3d1e-4b8a-9c61-2a7e0d4f9b13")


def uid_from_key(key: str) -> str:
    """A ``2.25.`` UID (PS3.5 B.2) from a UUID5 of ``key``.

    Derived, not random, so that a job that runs twice writes objects with the same UIDs and the
    PACS keeps one copy (DESIGN.md §6).
    """
    if not key:
        raise ValueError("uid_from_key needs a non-empty key")
    return f"2.25.{uuid.uuid5(_KEY_NAMESPACE, key).int}"
