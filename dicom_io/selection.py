"""Which series of a study the node reads: rules, then one preferred series per study.

A PACS forwards everything of a study: scouts, dose reports, summary screenshots, thin and thick
reconstructions in soft and sharp kernels. Running the model on all of them wastes GPU time and
files duplicate results, so selection works in two steps, in the spirit of MONAI Deploy's series
selector:

1. **Rules** (site-configurable, TOML-shaped) decide which series are *candidates*: every
   condition in ``all`` must hold and, if ``any`` is non-empty, at least one of those.
2. A **preference** picks one candidate per study: by default the thinnest slices, then the
   softest kernel (the model was trained on soft-tissue reconstructions; sharp kernels add noise
   it has not seen), then the most instances, then the lowest series number.

Every input series gets a :class:`Decision` with a human-readable reason, because "why did the
node not read my study" is the first question a site asks.

Conditions test header attributes taken from one representative instance (:class:`SeriesSummary`)
plus three pseudo attributes: ``n_instances``, ``n_frames`` (instances times NumberOfFrames, so
one multi-frame Enhanced CT object counts as the slices it holds) and ``orientation`` (AXIAL,
CORONAL, SAGITTAL or OBLIQUE from ImageOrientationPatient).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from pydicom.datadict import keyword_dict
from pydicom.dataset import Dataset

__all__ = [
    "DEFAULT_SELECTION",
    "PREFERENCE_ALIASES",
    "PSEUDO_ATTRIBUTES",
    "SUMMARY_KEYWORDS",
    "Condition",
    "Decision",
    "Preference",
    "Rule",
    "SeriesSummary",
    "evaluate",
    "kernel_class",
    "kernel_softness",
    "orientation_label",
    "rules_from_config",
    "select_series",
    "summary_attributes",
    "summary_from_headers",
]

# ---------------------------------------------------------------------------------------------
# Default configuration (the [selection] table of radfinder.toml)

_CHEST_WORDS: Final = "chest|thorax|thx|lung|pulmo"

DEFAULT_SELECTION: Final[dict[str, Any]] = {
    "one_per_study": True,
    "prefer": ["thinnest", "soft_kernel", "most_instances"],
    "rules": [
        {
            "name": "chest-ct",
            "all": [
                {"attribute": "Modality", "in": ["CT"]},
                {
                    "attribute": "SOPClassUID",
                    "in": ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"],
                },
                {
                    "attribute": "ImageType",
                    "contains_all": ["ORIGINAL", "PRIMARY"],
                    "not_in": ["LOCALIZER"],
                },
                {"attribute": "orientation", "in": ["AXIAL"]},
                # Slices, not files: an Enhanced CT volume is one instance of many frames.
                {"attribute": "n_frames", "min": 20},
            ],
            "any": [
                # BodyPartExamined is often empty (e.g. Lung-PET-CT-Dx A0001), hence the
                # description fallbacks.
                {"attribute": "BodyPartExamined", "regex": "CHEST|THORAX|LUNG|TORSO"},
                {"attribute": "StudyDescription", "regex": _CHEST_WORDS},
                {"attribute": "SeriesDescription", "regex": _CHEST_WORDS},
                {"attribute": "ProtocolName", "regex": _CHEST_WORDS},
            ],
        }
    ],
}

# ---------------------------------------------------------------------------------------------
# Series summaries

# What a summary carries; what rules and preferences may reasonably ask about one series.
SUMMARY_KEYWORDS: Final[tuple[str, ...]] = (
    "Modality",
    "SOPClassUID",
    "ImageType",
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "SliceThickness",
    "ConvolutionKernel",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "SeriesNumber",
    "NumberOfFrames",
    "Manufacturer",
    "ManufacturerModelName",
)

PSEUDO_ATTRIBUTES: Final = frozenset({"n_instances", "n_frames", "orientation", "kernel_softness"})

# Where Enhanced (multi-frame) objects keep what classic objects have at the top level.
_FUNCTIONAL_GROUP_HOMES: Final[dict[str, tuple[str, ...]]] = {
    "ImageOrientationPatient": ("PlaneOrientationSequence",),
    "SliceThickness": ("PixelMeasuresSequence",),
    "PixelSpacing": ("PixelMeasuresSequence",),
    "ConvolutionKernel": ("CTReconstructionSequence",),
}


@dataclass(frozen=True)
class SeriesSummary:
    """One series as selection sees it: counts plus JSON-like attributes of one instance."""

    study_uid: str
    series_uid: str
    n_instances: int
    attributes: Mapping[str, Any] = field(default_factory=dict)


def _json_like(value: Any) -> Any:
    """DICOM values as str/int/float/list so summaries can live in a JSON column."""
    if value is None:
        return None
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bytes):
        return None
    if isinstance(value, Iterable):
        items = [_json_like(v) for v in value]
        return [v for v in items if v not in (None, "")]
    text = str(value).strip()
    return text


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or value == []


def _from_functional_groups(ds: Dataset, keyword: str) -> Any:
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(groups)
        if not seq:
            continue
        for macro in _FUNCTIONAL_GROUP_HOMES[keyword]:
            items = seq[0].get(macro)
            if items and keyword in items[0]:
                return items[0].get(keyword)
    return None


def summary_attributes(ds: Dataset) -> dict[str, Any]:
    """The :data:`SUMMARY_KEYWORDS` of one dataset, JSON-like, empty values left out.

    Enhanced objects are read through their functional groups, and an empty SOPClassUID falls
    back to the file meta (TotalSegmentator's example series has exactly that defect).
    """
    out: dict[str, Any] = {}
    for keyword in SUMMARY_KEYWORDS:
        value = ds.get(keyword)
        if _is_empty(value) and keyword in _FUNCTIONAL_GROUP_HOMES:
            value = _from_functional_groups(ds, keyword)
        if _is_empty(value) and keyword == "SOPClassUID":
            meta = getattr(ds, "file_meta", None)
            value = meta.get("MediaStorageSOPClassUID") if meta is not None else None
        value = _json_like(value)
        if not _is_empty(value):
            out[keyword] = value
    return out


def summary_from_headers(datasets: Sequence[Dataset]) -> SeriesSummary:
    """Summarise one series from its instances' headers (the first is the representative)."""
    if not datasets:
        raise ValueError("summary_from_headers needs at least one dataset")
    first = datasets[0]
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) != 1:
        raise ValueError(f"datasets span several series: {sorted(series_uids)}")
    return SeriesSummary(
        study_uid=str(first.get("StudyInstanceUID", "")),
        series_uid=series_uids.pop(),
        n_instances=len(datasets),
        attributes=summary_attributes(first),
    )


