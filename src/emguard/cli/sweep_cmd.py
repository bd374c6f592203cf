"""``emguard sweep STUDY.yaml``: run (or list) every run of a study."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
err = Console(stderr=True)

STATE_STYLE = {"done": "green", "evaluated": "cyan", "trained": "cyan", "partial": "yellow",
               "pending": "white", "missing-input": "red"}


def sweep_command(
    study: Path = typer.Argument(..., help="Study YAML (see configs/paper/ and emguard.study)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs and their state; "
                                 "train nothing (no GPU or data needed)."),
    executor: str = typer.Option("sequential", help="sequential | ray (one Ray task per run)."),
    address: str = typer.Option(None, help="Ray cluster address (auto, ray://HOST:10001); "
                                "default: start a local Ray instance."),
    only: str = typer.Option(None, help="Only runs whose name matches this glob, e.g. "
                             "'insecure/kl*' (and the runs they need)."),
    judge: bool = typer.Option(True, "--judge/--no-judge", help="Run the judge stage after "
                               "evaluation (one judge for all runs)."),
    reevaluate: bool = typer.Option(False, "--reevaluate", help="Runs evaluated with other eval "
                                    "settings than the study's: discard those evaluations (their "
                                    "generations and judgments) and evaluate again."),
) -> None:
    """Train, project and evaluate every unfinished run of a study, then judge the answers.

    Finished runs are skipped; a sweep killed at any point and restarted finishes every
    run once. A failed run is reported and the others go on (exit code 1 at the end).
    """
    from emguard.config import ConfigError
    from emguard.study import load_study

    if executor not in ("sequential", "ray"):
        raise typer.BadParameter("must be sequential or ray", param_hint="--executor")
    if executor == "ray" and not dry_run:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise typer.BadParameter("Ray is not installed: pip install 'emguard[ray]'",
                                     param_hint="--executor")
    try:
        cfg = load_study(study)
        if dry_run:
            _dry_run(cfg)
            return
        _run(cfg, executor, address, only, judge, reevaluate)
    except (ConfigError, FileNotFoundError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


def _dry_run(cfg) -> None:
    from emguard.study import expand
    from emguard.sweep import LOG_FILE, SweepLog, status

    runs = expand(cfg)
    last = {e["run"]: e for e in SweepLog(Path(cfg.output_dir) / LOG_FILE).read()
            if e.get("run") and e["event"] in ("start", "finish", "fail", "blocked")}
    table = Table(title=f"study {cfg.name}: {len(runs)} runs in {cfg.output_dir}")
    for col in ("run", "kind", "state", "folder", "detail"):
        table.add_column(col, overflow="fold")
    counts: dict[str, int] = {}
    for run in runs:
        st = status(run)
        event = last.get(run.name, {})
        if st.state != "done" and event.get("event") in ("fail", "blocked"):
            st.detail = f"last attempt {event['event']}: {event.get('error') or event.get('needs')}"
        counts[st.state] = counts.get(st.state, 0) + 1
        style = STATE_STYLE.get(st.state, "white")
        table.add_row(run.name, run.kind, f"[{style}]{st.state}[/{style}]",
                      run.run_dir.name, st.detail)
    console.print(table)
    console.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))


def progress_printer(out: Console, label: str = "") -> Callable[[str, str, int, int], None]:
    """A sweep's ``on_event``: one line per finished run, its state and the seconds since
    this printer was made."""
    started = time.time()
    styles = {"done": "green", "skipped": "dim", "failed": "red", "blocked": "yellow"}

    def notify(name: str, state: str, k: int, n: int) -> None:
        style = styles[state]  # escaped: rich would take "[demo 1/9]" for a style tag
        out.print(f"{escape(f'[{label}{k}/{n}]')} [{style}]{state:>8}[/{style}]  {escape(name)}  "
                  f"({time.time() - started:.0f} s)")

    return notify


def _run(cfg, executor: str, address: str | None, only: str | None, judge: bool,
         reevaluate: bool) -> None:
    from emguard.sweep import run_sweep

    result = run_sweep(cfg, executor=executor, address=address, only=only, judge=judge,
                       reevaluate=reevaluate, on_event=progress_printer(console))
    console.print(f"{len(result.done)} run(s) done, {len(result.skipped)} already finished, "
                  f"{result.judged} judged, {len(result.failed)} failed, "
                  f"{len(result.blocked)} blocked; log: {Path(cfg.output_dir) / 'sweep_log.jsonl'}")
    for name, error in result.failed.items():
        err.print(f"[red]failed[/red] {name}: {error}")
    for name, need in result.blocked.items():
        err.print(f"[yellow]blocked[/yellow] {name}: needs {need}, which failed")
    if result.failed or result.blocked:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep_command)
