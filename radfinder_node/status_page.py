"""The status page: a snapshot in, one self-contained HTML document out (pure, no I/O).

One page an operator can read at a glance on the hospital network: what arrived, what the model
made of it, what went out, what the RIS sent, and what went wrong. Everything is server-rendered
(no scripts), every value from the database is escaped, and the page refreshes itself, so it
works in a locked-down browser on a reading-room workstation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from html import escape
from typing import Final

from dicom_io.uids import is_valid_uid
from radfinder_node.status_snapshot import (
    FindingRow,
    JobRow,
    OutboundRow,
    QuarantineRow,
    ReportRow,
    Snapshot,
    StudyRow,
)

STAGES: Final = ("queue", "engine", "load", "preprocess", "infer", "findings", "write", "send")
FINDING_JOBS: Final = 5  # newest finished jobs whose findings get thumbnails

_CSS: Final = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2430}
header{background:#1d2430;color:#fff;padding:10px 20px;display:flex;gap:24px;
 align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}
header .meta{color:#b8c0cc;font-size:12px}
main{padding:12px 20px}
section{background:#fff;border-radius:6px;padding:10px 14px;margin:0 0 14px;
 box-shadow:0 1px 2px rgba(0,0,0,.08)}
h2{font-size:15px;margin:2px 0 8px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #e6e8eb;vertical-align:top}
th{font-weight:600;color:#4a5464;font-size:12px}
.uid{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
.state{display:inline-block;padding:0 6px;border-radius:8px;font-size:12px;background:#e6e8eb}
.s-done,.s-sent,.s-selected,.s-linked,.s-resolved,.s-AA{background:#d3f2dc;color:#11632b}
.s-running,.s-queued,.s-pending,.s-receiving,.s-complete,.s-waiting{background:#fff1c7;
 color:#7a5800}
.s-failed,.s-AE,.s-AR,.s-quarantined,.s-unresolved{background:#fbd9d9;color:#8a1717}
.s-ignored,.s-superseded,.s-skipped,.s-none{background:#e6e8eb;color:#4a5464}
.counts{display:flex;flex-wrap:wrap;gap:10px}
.count{background:#f4f5f7;border-radius:6px;padding:4px 10px}
.count b{font-size:16px}
.bar{display:flex;height:10px;width:220px;background:#eee;border-radius:3px;overflow:hidden}
.bar span{display:block;height:100%}
.st-queue{background:#9aa5b1}.st-engine{background:#7f8fa4}.st-load{background:#5b8def}
.st-preprocess{background:#40b3a2}.st-infer{background:#e07b39}.st-findings{background:#b06ad9}
.st-write{background:#d9b650}.st-send{background:#5aa85a}
.timings{font-size:12px;color:#4a5464}
.findings{display:flex;flex-wrap:wrap;gap:10px}
.finding{width:150px;border:1px solid #e6e8eb;border-radius:6px;padding:6px;font-size:12px}
.finding img{width:138px;height:138px;object-fit:contain;background:#000;display:block}
.finding .label{font-weight:600;margin-top:4px}
.muted{color:#7a8494}
.error{color:#8a1717}
"""


def render_status_page(
    snapshot: Snapshot, *, title: str = "radfinder-node", refresh_s: int = 30
) -> str:
    """The whole page; ``refresh_s`` 0 turns the self-refresh off."""
    now = snapshot.taken_at
    refresh = f'<meta http-equiv="refresh" content="{int(refresh_s)}">' if refresh_s > 0 else ""
    engine = snapshot.engine
    engine_text = (
        f"{engine.get('bundle', '?')} {engine.get('bundle_version', '?')} on "
        f"{engine.get('engine', '?')}/{engine.get('device', '?')}"
        + ("" if engine.get("loaded") == "true" else " (not loaded yet)")
        if engine
        else "no model bundle"
    )
    body = "".join(
        (
            _section("Summary", _summary(snapshot.counts), "summary"),
            _section("Recent studies", _studies(snapshot.studies, now), "studies"),
            _section("Jobs", _jobs(snapshot.jobs, now), "jobs"),
            _section("Findings", _findings(snapshot.jobs), "findings"),
            _section("Outbox", _outbox(snapshot.outbox, now), "outbox"),
            _section(
                "HL7 feed",
                _hl7(snapshot.reports, snapshot.quarantine, snapshot.hl7_acks, now),
                "hl7",
            ),
            _section(
                "Errors",
                _errors(snapshot.quarantine, snapshot.failed_jobs, snapshot.failed_sends, now),
                "errors",
            ),
        )
    )
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8">{refresh}'
        f"<title>{_e(title)} status</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{_CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1>"
        f'<span class="meta">model: {_e(engine_text)}</span>'
        f'<span class="meta">as of {_e(_time(now))} UTC (read-only)</span></header>'
        f"<main>{body}</main></body></html>\n"
    )


# ------------------------------------------------------------------------------ pieces