# ---------------------------------------------------------------------------------------------
# Derived values: orientation and kernel softness

# A gantry tilt (up to about 30 degrees) keeps a series axial; volume assembly, not selection,
# decides whether tilt can be corrected.
_PLANE_TOLERANCE_DEGREES: Final = 30.0
_PLANES: Final = ("SAGITTAL", "CORONAL", "AXIAL")  # plane whose normal is x, y, z (LPS)


def orientation_label(iop: Sequence[Any] | None) -> str | None:
    """AXIAL, CORONAL, SAGITTAL or OBLIQUE from ImageOrientationPatient; None if unusable."""
    if iop is None or isinstance(iop, str) or len(iop) != 6:
        return None
    try:
        r = [float(v) for v in iop[:3]]
        c = [float(v) for v in iop[3:]]
    except (TypeError, ValueError):
        return None
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    if norm < 1e-6:
        return None
    axis = max(range(3), key=lambda i: abs(n[i]))
    cos_angle = abs(n[axis]) / norm
    if cos_angle + 1e-9 < math.cos(math.radians(_PLANE_TOLERANCE_DEGREES)):
        return "OBLIQUE"
    return _PLANES[axis]


# Kernel softness on a 0 (sharpest) .. 100 (softest) scale, by vendor naming convention.
#   Siemens  <letter>[r|l|v|f]<NN><suffix>, e.g. B30f, Br38f, I70f, Qr40d: softness 100 - NN,
#            so B/Br <= 40 is soft (>= 60), >= 50 sharp (<= 50). I (SAFIRE), Q (ADMIRE),
#            H (head), J, U, D share the number scale.
#   GE       SOFT 80, STANDARD/STND/STD/STD+ 70, SMOOTH 75, DETAIL 55, CHEST 45, LUNG 25,
#            BONE 20, BONEPLUS 15, EDGE 10, HD variants as their base kernel.
#   Philips  A 75, B 70, C 65, UA/UB/UC (brain) 70, D 40, L 25, E/EB/EC 20, Y* (YA..YF) 20.
#   Canon/Toshiba FCnn: < 30 soft (70), 30..49 medium (50), >= 50 lung/bone sharp (25).
_GE_KERNELS: Final[dict[str, float]] = {
    "SOFT": 80,
    "SMOOTH": 75,
    "STANDARD": 70,
    "STND": 70,
    "STD": 70,
    "STD+": 70,
    "DETAIL": 55,
    "CHEST": 45,
    "LUNG": 25,
    "BONE": 20,
    "BONEPLUS": 15,
    "EDGE": 10,
}
_PHILIPS_KERNELS: Final[dict[str, float]] = {
    "A": 75,
    "B": 70,
    "C": 65,
    "UA": 70,
    "UB": 70,
    "UC": 70,
    "D": 40,
    "L": 25,
    "E": 20,
    "EB": 20,
    "EC": 20,
}
_SIEMENS: Final = re.compile(r"^[A-Z][a-z]?(\d{2})[a-z]?(\s|\\|$|_)", re.ASCII)
_CANON: Final = re.compile(r"^FC(\d{2})", re.IGNORECASE)
_SOFT_AT_LEAST: Final = 60.0
_SHARP_AT_MOST: Final = 50.0


