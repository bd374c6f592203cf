"""``emguard report STUDY_DIR``: tables, figures and one HTML page from a study folder."""

from __future__ import annotations

from pathlib import Path

import typer

from emguard.cli.console import console, error, esc, plain, warning


def report_command(
    study_dir: Path = typer.Argument(..., help="A study folder (output_dir of a study YAML)."),
    out: Path = typer.Option(None, help="Output folder (default: STUDY_DIR/report-NAME)."),
    study: str = typer.Option(None, help="Which study, when several share the folder."),
    compare_paper: bool = typer.Option(False, "--compare-paper", help="Put the paper's "
                                       "published numbers beside the study's, cell by cell."),
) -> None:
    """Write the study's tables (Markdown, CSV), figures (PNG, SVG) and report.html.

    Reads run folders only, never a model; a half-finished study reports what it has."""
    from emguard.report import build_report
    from emguard.report.collect import ReportInputError
    from emguard.report.render import markdown

    try:
        report = build_report(study_dir, out, study, compare_paper)
    except ReportInputError as e:
        error(e)
        raise typer.Exit(2) from None
    for w in report.warnings:
        warning(w)
    if report.tables:
        plain(markdown(report.tables[0]))
    console.print(f"report: {esc(report.html)}")


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)
