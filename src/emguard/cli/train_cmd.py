"""``emguard train``: one training run from a YAML config plus dotted overrides."""

from __future__ import annotations

from pathlib import Path

import typer

from emguard.cli.console import err, error, esc, file_problem


def train_command(
    config: Path = typer.Option(None, "--config", "-c", help="YAML run config (see configs/). "
                                "Omit to use the defaults: embedded model, built-in insecure-code task."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. train.max_steps=20 "
                                          "defenses.kl.weight=0.1 output_dir=runs/kl"),
    force: bool = typer.Option(False, "--force", help="output_dir holds an earlier run of ours with "
                               "another config: discard that run's files (nothing else)."),
) -> None:
    """Fine-tune with rs-LoRA (+ any defenses in the config) and write a run folder.

    A finished run (summary.json present) is skipped; an interrupted one resumes from its
    last checkpoint.
    """
    from emguard.config import ConfigError, load_run_config
    from emguard.data.chat import ChatDataError
    from emguard.finite import NonFiniteError
    from emguard.models import ModelLoadError
    from emguard.ownership import FolderConflictError
    from emguard.train import train

    try:
        if config is not None and config.is_dir():  # load_run_config would call it missing
            raise ConfigError(file_problem(config, "config file"))
        cfg = load_run_config(config, overrides or [])
        result = train(cfg, force=force)
    except (ConfigError, ChatDataError, ModelLoadError, FolderConflictError) as e:
        error(e)
        raise typer.Exit(2) from None
    except NonFiniteError as e:  # diverged: nothing of the run was saved
        error(e)
        raise typer.Exit(1) from None
    s = result.summary
    if "rank" in s:  # a non-main rank of a distributed run: rank 0 reports
        return
    state = "already complete, skipped" if result.skipped else "done"
    err.print(f"[green]{state}[/green]: {esc(result.run_dir)} - {s['steps']} steps, "
              f"loss {s['first_loss']} -> {s['last_loss']}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