def _one_kernel_softness(name: str) -> float | None:
    text = name.strip()
    if not text:
        return None
    upper = text.upper()
    base = upper.removeprefix("HD ").removesuffix(" HD").strip()
    if base in _GE_KERNELS:
        return _GE_KERNELS[base]
    if upper in _PHILIPS_KERNELS:
        return _PHILIPS_KERNELS[upper]
    if len(upper) == 2 and upper.startswith("Y"):
        return 20.0
    if m := _CANON.match(text):
        n = int(m.group(1))
        return 70.0 if n < 30 else 50.0 if n < 50 else 25.0
    if m := _SIEMENS.match(text):
        return 100.0 - int(m.group(1))
    return None


def kernel_softness(kernel: Any) -> float | None:
    """0 (sharpest) .. 100 (softest) from ConvolutionKernel; None if no convention applies.

    Multi-valued kernels (Siemens sends e.g. ``Br38f\\3``) use the first value that classifies.
    """
    values = kernel if isinstance(kernel, list | tuple) else [kernel]
    for value in values:
        if isinstance(value, str) and (score := _one_kernel_softness(value)) is not None:
            return score
    return None


def kernel_class(kernel: Any) -> str | None:
    """'soft', 'medium' or 'sharp' (for reasons), None when the kernel is unknown."""
    score = kernel_softness(kernel)
    if score is None:
        return None
    return "soft" if score >= _SOFT_AT_LEAST else "sharp" if score <= _SHARP_AT_MOST else "medium"


# ---------------------------------------------------------------------------------------------
# Conditions and rules

_CONDITION_KEYS: Final = frozenset(
    {"attribute", "regex", "min", "max", "in", "not_in", "contains_all", "allow_missing"}
)


@dataclass(frozen=True)
class Condition:
    """One test on one attribute; every test given must hold (``in_`` is config key ``in``)."""

    attribute: str
    regex: str | None = None
    min: float | None = None
    max: float | None = None
    in_: tuple[Any, ...] | None = None
    not_in: tuple[Any, ...] | None = None
    contains_all: tuple[Any, ...] | None = None
    allow_missing: bool = False
    # Compiled once; case-insensitive because descriptions are typed by hand in every case.
    pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.regex is not None:
            try:
                compiled = re.compile(self.regex, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"bad regex {self.regex!r}: {exc}") from exc
            object.__setattr__(self, "pattern", compiled)
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")


