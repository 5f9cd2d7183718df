"""Reads the tables of a written ``report.md`` (the demo's output file), for the content tests.

Only the Markdown the user reads is parsed, so the checks hold whatever code writes it.
"""

from __future__ import annotations

import re

SCHEME_HEADER = ["policy / scheme", "quality", "latency (ms)", "UE energy (mJ)", "latency / limit", "energy / limit",
                 "meets limits"]  # at the tiny preset's scale; s / J and "system energy" at a real model's
_HEADER = re.compile(r"^latency \((ms|s)\)$"), re.compile(r"^(UE|system) energy \((mJ|J)\)$")
_TO_MILLI = {"ms": 1.0, "s": 1e3, "mJ": 1.0, "J": 1e3}


def _is_scheme_header(header: list[str]) -> bool:
    return (len(header) == len(SCHEME_HEADER) and header[:2] == SCHEME_HEADER[:2] and header[4:] == SCHEME_HEADER[4:]
            and bool(_HEADER[0].match(header[2])) and bool(_HEADER[1].match(header[3])))


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
    Tables in s / J are converted to ms / mJ; ``scope`` is the energy scope the table names
    ("UE" or "system").
    """
    body = subsection(section(report, 1), f"Preset `{preset}`")
    m = re.search(r"limits: latency ([0-9.e+-]+) (ms|s), (UE|system) energy ([0-9.e+-]+) (mJ|J)", body)
    assert m, "section 1 does not state the limits"
    limits = (float(m.group(1)) * _TO_MILLI[m.group(2)], float(m.group(4)) * _TO_MILLI[m.group(5)])
    found = [(h, r) for h, r in tables(body) if _is_scheme_header(h)]
    assert found, f"no table with header like {SCHEME_HEADER} in section 1 / {preset}"
    header = found[0][0]
    lat_scale = _TO_MILLI[_HEADER[0].match(header[2]).group(1)]
    scope, en_unit = _HEADER[1].match(header[3]).groups()
    assert scope == m.group(3), (header, m.group(0))
    out: dict[str, dict[str, object]] = {}
    for row in found[0][1]:
        assert len(row) == len(SCHEME_HEADER), row
        meets = row[6].replace("*", "").strip()
        assert meets in ("yes", "no"), row
        out[row[0]] = {
            "quality": float(row[1]), "latency_ms": float(row[2]) * lat_scale, "energy_mj": float(row[3]) * _TO_MILLI[en_unit],
            "latency_ratio": float(row[4]), "energy_ratio": float(row[5]), "meets": meets == "yes", "limits": limits,
            "scope": scope,
        }
    return out


def row(table: dict[str, dict[str, object]], prefix: str) -> dict[str, object]:
    """The one row whose label starts with ``prefix``."""
    hits = [k for k in table if k.startswith(prefix)]
    assert len(hits) == 1, (prefix, list(table))
    return table[hits[0]]
