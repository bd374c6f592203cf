"""``emguard push RUN --repo OWNER/NAME``: a run's adapter and its model card on the Hub."""

from __future__ import annotations

from pathlib import Path

import typer

from emguard.cli.console import console, error, esc


def push_command(
    run: Path = typer.Argument(..., help="A finished run folder."),
    repo: str = typer.Option(..., "--repo", help="Hub model repo OWNER/NAME (created if absent)."),
    adapter: str = typer.Option("adapter", "--adapter",
                                help="adapter (as trained) or adapter_safelora (projected)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
) -> None:
    """Upload the run's adapter with its model card (token: $HF_TOKEN or a saved login)."""
    from emguard.hub import PushError, push_adapter

    try:
        url = push_adapter(run, repo, adapter, private)
    except PushError as e:
        error(e)
        raise typer.Exit(2) from None
    except Exception as e:  # network, authentication: the Hub's own message
        error(f"upload to {repo} failed: {type(e).__name__}: {e}")
        raise typer.Exit(1) from None
    console.print(f"pushed {esc(run / adapter)} -> {esc(url)}")


def register(app: typer.Typer) -> None:
    app.command("push")(push_command)