@dataclass(frozen=True)
class Rule:
    """A named candidate filter: all of ``all`` and, if given, one of ``any``."""

    name: str
    all: tuple[Condition, ...] = ()
    any: tuple[Condition, ...] = ()


def _attribute(s: SeriesSummary, name: str) -> Any:
    if name == "n_instances":
        return s.n_instances
    if name == "n_frames":
        frames = _number(s.attributes.get("NumberOfFrames"))
        return s.n_instances * (int(frames) if frames and frames > 0 else 1)
    if name == "orientation":
        return orientation_label(s.attributes.get("ImageOrientationPatient"))
    if name == "kernel_softness":
        return kernel_softness(s.attributes.get("ConvolutionKernel"))
    return s.attributes.get(name)


def _values(value: Any) -> list[Any]:
    """An attribute as a list of its non-empty values (empty list = missing)."""
    items = list(value) if isinstance(value, list | tuple) else [value]
    return [v.strip() if isinstance(v, str) else v for v in items if not _is_empty(v)]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _same(a: Any, b: Any) -> bool:
    """Numbers compare numerically ('5.00' == 5), text case-insensitively."""
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        return na == nb
    return str(a).strip().casefold() == str(b).strip().casefold()


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return repr(int(value)) if abs(value) < 1e15 else repr(value)
    return repr(value)


def _check(c: Condition, value: Any) -> str | None:
    """None if the condition holds, else why not."""
    name = c.attribute
    values = _values(value)
    if not values:
        return None if c.allow_missing else f"{name} is missing"
    shown = _show(values if len(values) > 1 else values[0])
    if (pattern := c.pattern) is not None and not any(pattern.search(str(v)) for v in values):
        return f"{name} {shown} does not match /{c.regex}/"
    if c.min is not None or c.max is not None:
        numbers = [n for n in (_number(v) for v in values) if n is not None]
        if not numbers:
            return f"{name} {shown} is not a number"
        if c.min is not None and not any(n >= c.min for n in numbers):
            return f"{name} {shown} < min {_show(c.min)}"
        if c.max is not None and not any(n <= c.max for n in numbers):
            return f"{name} {shown} > max {_show(c.max)}"
    if c.in_ is not None and not any(_same(v, w) for v in values for w in c.in_):
        return f"{name} {shown} not in {_show(list(c.in_))}"
    if c.not_in is not None:
        excluded = [v for v in values if any(_same(v, w) for w in c.not_in)]
        if excluded:
            return f"{name} {shown} contains excluded {_show(excluded[0])}"
    if c.contains_all is not None:
        absent = [w for w in c.contains_all if not any(_same(v, w) for v in values)]
        if absent:
            return f"{name} {shown} lacks {_show(absent)}"
    return None


def _holds(c: Condition, s: SeriesSummary) -> str | None:
    return _check(c, _attribute(s, c.attribute))


def _evaluate(rule: Rule, s: SeriesSummary) -> tuple[bool, str, str]:
    """Verdict, reason, and on success the evidence from ``any`` ('' when there is none)."""
    failures = [why for c in rule.all if (why := _holds(c, s)) is not None]
    if failures:
        return False, f"rule {rule.name!r}: " + "; ".join(failures), ""
    if not rule.any:
        return True, f"rule {rule.name!r} matched", ""
    any_failures: list[str] = []
    for c in rule.any:
        why = _holds(c, s)
        if why is None:
            evidence = _describe_match(c, s)
            return True, f"rule {rule.name!r} matched on {evidence}", evidence
        any_failures.append(why)
    reason = f"rule {rule.name!r}: none of the 'any' conditions hold: " + "; ".join(any_failures)
    return False, reason, ""


def evaluate(rule: Rule, s: SeriesSummary) -> tuple[bool, str]:
    """Whether ``s`` matches ``rule``, with a reason naming every failed condition."""
    ok, reason, _ = _evaluate(rule, s)
    return ok, reason


