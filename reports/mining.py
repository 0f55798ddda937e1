"""Image references in report text: "series 3, image 45" -> (3, 45) and the words it describes.

Radiologists cite the slice where they saw a finding; each citation pairs a sentence with a
position in the volume, free supervision for the localization objective (DESIGN §1, the miner).
A false pair teaches the model a wrong place, so precision comes first: a number counts as an
image number only when an image word names it ("image", "section", "slice", "Bild",
"Schicht", "Im:", ...) and nothing around it says it is something else: a unit ("17 mm",
"sections 1.5 mm"), a decimal, a date ("12/03/2024"), a range of sizes ("slices 1 to 2 cm") or a
letter glued to it ("3D"). Vertebral levels ("T4"), segments ("segment 6"), counts ("3 nodules",
"2 series of images") carry no image word and are never candidates.

Forms (case-insensitive, English and German; sizes and separators as typed in real reports):

- series first: "series 3 image 129", "serial: 201 image: 92", "(series 5 section 379)",
  "(Se: 3, Im: 86/232)", "(series 2 IMA: 177)", "Serie 3, Bild 45", "(Serie 3/Bild 45)",
  "series 2 images 206 and 286", "series/image 4/112";
- image first: "(in image 18 in series 2)", "image 45 of series 3", "Bild 45 der Serie 3",
  "image 45 (series 3)";
- bare: "section 48", "image 449", "(Section No: 36/192)", "Im: 86/232", "images 206 and 286",
  "Bilder 12 und 18", "images 40-45" (a range yields its two ends, as the report writer means
  "the finding spans these").

A bare "im" is German for "in the" and a bare "IMA" an artery, so alone they need a colon or
period ("Im: 86"); after a series number ("Se 3, Im 86") they are safe.

Offsets: a citation naming several images yields one reference per image. The first carries the
span of the whole citation (from its first keyword to its last number or closing bracket; words
that introduce it, "on", "(in", are not part of it); each further one carries the span of its own
number. So ``(report, start)`` identifies a reference uniquely.

The snippet is the clause holding the citation (reports.sentences), cut further when one clause
cites several findings, with the citation and the words that introduce it removed and the
punctuation tidied: what the model may read must not name the slice. A clause that is nothing
but its citation ("Erguss; Serie 3, Bild 45.") takes the clause or sentence before it.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from reports.sentences import Segment, clauses, sentences, strip_list_marker

__all__ = ["Citation", "ImageReference", "find_citations", "find_references", "remove_citations"]


@dataclass(frozen=True)
class ImageReference:
    """One cited image. ``series`` is None when the report names no series ("image 449")."""

    series: int | None
    image: int
    snippet: str
    start: int
    end: int


@dataclass(frozen=True)
class Citation:
    """One citation as written: its span, its series, and every image with its number's span."""

    start: int
    end: int
    series: int | None
    images: tuple[int, ...]
    image_spans: tuple[tuple[int, int], ...]


# ---------------------------------------------------------------------------------------------
# Keywords

_SERIES_WORDS: Final = r"series|serien|serie|serial|ser\.|ser|se\.|se"
_IMAGE_WORDS: Final = (
    r"images|image|img\.|img|ima|im\.|im|bild-?nr\.?|bildnr\.?|bilder|bild|sections|section"
    r"|slices|slice|sl\.|schichten|schicht"
)
_PLURAL: Final = frozenset({"images", "bilder", "sections", "slices", "schichten"})
_ANCHOR: Final = re.compile(
    rf"(?<![\w/])(?:(?P<series>{_SERIES_WORDS})|(?P<image>{_IMAGE_WORDS}))(?![^\W\d_]|-)",
    re.IGNORECASE,
)
_IMAGE_KW: Final = re.compile(rf"(?:{_IMAGE_WORDS})(?![^\W\d_]|-)", re.IGNORECASE)
_SERIES_KW: Final = re.compile(rf"(?:{_SERIES_WORDS})(?![^\W\d_]|-)", re.IGNORECASE)
# Alone, these need a colon or period, or a series after them ("IM 45 SE 3"): "im" is German
# for "in the", "IMA" an artery.
_NEEDS_PUNCT: Final = frozenset({"im", "ima"})

# ---------------------------------------------------------------------------------------------
# Numbers and what may follow them

