"""``emguard safelora``: post-hoc SafeLoRA projection of a trained LoRA adapter."""

from __future__ import annotations

from pathlib import Path

import typer

from emguard.cli.console import console, esc


def safelora(
    adapter: Path = typer.Option(..., "--adapter", help="Trained PEFT LoRA adapter directory."),
    aligned: str = typer.Option(..., "--aligned",
                                help="Aligned (instruct) model: hub id, local dir, .gguf or 'smollm2-135m'."),
    unaligned: str = typer.Option(..., "--unaligned",
                                  help="Base model spec (paper), or a misaligned adapter dir "
                                       "trained on the aligned model."),
    out: Path = typer.Option(..., "--out", help="Output adapter directory (written atomically)."),
    tau: float = typer.Option(0.3, "--tau", help="Project a layer iff cos_F(W, C W) < tau."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Post-hoc SafeLoRA (paper eqs. 1-3): replace each LoRA delta W by C W, C = V V^T / ||V||^2,
    iff cos_F(W, C W) < tau; writes a PEFT adapter plus safelora_report.json."""
    from emguard.defenses.safelora import REPORT_NAME, SafeLoRAError, apply_safelora
    from emguard.models import ModelLoadError
    from emguard.ownership import FolderConflictError

    try:
        report = apply_safelora(adapter, out, aligned=aligned, unaligned=unaligned, tau=tau,
                                progress=not quiet)
    except (SafeLoRAError, ModelLoadError, FolderConflictError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from e
    _print_summary(report, out / REPORT_NAME)


def _print_summary(report, report_path: Path) -> None:
    """One row per projection type (q_proj, ...); per-layer rows are in the JSON report."""
    import math
    import statistics

    from rich.table import Table

    groups: dict[str, list] = {}
    for row in report.layers:
        groups.setdefault(row.name.rsplit(".", 1)[-1], []).append(row)
    table = Table(title=f"SafeLoRA, tau={report.tau}, alignment: {esc(report.alignment['kind'])}")
    for column in ("module", "layers", "projected", "min cos", "median cos", "max cos", "undefined"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for kind, rows in groups.items():
        cos = sorted(r.cosine for r in rows if not math.isnan(r.cosine))
        stats = ([f"{c:.3f}" for c in (cos[0], statistics.median(cos), cos[-1])] if cos
                 else ["-"] * 3)
        table.add_row(esc(kind), str(len(rows)), str(sum(r.projected for r in rows)), *stats,
                      str(len(rows) - len(cos)))
    console.print(table)
    console.print(f"projected {report.n_projected}/{len(report.layers)} layers "
                  f"({report.share_projected:.1%}); adapter: {esc(report.adapter_out)}; "
                  f"report: {esc(report_path)}")


def register(app: typer.Typer) -> None:
    app.command("safelora")(safelora)