def _describe_match(c: Condition, s: SeriesSummary) -> str:
    values = _values(_attribute(s, c.attribute))
    shown = _show(values if len(values) > 1 else values[0]) if values else "missing"
    return f"{c.attribute} {shown}"


# ---------------------------------------------------------------------------------------------
# Preference

Direction = Literal["asc", "desc"]

# Config names for the usual keys, and how each reads in a reason.
PREFERENCE_ALIASES: Final[dict[str, tuple[str, Direction]]] = {
    "thinnest": ("SliceThickness", "asc"),
    "soft_kernel": ("kernel_softness", "desc"),
    "most_instances": ("n_instances", "desc"),
    "most_frames": ("n_frames", "desc"),
}
_ALIAS_PHRASES: Final[dict[tuple[str, str], str]] = {
    ("SliceThickness", "asc"): "thinnest",
    ("kernel_softness", "desc"): "soft kernel",
    ("n_instances", "desc"): "most instances",
    ("n_frames", "desc"): "most slices",
}


@dataclass(frozen=True)
class Preference:
    """Ordered sort keys, best first; lower SeriesNumber then Series UID break remaining ties."""

    keys: tuple[tuple[str, Direction], ...] = (
        ("SliceThickness", "asc"),
        ("kernel_softness", "desc"),
        ("n_instances", "desc"),
    )

    def describe(self) -> str:
        return ", ".join(_ALIAS_PHRASES.get(k, f"{k[0]} {k[1]}") for k in self.keys)


def _sort_value(s: SeriesSummary, key: str) -> float | str | None:
    value = _attribute(s, key)
    values = _values(value)
    if not values:
        return None
    number = _number(values[0])
    return number if number is not None else str(values[0]).casefold()


def _reversed_text(text: str) -> str:
    """A string that sorts in the reverse order of ``text`` (a prefix now sorts after)."""
    return "".join(chr(0x10FFFF - ord(ch)) for ch in text) + chr(0x10FFFF)


def _rank(s: SeriesSummary, preference: Preference) -> tuple[Any, ...]:
    """A sort key, smaller is better; a missing value ranks after every present one."""
    parts: list[Any] = []
    for key, direction in preference.keys:
        v = _sort_value(s, key)
        if v is None:
            parts.append((1, 0.0, ""))
        elif isinstance(v, float):
            parts.append((0, v if direction == "asc" else -v, ""))
        else:
            text = v if direction == "asc" else _reversed_text(v)
            parts.append((0, 0.0, text))
    series_number = _values(s.attributes.get("SeriesNumber"))
    number = _number(series_number[0]) if series_number else None
    parts.append((0 if number is not None else 1, number or 0.0, s.series_uid))
    return tuple(parts)


def _why_not(loser: SeriesSummary, winner: SeriesSummary, preference: Preference) -> str:
    """Name the first preference key on which the winner beats the loser."""
    for key, direction in preference.keys:
        a, b = _sort_value(winner, key), _sort_value(loser, key)
        if a == b:
            continue
        uid = winner.series_uid
        if b is None:
            return f"study has series {uid} with {key} {_show(a)} (this series has none)"
        if key == "SliceThickness":
            return f"study has thinner series {uid} ({_show(a)} mm < {_show(b)} mm)"
        if key == "kernel_softness":
            wk = winner.attributes.get("ConvolutionKernel")
            lk = loser.attributes.get("ConvolutionKernel")
            return (
                f"study has softer-kernel series {uid} "
                f"({_show(wk)} {kernel_class(wk)} vs {_show(lk)} {kernel_class(lk)})"
            )
        if key in {"n_instances", "n_frames"}:
            word = "instances" if key == "n_instances" else "slices"
            return f"study has series {uid} with more {word} ({_show(a)} > {_show(b)})"
        return (
            f"study has series {uid} ranked first by {key} {direction} ({_show(a)} vs {_show(b)})"
        )
    wn, ln = winner.attributes.get("SeriesNumber"), loser.attributes.get("SeriesNumber")
    tie = f"study has equally preferred series {winner.series_uid}"
    if wn != ln:
        return f"{tie} with lower SeriesNumber ({_show(wn)} < {_show(ln)})"
    return f"{tie} (first by Series UID)"


