"""The Findings contract (DESIGN.md §3): what the application hands the DICOM writers.

Plain frozen dataclasses, so ``radfinder_node`` can build a result set from a prediction without
importing highdicom, and the SR and KOS writers can be tested without a model. Validation happens
here, once, so that a malformed result is refused before any object is written or sent.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from dicom_io.uids import is_valid_uid

__all__ = [
    "OWN_SCHEME",
    "OWN_SCHEME_NAME",
    "AlgorithmInfo",
    "Code",
    "FindingResult",
]

#: The project's own coding scheme for labels without a published code (DESIGN.md §5). The
#: "99" prefix is what PS3.16 §8.2 reserves for private schemes; such a scheme must be declared
#: in the Coding Scheme Identification Sequence of every object that uses it.
OWN_SCHEME: Final = "99RADFINDER"
OWN_SCHEME_NAME: Final = "radfinder-node finding codes"

# DICOM short-string limits the writers would otherwise trip over deep inside highdicom.
_SH_MAX: Final = 16
_LO_MAX: Final = 64


@dataclass(frozen=True)
class Code:
    """A coded concept: ``value`` and ``scheme`` are what a PACS matches, ``meaning`` is shown."""

    value: str
    scheme: str
    meaning: str
    scheme_version: str | None = None

    def __post_init__(self) -> None:
        if not self.value or not self.scheme or not self.meaning:
            raise ValueError(f"code needs value, scheme and meaning, got {self!r}")
        if len(self.scheme) > _SH_MAX:
            raise ValueError(f"coding scheme designator longer than {_SH_MAX}: {self.scheme!r}")
        if len(self.meaning) > _LO_MAX:
            raise ValueError(f"code meaning longer than {_LO_MAX}: {self.meaning!r}")

    @property
    def is_private_scheme(self) -> bool:
        """True for a ``99``-prefixed (local) scheme, which DICOM requires to be declared."""
        return self.scheme.startswith("99")


@dataclass(frozen=True)
class FindingResult:
    """One label's result. ``key_*`` name the key slice and are set only for present findings.

    ``finding_site`` disambiguates labels that share a finding code (arterial and coronary wall
    calcification are both "Vascular Calcification"); it is optional so the contract of
    DESIGN.md §3 stays the minimal one.
    """

    label: str
    code: Code
    probability: float
    threshold: float
    present: bool
    key_sop_instance_uid: str | None
    key_z_mm: float | None
    finding_site: Code | None = None

    def __post_init__(self) -> None:
        if not self.label or len(self.label) > _LO_MAX:
            raise ValueError(f"label must be 1..{_LO_MAX} characters, got {self.label!r}")
        for name in ("probability", "threshold"):
            value = getattr(self, name)
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not (ok and math.isfinite(value) and 0 <= value <= 1):
                raise ValueError(f"{self.label}: {name} must be a number in [0, 1], got {value!r}")
        if self.key_sop_instance_uid is not None:
            if not self.present:
                raise ValueError(f"{self.label}: an absent finding has no key slice")
            if not is_valid_uid(self.key_sop_instance_uid):
                raise ValueError(
                    f"{self.label}: key slice UID is not a valid UID: {self.key_sop_instance_uid!r}"
                )
        if self.key_z_mm is not None and not math.isfinite(self.key_z_mm):
            raise ValueError(f"{self.label}: key_z_mm must be finite, got {self.key_z_mm!r}")


@dataclass(frozen=True)
class AlgorithmInfo:
    """What produced the findings (TID 4019 and Contributing Equipment)."""

    name: str
    version: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    manufacturer: str = "radfinder-node"

    def __post_init__(self) -> None:
        for attr in ("name", "version", "manufacturer"):
            value = getattr(self, attr)
            if not value or len(value) > _LO_MAX:
                raise ValueError(f"algorithm {attr} must be 1..{_LO_MAX} characters: {value!r}")

    def parameter_strings(self) -> list[str]:
        """``key=value`` in key order, so the same parameters always encode the same way."""
        return [f"{k}={self.parameters[k]}" for k in sorted(self.parameters)]
