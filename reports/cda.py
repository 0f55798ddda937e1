"""Narrative text of an HL7 CDA document (the report a RIS sends as an encapsulated document).

A CDA R2 imaging report (DICOM PS3.20) carries its human-readable text in each section's
``<title>`` and ``<text>`` (paragraphs, lists, tables, ``<br/>``); the coded entries repeat that
text by reference and are skipped, so each sentence is mined exactly once. Level-1 documents with
a ``<nonXMLBody>`` carry plain text or a PDF inline. The result keeps the reading order and one
line per block element, because the snippet miner works on sentences and lines.

Parsed with the standard library: expat never fetches external entities, and documents that
declare a DTD or entities are refused outright (no billion-laughs expansion, no XXE).
"""

from __future__ import annotations

import base64
import binascii
import re
import xml.etree.ElementTree as ET
from typing import Final

__all__ = ["CDAError", "cda_narrative", "is_pdf"]

_BLOCK: Final = frozenset({"paragraph", "item", "tr", "caption", "list", "table", "thead", "tbody"})
_CELL: Final = frozenset({"td", "th"})
_SKIP: Final = frozenset({"entry", "code", "templateId", "id", "footnote", "footnoteRef"})
_DTD = re.compile(rb"<!(DOCTYPE|ENTITY)", re.IGNORECASE)


class CDAError(ValueError):
    """The document cannot give narrative text; ``reason`` says why (kept with the report)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_pdf(data: bytes) -> bool:
    return data.lstrip()[:5] == b"%PDF-"


def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _inline(elem: ET.Element, out: list[str]) -> None:
    """Text of a narrative block: block children start new lines, cells are tab-separated."""
    if elem.text:
        out.append(elem.text)
    for child in elem:
        name = _local(child.tag)
        if name == "br":
            out.append("\n")
        elif name in _BLOCK:
            out.append("\n")
            _inline(child, out)
            out.append("\n")
        elif name in _CELL:
            _inline(child, out)
            out.append("\t")
        elif name not in _SKIP:
            _inline(child, out)
        if child.tail:
            out.append(child.tail)


def _clean(parts: list[str]) -> list[str]:
    lines = []
    for line in "".join(parts).split("\n"):
        text = " ".join(line.replace("\t", " \t ").split()).replace(" \t ", "\t").strip("\t ")
        if text:
            lines.append(text)
    return lines


def _section(elem: ET.Element, lines: list[str]) -> None:
    for child in elem:
        name = _local(child.tag)
        if name == "title":
            lines += _clean([child.text or "", *(t for c in child for t in c.itertext())])
        elif name == "text":
            parts: list[str] = []
            _inline(child, parts)
            lines += _clean(parts)
        elif name == "component":
            for sub in child:
                if _local(sub.tag) == "section":
                    _section(sub, lines)


def _non_xml_body(body: ET.Element) -> str:
    text = next((c for c in body if _local(c.tag) == "text"), None)
    if text is None:
        raise CDAError("CDA nonXMLBody has no text element")
    media = (text.get("mediaType") or "text/plain").lower()
    payload = "".join(text.itertext())
    if (text.get("representation") or "TXT").upper() == "B64":
        try:
            data = base64.b64decode(payload, validate=False)
        except binascii.Error as exc:
            raise CDAError(f"CDA nonXMLBody base64 is invalid: {exc}") from exc
    else:
        data = payload.encode("utf-8")
    if "pdf" in media or is_pdf(data):
        raise CDAError("CDA document body is a PDF; its text cannot be mined")
    if not media.startswith("text/"):
        raise CDAError(f"CDA nonXMLBody of media type {media} cannot be mined")
    return data.decode("utf-8", errors="replace").strip()


def cda_narrative(document: bytes) -> str:
    """The document's narrative, one line per paragraph/item/row; raises CDAError if none."""
    if _DTD.search(document):
        raise CDAError("XML with a DTD or entity declarations is not accepted")
    try:
        root = ET.fromstring(document)
    except ET.ParseError as exc:
        raise CDAError(f"CDA document is not well-formed XML: {exc}") from exc
    if _local(root.tag) != "ClinicalDocument":
        raise CDAError(f"XML document is not a CDA ClinicalDocument (root <{_local(root.tag)}>)")
    body = next((e for e in root.iter() if _local(e.tag) in {"structuredBody", "nonXMLBody"}), None)
    if body is None:
        raise CDAError("CDA document has no body")
    if _local(body.tag) == "nonXMLBody":
        text = _non_xml_body(body)
    else:
        lines: list[str] = []
        for component in body:
            for section in component:
                if _local(section.tag) == "section":
                    _section(section, lines)
        text = "\n".join(lines)
    if not text.strip():
        raise CDAError("CDA document has no narrative text")
    return text