# ---------------------------------------------------------------------------------------------
# Selection


@dataclass(frozen=True)
class Decision:
    """The verdict on one series; ``reason`` is meant for people (logs, UI, the database)."""

    series_uid: str
    selected: bool
    reason: str


@dataclass(frozen=True)
class _Match:
    rule: str | None  # first matching rule, None when the series is not a candidate
    reason: str  # why not, when it is not a candidate
    evidence: str  # what satisfied the rule's 'any', for the selected reason


def _match(rules: Sequence[Rule], s: SeriesSummary) -> _Match:
    failures: list[str] = []
    for rule in rules:
        ok, why, evidence = _evaluate(rule, s)
        if ok:
            return _Match(rule.name, why, evidence)
        failures.append(why)
    if not failures:
        return _Match(None, "not a candidate: no selection rules configured", "")
    return _Match(None, "not a candidate: " + " | ".join(failures), "")


def _selected_reason(m: _Match, preference: Preference | None) -> str:
    reason = f"selected by rule {m.rule!r}"
    if preference is not None:
        reason += f" (preferred: {preference.describe()})"
    return reason + (f"; matched on {m.evidence}" if m.evidence else "")


def select_series(
    summaries: Sequence[SeriesSummary],
    rules: Sequence[Rule],
    preference: Preference,
    *,
    one_per_study: bool = True,
) -> list[Decision]:
    """One decision for every input series, in input order.

    Series matching any rule are candidates; with ``one_per_study`` the best candidate of each
    study by ``preference`` is selected and the others are ignored with the reason they lost.
    """
    matched = {s.series_uid: _match(rules, s) for s in summaries}
    winners: dict[str, SeriesSummary] = {}
    if one_per_study:
        for s in summaries:
            if matched[s.series_uid].rule is None:
                continue
            best = winners.get(s.study_uid)
            if best is None or _rank(s, preference) < _rank(best, preference):
                winners[s.study_uid] = s
    decisions: list[Decision] = []
    for s in summaries:
        m = matched[s.series_uid]
        if m.rule is None:
            decisions.append(Decision(s.series_uid, False, m.reason))
        elif not one_per_study:
            decisions.append(Decision(s.series_uid, True, _selected_reason(m, None)))
        elif winners[s.study_uid] is s:
            decisions.append(Decision(s.series_uid, True, _selected_reason(m, preference)))
        else:
            loss = _why_not(s, winners[s.study_uid], preference)
            decisions.append(Decision(s.series_uid, False, f"not preferred: {loss}"))
    return decisions


# ---------------------------------------------------------------------------------------------
# Configuration

_SELECTION_KEYS: Final = frozenset({"one_per_study", "prefer", "rules"})
_RULE_KEYS: Final = frozenset({"name", "all", "any"})


def _unknown(where: str, data: Mapping[str, Any], allowed: Iterable[str]) -> None:
    extra = sorted(set(data) - set(allowed))
    if extra:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(map(repr, extra))}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )


