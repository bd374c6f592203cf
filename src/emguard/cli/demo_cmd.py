"""``emguard demo``: the main job on the embedded default model, as a small study."""

from __future__ import annotations

import time
from pathlib import Path

import typer


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a comma-separated list of integers",
                                 param_hint="--seeds") from None
    if not seeds:
        raise typer.BadParameter("give at least one seed", param_hint="--seeds")
    return seeds


def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Study folder: runs, "
                             "sweep log, report."),
    seeds: str = typer.Option("0", help="Comma-separated seeds, e.g. 0,1,2 (each adds 7 "
                              "fine-tunes and a SafeLoRA projection)."),
    steps: int = typer.Option(None, min=1, help="Optimizer steps per fine-tune (default: the "
                              "demo study's 12, the regime study's choice)."),
    model: str = typer.Option(None, help="Model spec (default: the embedded SmolLM2-135M-Instruct)."),
    judge: str = typer.Option(None, help="Also judge sampled answers: openai:MODEL (key from "
                              "$OPENAI_API_KEY), openai:MODEL@URL or local:MODEL. Default: "
                              "judge-free measures only."),
    overrides: list[str] = typer.Option(None, "--set", help="KEY=VALUE for every run's config, "
                                        "e.g. --set data.max_length=1024 (repeatable)."),
) -> None:
    """Run the demo study (emguard/configs/demo.yaml): untrained, aligned control, misaligned
    fine-tune, positive control (the ceiling), KL (lambda 1, 10), LDIFS, SafeLoRA and
    interleaving on the embedded model in the regime the regime study chose (12 steps at lr
    5e-4), then print the main table and write the report (Markdown, CSV, figures, one HTML
    page).

    A rerun skips every finished run.
    """
    from rich.markdown import Markdown

    from emguard.cli.console import console, error, esc, warning
    from emguard.cli.sweep_cmd import progress_printer
    from emguard.config import ConfigError
    from emguard.demo import DemoError, run_demo
    from emguard.report.render import markdown

    started = time.time()
    try:
        report = run_demo(out, _seeds(seeds), steps, model, judge, overrides or [],
                          on_event=progress_printer(console, "demo "))
    except (ConfigError, FileNotFoundError) as e:
        error(e)
        raise typer.Exit(2) from None
    except DemoError as e:
        error(e)
        raise typer.Exit(1) from None
    for table in report.tables:
        console.print(Markdown(markdown(table)))
    for text in report.warnings:
        warning(text, out=console)  # stdout, as before
    console.print(f"Report: {esc(report.html)} (also report.md, report.csv and the figures in "
                  f"{esc(report.out)}); {time.time() - started:.0f} s.")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
