"""``report.html``: the cohort's quality-control report, one self-contained page beside ``results.csv``.

Failed and flagged cases come first; the table sorts by any column (a click on its header); each done case shows
its overlay thumbnail; one strip plot per structure shows the cohort's volumes around their median (flagged cases
in red). Plain HTML, inline SVG and a few lines of script: it opens from the file system in any browser.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from FMSegCore.batch.qc import VOLUME_FACTOR, cohort_medians
from FMSegCore.batch.results import DONE, FAILED, Row, structures_of, volume_column, volumes
from FMSegCore.io.atomic import atomic_output

REPORT_FILE = "report.html"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #eee; cursor: pointer; user-select: none; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fde2e2; } tr.flagged td { background: #fff4d6; }
img.thumb { height: 90px; } .plot { margin: 0.4em 0 1em; } .muted { color: #777; }
"""

_SCRIPT = """
function cellValue(row, index) {
  const cell = row.cells[index];
  const key = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
  const number = parseFloat(key);
  return isNaN(number) || !/^-?[0-9.eE+-]+$/.test(key) ? key.toLowerCase() : number;
}
function sortBy(table, index) {
  const body = table.tBodies[0];
  const ascending = table.dataset.sorted !== String(index) || table.dataset.order === "desc";
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = cellValue(a, index), y = cellValue(b, index);
    const order = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
    return ascending ? order : -order;
  });
  rows.forEach(row => body.appendChild(row));
  table.dataset.sorted = String(index);
  table.dataset.order = ascending ? "asc" : "desc";
}
document.querySelectorAll("table.sortable").forEach(table => {
  Array.from(table.tHead.rows[0].cells).forEach((header, index) => {
    header.title = "sort by " + header.textContent;
    header.addEventListener("click", () => sortBy(table, index));
  });
});
document.getElementById("shown").textContent =
  document.querySelectorAll("table.sortable tbody tr").length + " cases in the table";
document.body.dataset.ready = "yes";
"""


def _priority(row: Row) -> tuple[int, str]:
    """Failed cases first, then flagged ones, then the others; by name within each."""
    status = 0 if row.get("status") == FAILED else 1 if row.get("flags") else 2
    return status, str(row.get("case", ""))


def _number(value: Any, digits: int = 1) -> str:
    if value in (None, ""):
        return ""
    return f"{float(value):,.{digits}f}"