def _mapping(where: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a table, got {type(value).__name__}")
    return value


def _list(where: str, value: Any) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
    return list(value)


def _known_attribute(where: str, name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: 'attribute' must be a non-empty string")
    if name not in PSEUDO_ATTRIBUTES and name not in keyword_dict:
        raise ValueError(
            f"{where}: unknown attribute {name!r}; use a DICOM keyword (e.g. 'SeriesDescription') "
            f"or one of {', '.join(sorted(PSEUDO_ATTRIBUTES))}"
        )
    return name


def _scalar_list(where: str, key: str, value: Any) -> tuple[Any, ...]:
    items = _list(f"{where}.{key}", value)
    if not items or not all(
        isinstance(v, str | int | float) and not isinstance(v, bool) for v in items
    ):
        raise ValueError(f"{where}.{key}: expected a non-empty list of strings or numbers")
    return tuple(items)


def _bound(where: str, key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}.{key}: expected a number, got {value!r}")
    return float(value)


def _condition(where: str, data: Any) -> Condition:
    table = _mapping(where, data)
    _unknown(where, table, _CONDITION_KEYS)
    attribute = _known_attribute(where, table.get("attribute"))
    tests = set(table) - {"attribute", "allow_missing"}
    if not tests:
        raise ValueError(
            f"{where}: condition on {attribute!r} has no test; "
            "give one of regex, min, max, in, not_in, contains_all"
        )
    regex = table.get("regex")
    if regex is not None and not isinstance(regex, str):
        raise ValueError(f"{where}.regex: expected a string")
    allow_missing = table.get("allow_missing", False)
    if not isinstance(allow_missing, bool):
        raise ValueError(f"{where}.allow_missing: expected true or false")
    lists = {
        key: _scalar_list(where, key, table[key]) if key in table else None
        for key in ("in", "not_in", "contains_all")
    }
    try:
        return Condition(
            attribute=attribute,
            regex=regex,
            min=_bound(where, "min", table.get("min")),
            max=_bound(where, "max", table.get("max")),
            in_=lists["in"],
            not_in=lists["not_in"],
            contains_all=lists["contains_all"],
            allow_missing=allow_missing,
        )
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _rule(where: str, data: Any) -> Rule:
    table = _mapping(where, data)
    name = table.get("name")
    if isinstance(name, str) and name.strip():
        where = f"{where} ({name!r})"
    _unknown(where, table, _RULE_KEYS)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: every rule needs a non-empty 'name'")
    all_ = tuple(
        _condition(f"{where}.all[{i}]", c)
        for i, c in enumerate(_list(f"{where}.all", table.get("all", [])))
    )
    any_ = tuple(
        _condition(f"{where}.any[{i}]", c)
        for i, c in enumerate(_list(f"{where}.any", table.get("any", [])))
    )
    if not all_ and not any_:
        raise ValueError(f"{where}: rule has no conditions and would select every series")
    return Rule(name=name, all=all_, any=any_)


def _preference(where: str, data: Any) -> Preference:
    keys: list[tuple[str, Direction]] = []
    for i, item in enumerate(_list(where, data)):
        here = f"{where}[{i}]"
        if isinstance(item, str):
            if item not in PREFERENCE_ALIASES:
                raise ValueError(
                    f"{here}: unknown preference {item!r}; use one of "
                    f"{', '.join(PREFERENCE_ALIASES)} or [attribute, 'asc'|'desc']"
                )
            keys.append(PREFERENCE_ALIASES[item])
            continue
        pair = _list(here, item)
        if len(pair) != 2 or pair[1] not in ("asc", "desc"):
            raise ValueError(f"{here}: expected [attribute, 'asc'|'desc'], got {item!r}")
        direction: Direction = "asc" if pair[1] == "asc" else "desc"
        keys.append((_known_attribute(here, pair[0]), direction))
    return Preference(keys=tuple(keys))


def rules_from_config(data: Mapping[str, Any]) -> tuple[list[Rule], Preference]:
    """Parse the ``[selection]`` table (see :data:`DEFAULT_SELECTION`).

    Keys left out take their defaults, so a site can override only ``prefer``. Raises
    ValueError naming the offending key path on anything it does not understand, because a
    silently ignored typo here means studies silently not read.
    """
    table = _mapping("selection", data)
    if set(table) == {"selection"}:  # the whole TOML document rather than its table
        table = _mapping("selection", table["selection"])
    _unknown("selection", table, _SELECTION_KEYS)
    if not isinstance(table.get("one_per_study", True), bool):
        raise ValueError("selection.one_per_study: expected true or false")
    raw_rules = _list("selection.rules", table.get("rules", DEFAULT_SELECTION["rules"]))
    if not raw_rules:
        raise ValueError("selection.rules: empty, no series would ever be selected")
    rules = [_rule(f"selection.rules[{i}]", r) for i, r in enumerate(raw_rules)]
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise ValueError(f"selection.rules: duplicate rule names in {names}")
    preference = _preference("selection.prefer", table.get("prefer", DEFAULT_SELECTION["prefer"]))
    return rules, preference
