"""Report text into sentences and clauses, as character spans of the original text.

The miner pairs an image citation with the words that describe the finding; a snippet that runs
over the whole paragraph teaches the model nothing about *where*, and one cut at "approx." or at
"3.5 mm" loses the finding. So a boundary is a period, "!" or "?" followed by space and something
that starts a sentence, a blank line, a heading line or a list item, but never:

- a decimal ("3.5 mm", "1,5 mm"): no space follows the separator;
- an abbreviation ("approx.", "e.g.", "Dr.", "z.B.", "Se.", "Im."), or a single initial;
- a list number at the start of a sentence ("1. Nodule ...", "2) Effusion");
- a German ordinal or date after a preposition or article ("im 3. Segment", "am 12. März").

Spans are returned, not strings, because citations are located by offset in the original text
and the two must agree character for character.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["Segment", "clauses", "sentences", "strip_list_marker"]


@dataclass(frozen=True)
class Segment:
    """``text[start:end]`` of the string it was cut from, trimmed of surrounding whitespace."""

    start: int
    end: int

    def of(self, text: str) -> str:
        return text[self.start : self.end]


# Lower-case, without the final period. Multi-part ones ("e.g") are matched with their inner dots.
_ABBREVIATIONS: Final = frozenset(
    {
        # English
        "dr", "mr", "mrs", "ms", "prof", "vs", "e.g", "i.e", "approx", "appr", "ca", "cf",
        "fig", "figs", "no", "nos", "nr", "st", "etc", "resp", "incl", "max", "min", "avg",
        "est", "ant", "post", "sup", "inf", "lat", "med", "rt", "lt", "bilat", "pt", "hx",
        "img", "im", "ima", "se", "ser", "sl", "sect", "vol", "al", "ref", "jan", "feb", "mar",
        "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
        # German
        "z.b", "bzw", "ggf", "v.a", "u.a", "evtl", "re", "li", "bds", "vgl", "inkl", "s.o",
        "s.u", "d.h", "o.g", "u.u", "z.n", "mind", "abb", "bzgl", "zust", "v.s",
    }
)  # fmt: skip
# Words after which "3." is an ordinal or a day, not the end of a sentence.
_ORDINAL_CONTEXT: Final = frozenset(
    {"im", "am", "vom", "zum", "zur", "beim", "ins", "dem", "den", "des", "der", "ab", "seit"}
)
# A list item at the start of a line or sentence: "1.", "2)", "(3)", "a)", "-", "*", "•".
_LIST_MARKER: Final = re.compile(r"(?:\(?\d{1,2}[.)]|\(?[a-z][)]|[-*•·–])(?=\s)", re.IGNORECASE)
_SENTENCE_END: Final = re.compile(r"[.!?]+[\"')\]]*(?=\s)|[.!?]+[\"')\]]*$")
_HEADING: Final = re.compile(r"^[ \t]*[A-ZÄÖÜ][A-ZÄÖÜ /&()-]{2,}:?[ \t]*$")
_NEXT_CHAR: Final = re.compile(r"\s*(\S)")
_CLAUSE_CHARS: Final = re.compile(r"[()\[\];]")
_BARE_MARKER: Final = re.compile(r"\(?\d{1,2}[.)]|\(?[a-z]\)|[-*•·–]", re.IGNORECASE)


def _trimmed(text: str, start: int, end: int) -> Segment | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return Segment(start, end) if end > start else None


def _lines(text: str) -> list[tuple[int, int]]:
    """Blocks of lines that belong together: a blank line, a heading, a list item or a line
    ending with punctuation closes a block; a wrapped line (HL7 OBX lines are often cut at 80
    characters mid-sentence) joins the next."""
    blocks: list[tuple[int, int]] = []
    start = 0
    pos = 0
    raw = text.splitlines(keepends=True)
    for i, line in enumerate(raw):
        end = pos + len(line)
        body = line.rstrip("\r\n")
        nxt = raw[i + 1] if i + 1 < len(raw) else ""
        heading = bool(_HEADING.match(body))
        close = (
            not body.strip()
            or heading
            or body.rstrip().endswith((".", ":", ";", "!", "?"))
            or not nxt.strip()
            or bool(_HEADING.match(nxt.rstrip("\r\n")))
            or bool(_LIST_MARKER.match(nxt.lstrip()))
        )
        if heading and start < pos:
            blocks.append((start, pos))
            start = pos
        if close:
            blocks.append((start, end))
            start = end
        pos = end
    if start < len(text):
        blocks.append((start, len(text)))
    return blocks


def _word_before(text: str, lo: int, end: int) -> str:
    """The run of word characters and dots that ends at ``end`` (not before ``lo``)."""
    i = end
    while i > lo and (text[i - 1].isalnum() or text[i - 1] in "._"):
        i -= 1
    return text[i:end]


def _is_boundary(text: str, block_start: int, punct_end: int, after_pos: int, start: int) -> bool:
    """Whether the punctuation ending at ``punct_end`` (closing quotes and brackets run on to
    ``after_pos``) ends the sentence that began at ``start``."""
    nxt = _NEXT_CHAR.match(text, after_pos)
    after = nxt.group(1) if nxt else ""
    if after and not (after.isupper() or after.isdigit() or after in "([\"'-*•"):
        return False
    if text[punct_end - 1] != ".":
        return True
    word = _word_before(text, block_start, punct_end - 1)
    if word.lower().lstrip(".") in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
        return False
    if word.isdigit():
        head = text[start : punct_end - 1 - len(word)].strip()
        if not head or _BARE_MARKER.fullmatch(head):
            return False  # "1. Nodule": a list number, not a sentence
        prev = _word_before(head, 0, len(head))
        if prev.lower() in _ORDINAL_CONTEXT and after.isupper():
            return False  # "im 3. Segment", "am 12. März"
    return True


def sentences(text: str) -> list[Segment]:
    """The sentences of ``text`` in order, each trimmed, none empty."""
    out: list[Segment] = []
    for block_start, block_end in _lines(text):
        start = block_start
        for m in _SENTENCE_END.finditer(text, block_start, block_end):
            punct_end = m.start() + len(m.group().rstrip("\"')]"))
            if _is_boundary(text, block_start, punct_end, m.end(), start):
                seg = _trimmed(text, start, m.end())
                if seg is not None:
                    out.append(seg)
                start = m.end()
        seg = _trimmed(text, start, block_end)
        if seg is not None:
            out.append(seg)
    return out


def clauses(text: str, sentence: Segment) -> list[Segment]:
    """A sentence cut at semicolons outside brackets: "Cardiomegaly is present (image 4);
    the ratio is increased" describes two things, and the citation belongs to the first."""
    out: list[Segment] = []
    depth = 0
    start = sentence.start
    for m in _CLAUSE_CHARS.finditer(text, sentence.start, sentence.end):
        ch = m.group()
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(depth - 1, 0)
        elif depth == 0:
            seg = _trimmed(text, start, m.end())
            if seg is not None:
                out.append(seg)
            start = m.end()
    seg = _trimmed(text, start, sentence.end)
    if seg is not None:
        out.append(seg)
    return out


def strip_list_marker(text: str) -> str:
    """ "1. Nodule" -> "Nodule": a list number says nothing about the finding."""
    m = _LIST_MARKER.match(text)
    return text[m.end() :].lstrip() if m else text
