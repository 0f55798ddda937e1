"""The labelled set the miner is measured on, and the measurement.

Two sources, scored the same way:

- hand-written real-style sentences (``tests/data/mining_labelled.jsonl``): every citation form
  the miner claims, the traps (sizes, dates, counts, vertebral levels, segments), and sentences
  that mix both; one JSON object per line, ``{"id", "form", "text", "references": [{"series",
  "image"}, ...]}``;
- synthetic reports from the generator (``engines.data.reports.write_report``), whose citation
  truth gives labels for free. This module cannot import ``engines`` (DESIGN §2), so
  :func:`from_generated` takes anything shaped like its ``Report``.

A text's references are compared as a multiset of ``(series, image)``: a reference found twice
but written once counts one true and one false positive, whatever the snippet.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from reports.mining import ImageReference, find_references

__all__ = [
    "LabelledText",
    "Score",
    "from_generated",
    "load_labelled",
    "score",
]

Key = tuple[int | None, int]


@dataclass(frozen=True)
class LabelledText:
    id: str
    form: str
    text: str
    references: tuple[Key, ...]


class _CitationLike(Protocol):
    @property
    def series(self) -> int | None: ...

    @property
    def images(self) -> tuple[int, ...]: ...

    @property
    def form(self) -> str: ...


class _ReportLike(Protocol):
    @property
    def text(self) -> str: ...

    @property
    def language(self) -> str: ...

    @property
    def citations(self) -> Sequence[_CitationLike]: ...


def load_labelled(path: Path) -> list[LabelledText]:
    """The hand-written set; a malformed line is an error naming the line, not a skipped row."""
    out: list[LabelledText] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            refs = tuple(
                (None if r["series"] is None else int(r["series"]), int(r["image"]))
                for r in row["references"]
            )
            out.append(LabelledText(str(row["id"]), str(row["form"]), str(row["text"]), refs))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a labelled text ({exc})") from exc
    return out


def from_generated(report: _ReportLike, id: str) -> LabelledText:
    """A generated report as a labelled text; its form is "synthetic-<language>"."""
    refs = tuple((c.series, image) for c in report.citations for image in c.images)
    return LabelledText(id, f"synthetic-{report.language}", report.text, refs)


@dataclass
class Score:
    """Counts over a set, overall and per form, with the texts that went wrong."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    texts: int = 0
    by_form: dict[str, Counter[str]] = field(default_factory=dict)
    errors: list[tuple[LabelledText, list[Key]]] = field(default_factory=list)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0


def score(
    texts: Iterable[LabelledText],
    miner: Callable[[str], list[ImageReference]] = find_references,
) -> Score:
    out = Score()
    for item in texts:
        found = Counter((r.series, r.image) for r in miner(item.text))
        truth = Counter(item.references)
        tp = sum((found & truth).values())
        fp = sum(found.values()) - tp
        fn = sum(truth.values()) - tp
        out.tp, out.fp, out.fn, out.texts = out.tp + tp, out.fp + fp, out.fn + fn, out.texts + 1
        counts = out.by_form.setdefault(item.form, Counter())
        counts.update({"texts": 1, "tp": tp, "fp": fp, "fn": fn})
        if fp or fn:
            out.errors.append((item, sorted(found.elements(), key=lambda k: (k[0] or 0, k[1]))))
    return out
