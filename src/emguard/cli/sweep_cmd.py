"""``emguard sweep STUDY.yaml``: run (or list) every run of a study."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from emguard.cli.console import console, err, error, esc, file_problem

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
        if study.is_dir():  # load_study would call it missing
            raise ConfigError(file_problem(study, "study file"))
        cfg = load_study(study)
        if dry_run:
            _dry_run(cfg)
            return
        if only is not None:
            _check_only(cfg, only)
        _run(cfg, executor, address, only, judge, reevaluate)
    except (ConfigError, FileNotFoundError) as e:
        error(e)
        raise typer.Exit(2) from None


def _check_only(cfg, only: str) -> None:
    """ConfigError naming the glob and a few run names when ``--only`` selects no run
    (matched as ``emguard.sweep.run_sweep`` does), so a typo does not pass as "0 done"."""
    import fnmatch

    from emguard.config import ConfigError
    from emguard.study import expand

    names = [r.name for r in expand(cfg)]
    if not any(fnmatch.fnmatch(name, only) for name in names):
        shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
        raise ConfigError(f"--only '{only}' matches none of the {len(names)} run(s) of study "
                          f"{cfg.name}; run names look like: {shown or '(none)'}")


def _dry_run(cfg) -> None:
    from emguard.study import expand
    from emguard.sweep import LOG_FILE, SweepLog, status

    runs = expand(cfg)
    last = {e["run"]: e for e in SweepLog(Path(cfg.output_dir) / LOG_FILE).read()
            if e.get("run") and e["event"] in ("start", "finish", "fail", "blocked")}
    table = Table(title=f"study {esc(cfg.name)}: {len(runs)} runs in {esc(cfg.output_dir)}")
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
        table.add_row(esc(run.name), esc(run.kind), f"[{style}]{esc(st.state)}[/{style}]",
                      esc(run.run_dir.name), esc(st.detail))
    console.print(table)
    console.print(esc(", ".join(f"{n} {s}" for s, n in sorted(counts.items()))))


def progress_printer(out: Console, label: str = "") -> Callable[[str, str, int, int], None]:
    """A sweep's ``on_event``: one line per finished run, its state and the seconds since
    this printer was made."""
    started = time.time()
    styles = {"done": "green", "skipped": "dim", "failed": "red", "blocked": "yellow",
              "busy": "cyan"}

    def notify(name: str, state: str, k: int, n: int) -> None:
        style = styles[state]  # escaped: rich would take "[demo 1/9]" for a style tag
        out.print(f"{esc(f'[{label}{k}/{n}]')} [{style}]{state:>8}[/{style}]  {esc(name)}  "
                  f"({time.time() - started:.0f} s)")

    return notify


def _run(cfg, executor: str, address: str | None, only: str | None, judge: bool,
         reevaluate: bool) -> None:
    from emguard.sweep import run_sweep

    result = run_sweep(cfg, executor=executor, address=address, only=only, judge=judge,
                       reevaluate=reevaluate, on_event=progress_printer(console))
    console.print(f"{len(result.done)} run(s) done, {len(result.skipped)} already finished, "
                  f"{result.judged} judged, {len(result.failed)} failed, "
                  f"{len(result.blocked)} blocked, {len(result.busy)} busy elsewhere; "
                  f"log: {esc(Path(cfg.output_dir) / 'sweep_log.jsonl')}")
    for name, problem in result.failed.items():
        err.print(f"[red]failed[/red] {esc(name)}: {esc(problem)}", soft_wrap=True)
    for name, need in result.blocked.items():
        err.print(f"[yellow]blocked[/yellow] {esc(name)}: needs {esc(need)}, which failed",
                  soft_wrap=True)
    for name, why in result.busy.items():
        err.print(f"[cyan]busy[/cyan] {esc(name)}: {esc(why)}; rerun the sweep when that "
                  "process has finished", soft_wrap=True)
    if result.failed or result.blocked:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep_command)