def study_state(series_states: Sequence[str], job_states: Sequence[str]) -> str:
    """One word for a study: the least advanced of its parts, failures first."""
    if not series_states:
        return "empty"
    if "receiving" in series_states:
        return "receiving"
    if "complete" in series_states:
        return "complete"
    for state in ("running", "queued", "failed"):
        if state in job_states:
            return state
    if job_states:
        return "done"
    if all(s == "ignored" for s in series_states):
        return "ignored"
    return "selected"


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _state(value: str) -> str:
    css = "".join(c for c in value if c.isascii() and (c.isalnum() or c in "_-"))
    return f'<span class="state s-{css}">{_e(value)}</span>'


def _section(title: str, content: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{content}</section>'


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], empty: str) -> str:
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _time(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _ago(now: datetime, then: datetime | None) -> str:
    if then is None:
        return ""
    s = max(0, int((now - then).total_seconds()))
    if s < 120:
        text = f"{s} s ago"
    elif s < 7200:
        text = f"{s // 60} min ago"
    elif s < 172800:
        text = f"{s // 3600} h ago"
    else:
        text = f"{s // 86400} d ago"
    return f'<span title="{_e(_time(then))} UTC">{_e(text)}</span>'


def _uid(value: str | None) -> str:
    return f'<span class="uid">{_e(value)}</span>' if value else ""


def _summary(counts: Mapping[str, object]) -> str:
    items: list[tuple[str, object]] = [
        ("studies", counts.get("studies", 0)),
        ("instances", counts.get("instances", 0)),
        ("quarantined", counts.get("quarantined", 0)),
    ]
    for group in ("series", "jobs", "outbox", "reports"):
        values = counts.get(group)
        if isinstance(values, Mapping):
            items.extend((f"{group} {state}", n) for state, n in values.items())
    return (
        '<div class="counts">'
        + "".join(f'<span class="count">{_e(name)} <b>{_e(n)}</b></span>' for name, n in items)
        + "</div>"
    )


def _studies(studies: Sequence[StudyRow], now: datetime) -> str:
    rows = []
    for s in studies:
        series = "<br>".join(
            f"#{_e(r.number if r.number is not None else '?')} {_e(r.modality or '')} "
            f"{_e(r.description or '')} ({r.instances} images) {_state(r.state)}"
            + (f' <span class="muted">{_e(r.reason)}</span>' if r.reason else "")
            for r in s.series
        )
        rows.append(
            (
                _uid(s.study_uid),
                _e(s.accession or ""),
                _e(s.description or ""),
                _e(s.study_date or ""),
                _state(study_state([r.state for r in s.series], s.job_states)),
                series,
                _ago(now, s.received_at),
            )
        )
    return _table(
        ("Study UID", "Accession", "Description", "Date", "State", "Series", "Received"),
        rows,
        "No studies received yet.",
    )


def _stage_bar(timings: Mapping[str, float]) -> str:
    known = [(s, float(timings[s])) for s in STAGES if s in timings]
    total = sum(v for _, v in known)
    if total <= 0:
        return ""
    spans = "".join(
        f'<span class="st-{s}" style="width:{100 * v / total:.1f}%" title="{s} {v:.3f} s"></span>'
        for s, v in known
    )
    return f'<div class="bar">{spans}</div>'


def _timings(timings: Mapping[str, float]) -> str:
    ordered = [s for s in STAGES if s in timings] + sorted(set(timings) - set(STAGES))
    parts = " · ".join(f"{_e(s)} {float(timings[s]):.2f} s" for s in ordered)
    return f'{_stage_bar(timings)}<div class="timings">{parts}</div>'


def _jobs(jobs: Sequence[JobRow], now: datetime) -> str:
    rows = [
        (
            str(j.id),
            _uid(j.series_uid),
            _e(j.bundle),
            _state(j.state),
            str(j.attempts),
            _e(j.worker or ""),
            _timings(j.timings),
            f"{len(j.findings)} of {j.labels_total} present" if j.labels_total else "",
            _ago(now, j.queued_at),
            f'<span class="error">{_e(j.error)}</span>' if j.error else "",
        )
        for j in jobs
    ]
    return _table(
        (
            "Job",
            "Series",
            "Bundle",
            "State",
            "Tries",
            "Worker",
            "Stage timings",
            "Findings",
            "Queued",
            "Error",
        ),
        rows,
        "No inference jobs yet.",
    )


def thumbnail_url(sop_uid: str | None) -> str | None:
    """Relative URL of a slice's thumbnail; None for anything that is not a plain UID."""
    if not is_valid_uid(sop_uid):
        return None
    return f"thumb/{sop_uid}.png"


def _finding(f: FindingRow) -> str:
    url = thumbnail_url(f.key_sop_uid)
    img = (
        f'<img src="{_e(url)}" alt="key image of {_e(f.label)}" loading="lazy">'
        if url
        else '<div class="muted">no key image</div>'
    )
    z = "" if f.key_z_mm is None else f" · z {f.key_z_mm:.1f} mm"
    return (
        f'<div class="finding">{img}<div class="label">{_e(f.label)}</div>'
        f"<div>p {f.probability:.2f} (threshold {f.threshold:.2f}){z}</div></div>"
    )


def _findings(jobs: Sequence[JobRow]) -> str:
    done = [j for j in jobs if j.state == "done"][:FINDING_JOBS]
    if not done:
        return '<p class="muted">No finished jobs yet.</p>'
    parts = []
    for j in done:
        cards = "".join(_finding(f) for f in j.findings)
        parts.append(
            f"<h3>Job {j.id}: study {_uid(j.study_uid)} "
            f'<span class="muted">({len(j.findings)} of {j.labels_total} labels present)'
            "</span></h3>"
            + (
                f'<div class="findings">{cards}</div>'
                if cards
                else '<p class="muted">No finding present.</p>'
            )
        )
    return "".join(parts)


def _status(value: int | None) -> str:
    return "" if value is None else f"0x{value:04X}"


def _outbox(rows: Sequence[OutboundRow], now: datetime) -> str:
    return _table(
        ("Object", "Kind", "Destination", "State", "Tries", "Status", "Created", "Sent", "Error"),
        (
            (
                _uid(o.sop_uid),
                _e(o.kind),
                _e(o.destination),
                _state(o.state),
                str(o.attempts),
                _e(_status(o.status)),
                _ago(now, o.created_at),
                _ago(now, o.sent_at),
                f'<span class="error">{_e(o.error)}</span>' if o.error else "",
            )
            for o in rows
        ),
        "Nothing to send yet.",
    )


def _hl7(
    reports: Sequence[ReportRow],
    quarantine: Sequence[QuarantineRow],
    acks: Mapping[str, int],
    now: datetime,
) -> str:
    ack_line = (
        '<p class="counts">ACKs since start: '
        + " ".join(f"{_state(code)} <b>{n}</b>" for code, n in sorted(acks.items()))
        + "</p>"
        if acks
        else ""
    )
    table = _table(
        (
            "Report",
            "Received",
            "Facility",
            "Control ID",
            "Accession",
            "Status",
            "ACK",
            "State",
            "Snippets",
        ),
        (
            (
                str(r.id),
                _ago(now, r.received_at),
                _e(r.sending_facility),
                _e(r.control_id),
                _e(r.accession or ""),
                _e(r.result_status or ""),
                _state("AA"),  # a stored report is one that was acknowledged AA
                _state("superseded" if r.superseded else r.state)
                + (f' <span class="muted">{_e(r.reason)}</span>' if r.reason else ""),
                f"{r.pairs_resolved} of {r.pairs_total} resolved" if r.mined else "not mined",
            )
            for r in reports
        ),
        "No reports received yet.",
    )
    rejected = [q for q in quarantine if q.kind == "hl7"]
    rejected_table = (
        "<h3>Rejected messages</h3>"
        + _table(
            ("Received", "Peer", "Error code", "Reason"),
            (
                (
                    _ago(now, q.received_at),
                    _e(q.peer or ""),
                    _e(q.status if q.status is not None else ""),
                    f'<span class="error">{_e(q.reason)}</span>',
                )
                for q in rejected
            ),
            "",
        )
        if rejected
        else ""
    )
    return ack_line + table + rejected_table


def _errors(
    quarantine: Sequence[QuarantineRow],
    failed_jobs: Sequence[JobRow],
    failed_sends: Sequence[OutboundRow],
    now: datetime,
) -> str:
    if not (quarantine or failed_jobs or failed_sends):
        return '<p class="muted">No errors.</p>'
    parts = []
    if quarantine:
        parts.append(
            "<h3>Quarantine</h3>"
            + _table(
                ("Received", "Kind", "From", "Object", "Status", "Bytes", "Reason"),
                (
                    (
                        _ago(now, q.received_at),
                        _e(q.kind),
                        _e(" ".join(x for x in (q.calling_ae, q.peer) if x)),
                        _uid(q.sop_uid),
                        _e(_status(q.status) if q.kind == "dicom" else (q.status or "")),
                        str(q.size_bytes),
                        f'<span class="error">{_e(q.reason)}</span>',
                    )
                    for q in quarantine
                ),
                "",
            )
        )
    if failed_jobs:
        parts.append(
            "<h3>Failed jobs</h3>"
            + _table(
                ("Job", "Series", "Tries", "Queued", "Error"),
                (
                    (
                        str(j.id),
                        _uid(j.series_uid),
                        str(j.attempts),
                        _ago(now, j.queued_at),
                        f'<span class="error">{_e(j.error)}</span>',
                    )
                    for j in failed_jobs
                ),
                "",
            )
        )
    if failed_sends:
        parts.append("<h3>Failed or retrying sends</h3>" + _outbox(failed_sends, now))
    return "".join(parts)
