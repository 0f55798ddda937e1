"""DICOM UID validation (PS3.5 §9.1): the only strings allowed to become spool path parts."""

from __future__ import annotations

import re

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid UID: dotted numeric components, no leading zeros, <= 64."""
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None
