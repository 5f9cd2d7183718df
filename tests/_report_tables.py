"""Reads the tables of a written ``report.md`` (the demo's output file), for the content tests.

Only the Markdown the user reads is parsed, so the checks hold whatever code writes it.
"""

from __future__ import annotations

import re

SCHEME_HEADER = ["policy / scheme", "quality", "latency (ms)", "UE energy (mJ)", "latency / limit", "energy / limit",
                 "meets limits"]


def section(report: str, number: int) -> str:
    """The body of ``## <number>. ...`` up to the next ``## ``."""
    m = re.search(rf"^## {number}\. .*$", report, re.M)
    assert m, f"section {number} missing from the report"
    return report[m.end():].split("\n## ", 1)[0]


def subsection(body: str, title: str) -> str:
    """The body of ``### <title>`` up to the next ``### ``."""
    m = re.search(rf"^### {re.escape(title)}\s*$", body, re.M)
    assert m, f"subsection {title!r} missing"
    return body[m.end():].split("\n### ", 1)[0]


def tables(body: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table in ``body`` as ``(header, rows)`` of stripped cell strings."""
    out, lines = [], body.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|(\s*:?-+:?\s*\|)+\s*$", lines[i + 1]):
            header = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            out.append((header, rows))
        else:
            i += 1
    return out


def scheme_table(report: str, preset: str = "tiny") -> dict[str, dict[str, object]]:
    """Section 1's comparison table of ``preset``: row label -> parsed cells.

    Each row: ``quality``, ``latency_ms``, ``energy_mj``, ``latency_ratio``, ``energy_ratio``
    (floats) and ``meets`` (bool), plus ``limits`` = (latency ms, energy mJ) from the line above.
    """
    body = subsection(section(report, 1), f"Preset `{preset}`")
    m = re.search(r"limits: latency ([0-9.e+-]+) ms, UE energy ([0-9.e+-]+) mJ", body)
    assert m, "section 1 does not state the limits"
    limits = (float(m.group(1)), float(m.group(2)))
    found = [(h, r) for h, r in tables(body) if h == SCHEME_HEADER]
    assert found, f"no table with header {SCHEME_HEADER} in section 1 / {preset}"
    out: dict[str, dict[str, object]] = {}
    for row in found[0][1]:
        assert len(row) == len(SCHEME_HEADER), row
        meets = row[6].replace("*", "").strip()
        assert meets in ("yes", "no"), row
        out[row[0]] = {
            "quality": float(row[1]), "latency_ms": float(row[2]), "energy_mj": float(row[3]),
            "latency_ratio": float(row[4]), "energy_ratio": float(row[5]), "meets": meets == "yes", "limits": limits,
        }
    return out


def row(table: dict[str, dict[str, object]], prefix: str) -> dict[str, object]:
    """The one row whose label starts with ``prefix``."""
    hits = [k for k in table if k.startswith(prefix)]
    assert len(hits) == 1, (prefix, list(table))
    return table[hits[0]]