_NUMBER: Final = re.compile(
    r"[ \t]*(?:-?(?:no|nr|number|num)(?![\w])\.?)?[ \t]*[:#]?[ \t]*(\d{1,5})(?!\d)", re.IGNORECASE
)
# After a number, any of these says it is not an image number.
_NOT_AN_IMAGE: Final = re.compile(
    r"[.,:]\d"  # decimal or time: 3.5, 1,5, 12:30
    r"|[^\W\d_]"  # a letter glued to it: 3D, 5mm, 2nd
    r"|[/.-]\d{1,4}[/.-]\d"  # a date: 12/03/2024, 12.03.2024, 12-03-2024
    r"|[ \t]*(?:°|%|×|\"|'|x[ \t]*\d)"
    r"|[ \t]*(?:mm|cm|m|ml|cc|l|hu|kg|mg|kv|mas|msv|mgy|cgy|gy|years?|yrs?|y/o|jahre?n?"
    r"|monate?n?|months?|wochen|weeks?|days?|tage?n?|min|minutes?|sec|seconds?|h|hours?"
    r"|mal|times|x)(?![\w])",
    re.IGNORECASE,
)
_TOTAL: Final = re.compile(
    r"[ \t]*(?:/|of(?![\w])|von(?![\w]))[ \t]*(\d{1,5})(?!\d)", re.IGNORECASE
)
_LIST_SEP: Final = re.compile(
    r"\s*(?:(?P<range>-|–|to(?![\w])|bis(?![\w])|through(?![\w])|thru(?![\w]))"
    r"|(?P<list>,|&|and(?![\w])|und(?![\w])|or(?![\w])|oder(?![\w])|sowie(?![\w])))\s*",
    re.IGNORECASE,
)
# Between a series number and the image word: "series 3, image", "Serie 3/Bild", "Se: 3 Im".
_SERIES_TO_IMAGE: Final = re.compile(
    r"(?P<open>[ \t]*[(\[])?[ \t]*[,;/:]?\s*(?:(?:on|at|in|and|und|auf)[ \t]+)?",
    re.IGNORECASE,
)
# Between an image number and a series word: "image 18 in series 2", "Bild 45 der Serie 3".
_IMAGE_TO_SERIES: Final = re.compile(
    r"(?P<open>[ \t]*[(\[])?[ \t]*[,;]?[ \t]*"
    r"(?:(?:of|in|on|from|aus|der|in[ \t]+der|auf|von|,)[ \t]+)?(?:the[ \t]+|der[ \t]+)?",
    re.IGNORECASE,
)
_CLOSE: Final = re.compile(r"[ \t]*[)\]]")
# "series/image 4/112": one keyword pair, two numbers.
_COMBINED: Final = re.compile(
    r"[ \t]*/[ \t]*(?:images?|img\.?|ima|im\.?|bild)[ \t]*[:#]?[ \t]*(\d{1,5})[ \t]*[/:][ \t]*"
    r"(\d{1,5})(?!\d)",
    re.IGNORECASE,
)


_COUNT_BEFORE: Final = re.compile(
    r"(?:number[ \t]+of|no\.?[ \t]+of|total(?:[ \t]+of)?|count[ \t]+of|anzahl(?:[ \t]+der)?)"
    r"[ \t]*$",
    re.IGNORECASE,
)


class _Rejected(Exception):
    """The keyword's number is a size, date or range of sizes: no citation here at all."""


def _number(text: str, pos: int) -> tuple[int, int, int] | None:
    """(value, start, end) of the number an image word names at ``pos``; None when there is
    none on that line; raises _Rejected when there is one but it is not an image number."""
    m = _NUMBER.match(text, pos)
    if m is None:
        return None
    if _NOT_AN_IMAGE.match(text, m.end()):
        raise _Rejected
    return int(m.group(1)), m.start(1), m.end(1)


def _with_total(text: str, end: int) -> int:
    """Past "/232" or "of 232" ("Im: 86/232": image 86 of 232), when it is one."""
    m = _TOTAL.match(text, end)
    if m is None or _NOT_AN_IMAGE.match(text, m.end()):
        return end
    return m.end()


def _image_list(
    text: str, pos: int, plural: bool
) -> tuple[list[int], list[tuple[int, int]], int] | None:
    """Image numbers from ``pos``: "206", "206 and 286", "12, 15 and 18", "40-45", each
    possibly "/total"; None when no number follows."""
    first = _number(text, pos)
    if first is None:
        return None
    images = [first[0]]
    spans = [(first[1], first[2])]
    end = _with_total(text, first[2])
    while True:
        sep = _LIST_SEP.match(text, end)
        if sep is None:
            break
        kw = _IMAGE_KW.match(text, sep.end())
        at = kw.end() if kw else sep.end()
        if sep.group("list") == "," and not plural and kw is None:
            break  # "image 45, 3 nodules": a comma after one image does not start a list
        try:
            nxt = _number(text, at)
        except _Rejected:
            if sep.group("range"):
                raise  # "sections 1 to 2 cm": the first number was a size too
            break
        if nxt is None or (kw is None and text[sep.end() : nxt[1]].strip(" \t:#")):
            break
        images.append(nxt[0])
        spans.append((nxt[1], nxt[2]))
        end = _with_total(text, nxt[2])
    return images, spans, end


