"""Write the report's tables as Markdown, CSV and one self-contained HTML page."""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

from emguard.io import write_text_atomic
from emguard.report.tables import Table

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em} h1{font-size:1.5em} h2{font-size:1.15em;margin-top:2em}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0} td,th{border:1px solid #ccc;
padding:.25em .5em;text-align:right} td:first-child,td:nth-child(2),th{text-align:left}
th{background:#f3f3f3} .warn{background:#fff4e0;border-left:4px solid #f0a020;padding:.4em .8em;
margin:.3em 0} .note{color:#555;font-size:.85em} img{max-width:100%;border:1px solid #ddd;
margin:.5em 0} pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.8em}
.mark{color:#1a7f37;font-weight:bold}
"""


_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]<>|#!"} | {"\n": " ", "\r": " "})


def md_escape(text: str) -> str:
    """``text`` shown literally in Markdown, also inside a table cell: markup characters
    (``|``, ``<``, ``[``, ``*`` ...) backslash-escaped, line breaks made spaces."""
    return str(text).translate(_MD_SPECIAL)


def markdown(table: Table) -> str:
    """The table in Markdown. Text cells (dataset, arm and grid labels: user names and
    values) are escaped; number cells are written by the report itself."""
    head = ("| " + " | ".join(md_escape(c) for c in table.columns) + " |\n|"
            + "---|" * len(table.columns) + "\n")
    body = "".join("| " + " | ".join(md_escape(c.text) if c.est.value is None else c.text
                                     for c in row) + " |\n" for row in table.rows)
    note = f"\n{table.note}\n" if table.note else ""
    return f"### {md_escape(table.title)}\n\n{head}{body}{note}"


def csv_rows(tables: list[Table]) -> list[dict]:
    """Long format: one row per numeric cell (table, row label, column, value, interval,
    spread over seeds, seeds, the paper's value, mark)."""
    out = []
    for t in tables:
        for row in t.rows:
            label = " / ".join(c.text for c, col in zip(row, t.columns, strict=False)
                               if c.est.value is None and col in ("dataset", "arm"))
            for cell, col in zip(row, t.columns, strict=True):
                if cell.est.value is None and cell.paper is None:
                    continue
                e = cell.est
                out.append({"table": t.key, "row": label, "column": col, "value": e.value,
                            "ci_low": e.lo, "ci_high": e.hi, "sd_seeds": e.sd_seeds,
                            "n_seeds": e.n_seeds, "paper": cell.paper, "mark": cell.mark})
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    fields = ["table", "row", "column", "value", "ci_low", "ci_high", "sd_seeds", "n_seeds",
              "paper", "mark"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)

    write_text_atomic(path, buf.getvalue())


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    rows = []
    for row in table.rows:
        cells = []
        for c in row:
            text = html.escape(c.text)
            if c.mark:
                text = text.replace(html.escape(c.mark), f'<span class="mark">{c.mark}</span>')
            cells.append(f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    return (f"<h2>{html.escape(table.title)}</h2><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{note}")


def page(title: str, tables: list[Table], figures: list[Path], warnings: list[str],
         legend: str, study_yaml: str, provenance: dict) -> str:
    """One HTML file with everything inline (PNG figures as data URIs): works offline."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f'<div class="warn">{html.escape(w)}</div>' for w in warnings]
    parts.append(f'<p class="note">{html.escape(legend)}</p>')
    parts += [_html_table(t) for t in tables]
    if figures:
        parts.append("<h2>Figures</h2>")
    for fig in figures:
        data = base64.b64encode(fig.read_bytes()).decode()
        parts.append(f'<figure><img alt="{html.escape(fig.stem)}" '
                     f'src="data:image/png;base64,{data}"></figure>')
    parts.append("<h2>Study config</h2><pre>" + html.escape(study_yaml) + "</pre>")
    parts.append("<h2>Provenance</h2><pre>" + html.escape(
        "\n".join(f"{k}: {v}" for k, v in provenance.items())) + "</pre></body></html>")
    return "".join(parts)
