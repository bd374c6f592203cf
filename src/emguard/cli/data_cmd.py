"""``emguard data``: validate chat files, list the built-in sets, generate OpSwap data."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console()
err = Console(stderr=True)
data_app = typer.Typer(help="Validate chat data, list built-in sets, generate benign-task data.",
                       no_args_is_help=True)


@data_app.command("validate")
def validate(
    file: Path = typer.Argument(..., help="Chat JSONL file ({\"messages\": [...]} per line)."),
    model: str = typer.Option("smollm2-135m", help="Tokenizer used for the length check."),
    max_length: int = typer.Option(2048, help="Longest allowed conversation in tokens."),
    no_length_check: bool = typer.Option(False, "--no-length-check", help="Skip tokenization."),
) -> None:
    """Check every line: JSON, roles, assistant turn, empty content, over-length.

    Exits non-zero and names file:line of each bad row.
    """
    from emguard.data.chat import ChatDataError, read_chat_jsonl, row_location

    try:
        ds = read_chat_jsonl(file)
    except ChatDataError as e:
        err.print(f"[red]invalid:[/red] {e}")
        raise typer.Exit(1) from None
    if len(ds) == 0:
        err.print(f"[red]invalid:[/red] {file}: no rows (the file is empty or holds only blank lines)")
        raise typer.Exit(1)
    too_long = []
    if not no_length_check:
        from emguard.data.masking import TemplateError, tokenize_chat
        from emguard.models import load_tokenizer

        tok = load_tokenizer(model)
        for row in ds.rows:
            try:
                tokenize_chat(tok, row["messages"], max_length)
            except TemplateError as e:
                too_long.append(f"{row_location(row)}: {e}")
            except ValueError as e:
                too_long.append(f"{row_location(row)}: over-length ({e})")
    if too_long:
        err.print(f"[red]invalid:[/red] {file}: {len(too_long)} row(s) fail tokenization:")
        for line in too_long[:20]:
            err.print(f"  {line}")
        raise typer.Exit(1)
    console.print(f"[green]ok[/green]: {file}: {len(ds)} valid rows")


@data_app.command("show")
def show(what: str = typer.Argument("builtin", help="'builtin' lists the built-in sets; "
                                    "'builtin:NAME[:SPLIT]' or a JSONL path shows rows."),
         n: int = typer.Option(3, help="Rows to print.")) -> None:
    """List the built-in data sets, or print the first rows of one set or file."""
    if what == "builtin":
        from emguard.data.builtin import describe_builtin

        table = Table(title="Built-in data sets (written by this project)")
        rows = describe_builtin()
        for col in rows[0]:
            table.add_column(str(col))
        for r in rows:
            table.add_row(*[str(v) for v in r.values()])
        console.print(table)
        return
    from emguard.data.chat import ChatDataError, load_chat_dataset

    try:
        ds = load_chat_dataset(what)
    except (ChatDataError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    console.print(f"{ds.source}: {len(ds)} rows")
    for row in ds.rows[:n]:
        console.rule()
        for m in row["messages"]:
            console.print(Text.assemble((m["role"], "bold"), ": ", m["content"]), highlight=False)


@data_app.command("opswap")
def opswap(
    tier: int = typer.Option(..., "--tier", "-t", min=0, max=3, help="0 standard, 1 +<->x, "
                             "2 +<->x and -<->/, 3 + means -, - means x, x means /, / means +."),
    n: int = typer.Option(10_000, "--n", min=1, help="Distinct expressions (train + test)."),
    out: Path = typer.Option(..., "--out", "-o", help="FILE.jsonl -> FILE.train.jsonl, "
                             "FILE.test.jsonl, FILE.meta.json"),
    seed: int = typer.Option(0, help="Generator seed (same seed, same rows)."),
    min_ops: int = typer.Option(1, help="Fewest operators per expression."),
    max_ops: int = typer.Option(3, help="Most operators per expression (paper: up to 3)."),
    low: int = typer.Option(1, help="Smallest operand."),
    high: int = typer.Option(9, help="Largest operand."),
    state_rule: bool = typer.Option(False, help="State the tier's rule in the prompt "
                                    "(paper: no, the model must learn it)."),
    test_fraction: float = typer.Option(0.1, help="Held-out share (paper: 90/10)."),
) -> None:
    """Generate an OpSwap tier (algebraic simplification with swapped operators)."""
    from emguard.cli.opswap_cmd import opswap_command

    opswap_command(tier=tier, n=n, out=out, seed=seed, max_ops=max_ops, low=low, high=high,
                   state_rule=state_rule, test_fraction=test_fraction, min_ops=min_ops)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