def _series_number(text: str, pos: int) -> tuple[int, int] | None:
    """(value, end) of a series number; none when it is a size, decimal or date."""
    m = _NUMBER.match(text, pos)
    if m is None or _NOT_AN_IMAGE.match(text, m.end()):
        return None
    return int(m.group(1)), m.end()


def _series_first(text: str, kw: re.Match[str]) -> Citation | None:
    """ "series 3 image 45" and its kin, from a series keyword."""
    combined = _COMBINED.match(text, kw.end())
    if combined is not None:
        if _NOT_AN_IMAGE.match(text, combined.end()):
            return None
        span = (combined.start(2), combined.end(2))
        return Citation(
            kw.start(), combined.end(), int(combined.group(1)), (int(combined.group(2)),), (span,)
        )
    series = _series_number(text, kw.end())
    if series is None:
        return None
    link = _SERIES_TO_IMAGE.match(text, series[1])
    assert link is not None  # every part is optional
    image_kw = _IMAGE_KW.match(text, link.end())
    if image_kw is None:
        return None  # "series 3" alone names no image
    found = _image_list(text, image_kw.end(), image_kw.group().lower() in _PLURAL)
    if found is None:
        return None
    images, spans, end = found
    if link.group("open"):
        close = _CLOSE.match(text, end)
        end = close.end() if close else end
    return Citation(kw.start(), end, series[0], tuple(images), tuple(spans))


def _image_first(text: str, kw: re.Match[str]) -> Citation | None:
    """ "image 45", "images 206 and 286", "(in image 18 in series 2)", from an image keyword."""
    word = kw.group().lower()
    if _COUNT_BEFORE.search(text, max(0, kw.start() - 24), kw.start()):
        return None  # "Number of images: 345" counts images, it cites none
    needs_series = word in _NEEDS_PUNCT and text[kw.end() : kw.end() + 1] != ":"
    found = _image_list(text, kw.end(), word in _PLURAL)
    if found is None:
        return None
    images, spans, end = found
    series: int | None = None
    link = _IMAGE_TO_SERIES.match(text, end)
    assert link is not None
    series_kw = _SERIES_KW.match(text, link.end())
    if series_kw is not None:
        number = _series_number(text, series_kw.end())
        close = _CLOSE.match(text, number[1]) if number and link.group("open") else None
        if number is not None and (close is not None or not link.group("open")):
            series = number[0]
            end = close.end() if close else number[1]
    if needs_series and series is None:
        return None
    return Citation(kw.start(), end, series, tuple(images), tuple(spans))


def find_citations(text: str) -> list[Citation]:
    """Every citation in ``text``, in order, none overlapping."""
    out: list[Citation] = []
    taken = 0
    for kw in _ANCHOR.finditer(text):
        if kw.start() < taken:
            continue
        try:
            cite = _series_first(text, kw) if kw.group("series") else _image_first(text, kw)
        except _Rejected:
            cite = None
        if cite is not None:
            out.append(cite)
            taken = cite.end
    return out


# ---------------------------------------------------------------------------------------------
# Snippets

# Words that introduce a citation and mean nothing without it.
_LEAD: Final = re.compile(
    r"(?:(?<![\w])(?:(?:best|as|well|clearly)[ \t]+(?:seen|visualized|visualised|shown|"
    r"demonstrated|depicted)[ \t]+(?:on|in|at)|see[ \t]+also|see|cf\.?|on|in|at|between|"
    r"from|auf|siehe|s\.|vgl\.?|zwischen|im|in[ \t]+der|an))?[ \t]*$",
    re.IGNORECASE,
)
_DANGLING_TAIL: Final = re.compile(
    r"(?:[\s,;:(\[–-]|(?<![\w])(?:on|in|at|see|and|or|und|oder|auf|of|from|between|im|with|"
    r"bei|siehe|zwischen))+$",
    re.IGNORECASE,
)
_DANGLING_HEAD: Final = re.compile(
    r"^(?:[\s,;:.)\]]|(?:and|but|und|sowie|or|oder)(?![\w]))+", re.IGNORECASE
)


def _cut(text: str, lo: int, hi: int, cite: Citation) -> tuple[int, int]:
    """The span to remove for ``cite`` inside ``text[lo:hi]``: the citation, the words that
    introduce it, the brackets around it when nothing else is inside them, or the comma before
    it ("nodule, series 2, image 45 in the lower lobe")."""
    lead = _LEAD.search(text, lo, cite.start)
    left = lead.start() if lead is not None else cite.start
    right = cite.end
    before = text[lo:left].rstrip()
    after = text[right:hi]
    if before.endswith(("(", "[")) and after.lstrip().startswith((")", "]")):
        return lo + len(before) - 1, hi - len(after.lstrip()) + 1
    if before.endswith((",", ";")):
        return lo + len(before) - 1, right
    return left, right