def _table(rows: Sequence[Row], structures: Sequence[str]) -> str:
    heads = ["Case", "Status", "Flags", "Overlay", *(f"{name} (ml)" for name in structures), "Mean uncertainty",
             "Seconds", "Error"]
    lines = ["<table class='sortable' id='cases'><thead><tr>",
             *(f"<th>{html.escape(head)}</th>" for head in heads), "</tr></thead><tbody>"]
    for row in sorted(rows, key=_priority):
        status = str(row.get("status", ""))
        kind = FAILED if status == FAILED else "flagged" if row.get("flags") else "ok"
        overlay = str(row.get("overlay") or "")
        thumb = (f"<a href='{html.escape(overlay)}'><img class='thumb' src='{html.escape(overlay)}' "
                 f"alt='overlay of {html.escape(str(row['case']))}'></a>" if overlay else "<span class='muted'>-</span>")
        cells = [f"<td>{html.escape(str(row['case']))}</td>", f"<td>{html.escape(status)}</td>",
                 f"<td>{html.escape(str(row.get('flags') or ''))}</td>",
                 f"<td data-sort='{0 if overlay else 1}'>{thumb}</td>"]
        cells += [f"<td class='num'>{_number(row.get(volume_column(name)))}</td>" for name in structures]
        cells += [f"<td class='num'>{_number(row.get('mean_uncertainty'), 3)}</td>",
                  f"<td class='num'>{_number(row.get('seconds'))}</td>",
                  f"<td>{html.escape(str(row.get('error') or ''))}</td>"]
        lines.append(f"<tr class='{kind}' data-case='{html.escape(str(row['case']))}'>{''.join(cells)}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def strip_plot(name: str, points: Sequence[tuple[str, float, bool]], median: float,
               width: int = 640, height: int = 64) -> str:
    """An inline SVG of one structure's volumes (case, ml, flagged) on a line from 0 to the largest, with the
    median and the flagging bounds marked; each dot's tooltip names its case."""
    top = max([value for _, value, _ in points] + [median * VOLUME_FACTOR if median else 0.0, 1e-9]) * 1.05
    left, right = 10, width - 10

    def x(value: float) -> float:
        return left + (right - left) * value / top

    parts = [f"<svg class='plot' width='{width}' height='{height}' role='img' "
             f"aria-label='volumes of {html.escape(name)}'>",
             f"<line x1='{left}' y1='{height - 18}' x2='{right}' y2='{height - 18}' stroke='#999'/>"]
    if median:
        for bound, colour in ((median / VOLUME_FACTOR, "#e0a000"), (median * VOLUME_FACTOR, "#e0a000"),
                              (median, "#333")):
            parts.append(f"<line x1='{x(bound):.1f}' y1='4' x2='{x(bound):.1f}' y2='{height - 18}' "
                         f"stroke='{colour}' stroke-dasharray='{'none' if bound == median else '3,3'}'/>")
    for index, (case, value, flagged) in enumerate(points):
        y = 10 + (index * 7) % (height - 32)
        parts.append(f"<circle cx='{x(value):.1f}' cy='{y}' r='4' fill='{'#d33' if flagged else '#37a'}' "
                     f"fill-opacity='0.8'><title>{html.escape(case)}: {value:,.1f} ml</title></circle>")
    parts.append(f"<text x='{left}' y='{height - 4}' font-size='11'>0 ml</text>")
    parts.append(f"<text x='{right}' y='{height - 4}' font-size='11' text-anchor='end'>{top:,.0f} ml</text>")
    if median:
        parts.append(f"<text x='{x(median):.1f}' y='{height - 4}' font-size='11' text-anchor='middle'>median "
                     f"{median:,.1f}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _plots(rows: Sequence[Row], structures: Sequence[str]) -> str:
    medians = cohort_medians(rows)
    sections = []
    for name in structures:
        points = [(str(row["case"]), value, name in str(row.get("flags") or "")) for row in rows
                  if row.get("status") == DONE and (value := volumes(row).get(name)) is not None]
        if points:
            sections.append(f"<h3>{html.escape(name)}</h3>" + strip_plot(name, points, medians.get(name, 0.0)))
    return "\n".join(sections)


def render_report(rows: Sequence[Row], method: str) -> str:
    """The report's HTML for the rows of a results table."""
    done = [row for row in rows if row.get("status") == DONE]
    failed = [row for row in rows if row.get("status") == FAILED]
    flagged = [row for row in done if row.get("flags")]
    structures = structures_of(done)
    summary = (f"{len(rows)} cases: {len(done)} done, {len(failed)} failed, {len(flagged)} flagged "
               f"(a structure missing, or its volume beyond {VOLUME_FACTOR:g}x or 1/{VOLUME_FACTOR:g} of the "
               "cohort's median).")
    return "\n".join([
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        "<title>FMSeg cohort report</title>", f"<style>{_STYLE}</style></head><body>",
        "<h1>FMSeg cohort report</h1>",
        f"<p>{html.escape(method)}. {html.escape(summary)} <span id='shown' class='muted'></span></p>",
        f"<p class='muted'>Written {time.strftime('%Y-%m-%d %H:%M')}; the same numbers are in results.csv. "
        "Click a column's header to sort by it.</p>",
        _table(rows, structures), "<h2>Volumes per structure</h2>", _plots(rows, structures),
        f"<script>{_SCRIPT}</script>", "</body></html>", ""])


def write_report(folder: Path, rows: Sequence[Row], method: str) -> Path:
    """Write ``report.html`` in ``folder`` atomically."""
    path = folder / REPORT_FILE
    with atomic_output(path) as temporary:
        temporary.write_text(render_report(rows, method), encoding="utf-8")
    return path
