"""``emguard report STUDY_DIR``: the paper's tables and figures from a study's run folders.

Reads only what runs recorded (emguard.report.collect), never a model, and writes into
one folder (default ``STUDY_DIR/report-NAME/``):

  report.md     the tables (Markdown) with figure links
  report.csv    every number: value, 95 % bootstrap interval, spread over seeds, paper
  report.html   one self-contained page: tables, figures (inline), warnings, study config,
                provenance; opens offline
  *.png, *.svg  the figures (emguard.report.figures)

Cells are "value [interval] ±sd" (mean over seeds; interval: bootstrap over questions;
sd: over seeds); ``compare_paper`` adds the paper's number to each cell it has one for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from emguard.io import provenance, write_text_atomic
from emguard.redact import redact_secrets
from emguard.report import figures
from emguard.report.collect import FREE_MEASURES, has_judge, load_runs, warnings_of
from emguard.report.paper import method_of, paper_lookup
from emguard.report.render import csv_rows, markdown, md_escape, page, write_csv
from emguard.report.tables import (
    Table,
    ceiling_table,
    compensation_table,
    estimates,
    judge_free_table,
    main_tables,
    task_table,
    trajectory_estimates,
)

TRAJECTORY_MEASURES = ["preference_shift", "heldout_nll", "drift_kl"]
LEGEND = ("Cells: mean over seeds [95 % bootstrap interval over questions] ±sd over seeds. "
          "✓: EMA reduction (1 - arm / misaligned baseline) or in-domain retention (arm / "
          "baseline) of at least 90 % over its whole interval (the paper's marks, only where "
          "the data support them). ↑: incoherence above the baseline's, interval of the "
          "difference above 0. (paper x): the paper's published value for that cell.")


@dataclass
class Report:
    out: Path
    tables: list[Table]
    figures: list[Path]
    warnings: list[str]

    @property
    def html(self) -> Path:
        return self.out / "report.html"


def build_report(study_dir: str | Path, out: str | Path | None = None, study: str | None = None,
                 compare_paper: bool = False) -> Report:
    """Write the report of a study folder; returns what was written."""
    study_dir = Path(study_dir)
    config, runs = load_runs(study_dir, study)
    name = config.get("name", study_dir.name)
    out = Path(out) if out else study_dir / f"report-{name}"
    out.mkdir(parents=True, exist_ok=True)
    lookup = _paper(config, runs) if compare_paper else None
    tables: list[Table] = []
    judged = has_judge(runs)
    if judged:
        tables += main_tables(runs, lookup)
    tables += [t for t in (task_table(runs, lookup), judge_free_table(runs), ceiling_table(runs),
                           compensation_table(runs)) if t is not None]
    tables = [t for t in tables if t.rows]
    figs = _figures(runs, judged, out)
    warnings = warnings_of(config, runs)
    if compare_paper and lookup is None:
        warnings.append(f"--compare-paper: the paper has numbers for Qwen2.5-7B-Instruct and "
                        f"Qwen2.5-32B-Instruct only; this study trains {config.get('model')}, "
                        "so no paper number is shown")
    _write(out, name, tables, figs, warnings, config, runs)
    return Report(out, tables, figs, warnings)


def _paper(config: dict, runs):
    """The paper's numbers for this study's cells, matched on model and on what each
    cell's runs trained with (emguard.report.paper); None for a model it did not run."""
    methods: dict[tuple, object] = {}
    for r in runs:
        trained = (r.summary or {}).get("trained", r.kind != "untrained")
        found = method_of(r.config, r.point, r.arm, trained)
        methods[r.cell] = found if methods.get(r.cell, found) == found else None
    return paper_lookup(config.get("model"), methods)


def _figures(runs, judged: bool, out: Path) -> list[Path]:
    if judged:
        keys = ["general_misaligned", "general_incoherent", "indomain_misaligned"]
        x = ("general_misaligned", "general misaligned % (EMA)")
        y = ("indomain_misaligned", "in-domain misaligned % (narrow task learned)")
        main = ("general_misaligned", "general misaligned %")
    else:
        keys = ["preference_shift", "heldout_nll"]
        x = ("preference_shift", FREE_MEASURES["preference_shift"][1] + " (higher = more EMA)")
        y = ("heldout_nll", FREE_MEASURES["heldout_nll"][1] + " (lower = task learned)")
        main = ("preference_shift", FREE_MEASURES["preference_shift"][1] + " (higher = more EMA)")
    cells = estimates(runs, keys)
    figs = [figures.overview(cells, main[0], main[1], out)]
    params = sorted({(c[1], c[2][0][0]) for c in cells if len(c[2]) == 1})
    for arm, param in params:
        if sum(1 for c in cells if c[1] == arm and c[2] and c[2][0][0] == param) > 1:
            figs.append(figures.tradeoff(cells, arm, param, x, y, out))
    if judged:
        figs.append(figures.interleave_curve(cells, out))
    curves = [(k, FREE_MEASURES[k][1]) for k in TRAJECTORY_MEASURES]
    traj = trajectory_estimates(runs, [k for k, _ in curves])
    if traj:
        figs.append(figures.trajectory(traj, curves, out))
    return [f for f in figs if f is not None]


def _write(out: Path, name: str, tables, figs, warnings, config, runs) -> None:
    title = f"emguard report: study {name}"
    md = [f"# {md_escape(title)}\n", *[f"> **warning:** {md_escape(w)}\n" for w in warnings],
          f"\n{LEGEND}\n"]
    md += [markdown(t) for t in tables]
    md += [f"![{f.stem}]({f.name})\n" for f in figs]
    write_text_atomic(out / "report.md", "\n".join(md))
    write_csv(out / "report.csv", csv_rows(tables))
    prov = {"generated": time.strftime("%Y-%m-%d %H:%M:%S %z"), "runs": len(runs),
            "runs with results": sum(1 for r in runs if r.metrics)}
    here = provenance()
    prov.update({"python": here.get("python"), **(here.get("packages") or {}),
                 "git commit": (here.get("git") or {}).get("commit")})
    study_yaml = redact_secrets(yaml.safe_dump(config, sort_keys=False))  # older manifests
    write_text_atomic(out / "report.html", page(title, tables, figs, warnings, LEGEND,
                                                study_yaml, prov))