def _tidy(text: str) -> str:
    """Spaces and punctuation left behind once citations are gone, as strip_citations does."""
    out = re.sub(r"\(\s*\)|\[\s*\]", "", text)
    out = re.sub(r"\s+", " ", out)
    out = re.sub(r" +([.,;:!?)\]])", r"\1", out)
    out = re.sub(r"([(\[])[ ,;:]+", r"\1", out)
    out = re.sub(r"[ ,;:]+([)\]])", r"\1", out)
    out = re.sub(r"\(\s*\)|\[\s*\]", "", out)
    out = re.sub(r"[,;:]+(?=[.,;:!?])", "", out)
    out = re.sub(r" [-–](?: [-–])+ ", " - ", out)
    out = strip_list_marker(_DANGLING_HEAD.sub("", out.strip()))
    out = _DANGLING_HEAD.sub("", out)
    end = ""
    if out.endswith((".", "!", "?")):
        end, out = out[-1], out[:-1]
    out = _DANGLING_TAIL.sub("", out).strip()
    if not re.search(r"[^\W\d_]{2,}", out):
        return ""
    return out[:1].upper() + out[1:] + (end or ".")


def remove_citations(text: str, lo: int, hi: int, cites: Sequence[Citation]) -> str:
    """``text[lo:hi]`` with ``cites`` (all inside it) and their lead words removed, tidied."""
    pieces: list[str] = []
    cursor = lo
    for cite in sorted(cites, key=lambda c: c.start):
        left, right = _cut(text, cursor, hi, cite)
        pieces.append(text[cursor:left])
        cursor = right
    pieces.append(text[cursor:hi])
    return _tidy(" ".join(pieces))


def _inside(cites: Sequence[Citation], seg: Segment) -> list[Citation]:
    return [c for c in cites if seg.start <= c.start and c.end <= seg.end]


class _Units:
    """Sentences of a text, cut into clauses only where a citation needs them."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sentences = sentences(text)
        self.starts = [s.start for s in self.sentences]
        self._clauses: dict[int, list[Segment]] = {}

    def clauses(self, i: int) -> list[Segment]:
        if i not in self._clauses:
            self._clauses[i] = clauses(self.text, self.sentences[i]) or [self.sentences[i]]
        return self._clauses[i]

    def locate(self, pos: int) -> tuple[int, int]:
        """(sentence index, clause index) of the clause holding ``pos``."""
        i = max(bisect_right(self.starts, pos) - 1, 0)
        parts = self.clauses(i)
        j = max(bisect_right([c.start for c in parts], pos) - 1, 0)
        return i, j

    def before(self, i: int, j: int) -> Iterator[Segment]:
        """Clauses before clause j of sentence i, nearest first, within the paragraph."""
        yield from reversed(self.clauses(i)[:j])
        floor = self.text.rfind("\n\n", 0, self.sentences[i].start)
        for k in range(i - 1, -1, -1):
            if self.sentences[k].start < floor:
                return
            yield from reversed(self.clauses(k))


def _snippets(text: str, cites: Sequence[Citation]) -> Iterator[str]:
    """The snippet of each citation, in order (see the module docstring)."""
    units = _Units(text)
    for cite in cites:
        i, j = units.locate(cite.start)
        clause = units.clauses(i)[j]
        # A citation may straddle a clause cut its brackets hid from the splitter.
        whole = Segment(clause.start, max(clause.end, cite.end))
        own = _inside(cites, whole)
        k = own.index(cite)
        lo = clause.start if k == 0 else own[k - 1].end
        hi = whole.end if k == len(own) - 1 else cite.end
        snippet = remove_citations(text, lo, hi, [cite])
        if not snippet and k + 1 < len(own):
            snippet = remove_citations(text, cite.start, own[k + 1].start, [cite])
        if not snippet and len(own) > 1:
            snippet = remove_citations(text, whole.start, whole.end, own)
        for prev in units.before(i, j):
            if snippet:
                break
            snippet = remove_citations(text, prev.start, prev.end, _inside(cites, prev))
        yield snippet


def find_references(text: str) -> list[ImageReference]:
    """Every image reference in ``text`` with its snippet, in order of appearance."""
    cites = find_citations(text)
    if not cites:
        return []
    out: list[ImageReference] = []
    for cite, snippet in zip(cites, _snippets(text, cites), strict=True):
        for k, (image, span) in enumerate(zip(cite.images, cite.image_spans, strict=True)):
            start, end = (cite.start, cite.end) if k == 0 else span
            out.append(ImageReference(cite.series, image, snippet, start, end))
    return out
