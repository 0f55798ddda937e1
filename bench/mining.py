"""Snippet mining: precision and recall on the labelled set, and mining throughput.

The labelled set is the hand-written real-style sentences (tests/data/mining_labelled.jsonl:
every citation form, the traps, mixed sentences) plus synthetic reports from the report
generator (engines.data.reports), whose citation truth labels them. Precision and recall count
(series, image) references per text (reports.labelled_refs). Throughput mines a corpus of
generated reports in one process (references/s, reports/s); with ``--cli`` the same corpus also
goes through ``radfinder-node mine --jsonl`` as a subprocess, start-up included.

It also checks the model's own citation stripper (engines.model.text.strip_citations) against
the miner: a citation the miner finds but the stripper leaves in the text would let the model
read the slice number from a report.

    .venv/bin/python bench/mining.py [--synthetic 400] [--corpus 2000] [--cli] [--errors]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from engines.data.reports import Report  # noqa: E402
from engines.model.text import strip_citations  # noqa: E402
from reports.labelled_refs import (  # noqa: E402
    LabelledText,
    Score,
    from_generated,
    load_labelled,
    score,
)
from reports.mining import find_citations, find_references  # noqa: E402
from standins import random_report  # noqa: E402

LABELLED = ROOT / "tests" / "data" / "mining_labelled.jsonl"
LOBES = ("RUL", "RML", "RLL", "LUL", "LLL", "upper", "lower", None)


def synthetic_report(seed: int) -> Report:
    return random_report(seed, LOBES)


def synthetic_set(count: int, seed: int = 0) -> list[LabelledText]:
    return [
        from_generated(synthetic_report(seed * 100_003 + i), f"synthetic-{i}") for i in range(count)
    ]


def _row(name: str, c: Counter[str]) -> str:
    tp, fp, fn = c["tp"], c["fp"], c["fn"]
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    return f"{name:<22}{c['texts']:>7}{tp + fn:>7}{tp:>7}{fp:>6}{fn:>6}{p:>9.4f}{r:>9.4f}"


def print_table(title: str, result: Score) -> None:
    print(f"\n{title}")
    print(f"{'form':<22}{'texts':>7}{'refs':>7}{'TP':>7}{'FP':>6}{'FN':>6}{'prec':>9}{'recall':>9}")
    for form in sorted(result.by_form):
        print(_row(form, result.by_form[form]))
    total: Counter[str] = Counter(
        {"texts": result.texts, "tp": result.tp, "fp": result.fp, "fn": result.fn}
    )
    print(_row("ALL", total))


def stripper_leaks(texts: list[LabelledText]) -> list[tuple[str, str]]:
    """Citations the miner finds whose image numbers strip_citations leaves in the text."""
    leaks: list[tuple[str, str]] = []
    for item in texts:
        stripped = strip_citations(item.text)
        for cite in find_citations(item.text):
            outside = item.text[: cite.start] + item.text[cite.end :]
            kept = [
                i
                for i in cite.images
                if f"{i}" in stripped.replace("/", " ").replace(",", " ").split()
                and f"{i}" not in outside.replace("/", " ").replace(",", " ").split()
            ]
            if item.text[cite.start : cite.end] in stripped or kept:
                leaks.append((item.text, item.text[cite.start : cite.end]))
    return leaks


def throughput(corpus: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = sum(len(find_references(text)) for text in corpus)
    return time.perf_counter() - t0, n


def cli_throughput(corpus: list[str]) -> tuple[float, int]:
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for i, text in enumerate(corpus):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    t0 = time.perf_counter()
    with open(f.name) as stdin:
        out = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "radfinder-node"), "mine", "--jsonl"],
            stdin=stdin,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    elapsed = time.perf_counter() - t0
    Path(f.name).unlink()
    return elapsed, sum(len(json.loads(line)["references"]) for line in out.splitlines())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synthetic", type=int, default=400, help="generated reports in the set")
    ap.add_argument("--corpus", type=int, default=2000, help="generated reports to time")
    ap.add_argument("--cli", action="store_true", help="also time `radfinder-node mine --jsonl`")
    ap.add_argument("--errors", action="store_true", help="print every miss and false hit")
    args = ap.parse_args()

    hand = load_labelled(LABELLED)
    synthetic = synthetic_set(args.synthetic)
    hand_score, synth_score = score(hand), score(synthetic)
    everything = score(hand + synthetic)
    print_table(f"hand-written ({LABELLED.relative_to(ROOT)})", hand_score)
    print_table(f"synthetic reports ({args.synthetic}, engines.data.reports)", synth_score)
    print(
        f"\nwhole set: {everything.texts} texts, {everything.tp + everything.fn} references: "
        f"precision {everything.precision:.4f}, recall {everything.recall:.4f} "
        "(targets 0.97 / 0.95)"
    )
    if args.errors or everything.errors:
        for item, found in everything.errors:
            print(f"  {item.id} [{item.form}] {item.text!r}")
            print(f"      truth {list(item.references)} found {found}")

    leaks = stripper_leaks(hand + synthetic)
    n_cites = sum(len(find_citations(t.text)) for t in hand + synthetic)
    print(f"\nstrip_citations leaves {len(leaks)} of {n_cites} mined citations readable:")
    for text, cite in leaks:
        print(f"  {cite!r:<40} in {text!r}")

    corpus = [synthetic_report(10_000_000 + i).text for i in range(args.corpus)]
    chars = sum(len(t) for t in corpus)
    elapsed, n = throughput(corpus)
    print(
        f"\nthroughput (in process, 1 core): {len(corpus)} reports, {chars / 1e6:.2f} MB, "
        f"{n} references in {elapsed:.2f} s: {len(corpus) / elapsed:,.0f} reports/s, "
        f"{n / elapsed:,.0f} references/s"
    )
    if args.cli:
        elapsed, n_cli = cli_throughput(corpus)
        print(
            f"throughput (radfinder-node mine --jsonl, start-up included): {n_cli} references "
            f"in {elapsed:.2f} s: {len(corpus) / elapsed:,.0f} reports/s, "
            f"{n_cli / elapsed:,.0f} references/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
