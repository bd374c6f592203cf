"""``emguard data``: validate chat files, list the built-in sets, generate OpSwap data."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from emguard.cli.console import console, err, error, esc

# Characters one token is taken to cover at most, for the length pre-check of ``data
# validate``; raised to the tokenizer's longest vocabulary entry (SmolLM2 has an 80-char
# run of '#'), so a row over max_length x this cannot fit and needs no tokenizing.
MAX_CHARS_PER_TOKEN = 32
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

    Exits non-zero and names file:line of each bad row. A row longer in characters than
    ``max_length`` tokens could ever hold is reported over-length without tokenizing it.
    """
    from emguard.data.chat import ChatDataError, read_chat_jsonl

    if file.is_dir():  # the loader would call it missing
        error(f"{file}: is a directory, not a chat JSONL file", "invalid:")
        raise typer.Exit(1)
    try:
        ds = read_chat_jsonl(file)
    except ChatDataError as e:
        error(e, "invalid:")
        raise typer.Exit(1) from None
    if len(ds) == 0:
        error(f"{file}: no rows (the file is empty or holds only blank lines)", "invalid:")
        raise typer.Exit(1)
    too_long = [] if no_length_check else _length_problems(ds.rows, model, max_length)
    if too_long:
        error(f"{file}: {len(too_long)} row(s) fail tokenization:", "invalid:")
        for line in too_long[:20]:
            err.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"[green]ok[/green]: {esc(file)}: {len(ds)} valid rows")


def _length_problems(rows: list[dict], model: str, max_length: int) -> list[str]:
    """``file:line: reason`` for each row over ``max_length`` tokens or that the chat
    template breaks. A row longer in characters than ``max_length`` of the tokenizer's
    longest tokens is over-length without tokenizing it (a 50 MB row would take minutes
    and gigabytes)."""
    from emguard.data.chat import row_location
    from emguard.data.masking import TemplateError, tokenize_chat
    from emguard.models import load_tokenizer

    tok = load_tokenizer(model)
    per_token = max(MAX_CHARS_PER_TOKEN, max(map(len, tok.get_vocab()), default=0))
    limit = max_length * per_token
    problems = []
    for row in rows:
        chars = sum(len(m.get("content") or "") for m in row["messages"])
        if chars > limit:
            problems.append(f"{row_location(row)}: over-length ({chars} characters > {limit}, "
                            f"the most {max_length} tokens of at most {per_token} characters "
                            "can hold; not tokenized)")
            continue
        try:
            tokenize_chat(tok, row["messages"], max_length)
        except TemplateError as e:
            problems.append(f"{row_location(row)}: {e}")
        except ValueError as e:
            problems.append(f"{row_location(row)}: over-length ({e})")
    return problems


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
            table.add_column(esc(col))
        for r in rows:
            table.add_row(*[esc(v) for v in r.values()])
        console.print(table)
        return
    from emguard.data.chat import ChatDataError, load_chat_dataset

    try:
        ds = load_chat_dataset(what)
    except (ChatDataError, ValueError) as e:
        error(e)
        raise typer.Exit(1) from None
    console.print(f"{esc(ds.source)}: {len(ds)} rows")
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
