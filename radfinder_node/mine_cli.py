"""`radfinder-node mine`: image references of report text as JSON, one text or a JSONL corpus.

Offsets index the text exactly as given: stdin is read as bytes and decoded as UTF-8 without
newline translation, so a report with CRLF line ends gets offsets into its CRLF text.

With ``--jsonl`` a corpus is mined in one process, one output line per input line, in order.
A line that is not a ``{"id": ..., "text": "..."}`` object gets ``{"id": ..., "error": ...}``
(id null when unreadable) and a log line on stderr; every other line is still mined, and the
exit status is 1 so that a pipeline notices.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict
from typing import IO, Any

from reports.mining import find_references

log = logging.getLogger("radfinder_node.mine")


def references_json(text: str) -> list[dict[str, Any]]:
    return [asdict(ref) for ref in find_references(text)]


def _jsonl_line(number: int, raw: bytes) -> tuple[dict[str, Any], bool]:
    """The output object of one input line and whether it was mined."""
    ident: Any = None
    try:
        row = json.loads(raw.decode("utf-8"))
        if not isinstance(row, dict):
            raise ValueError("not a JSON object")
        ident = row.get("id")
        text = row["text"]
        if not isinstance(text, str):
            raise ValueError(f"text is {type(text).__name__}, not a string")
    except (UnicodeDecodeError, ValueError, KeyError) as exc:
        reason = f"line {number}: {'missing key ' if isinstance(exc, KeyError) else ''}{exc}"
        log.error("mine: bad input line", extra={"fields": {"line": number, "reason": reason}})
        return {"id": ident, "error": reason}, False
    return {"id": ident, "references": references_json(text)}, True


def mine_jsonl(lines: Iterable[bytes], out: IO[str]) -> int:
    """Mine each line to ``out``; the number of lines that could not be mined."""
    bad = 0
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        result, ok = _jsonl_line(number, raw)
        bad += not ok
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
    out.flush()
    return bad


def run(stdin: IO[bytes], stdout: IO[str], *, jsonl: bool) -> int:
    """Exit status: 0 all mined, 1 some JSONL lines were not, 2 the text is not UTF-8."""
    if jsonl:
        return 1 if mine_jsonl(stdin, stdout) else 0
    data = stdin.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        log.error("mine: input is not UTF-8", extra={"fields": {"reason": str(exc)}})
        raise ValueError(f"input is not UTF-8 text: {exc}") from exc
    stdout.write(json.dumps(references_json(text), ensure_ascii=False, indent=2) + "\n")
    return 0
