"""``emguard direction fit``: the misalignment direction of a model, as a reusable folder
(emguard.defenses.direction), with the causal check that it moves the preference margin."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from emguard.cli.console import console, esc

direction_app = typer.Typer(help="Misalignment directions (steering, ablation, anchoring).",
                            no_args_is_help=True)


@direction_app.command("fit")
def fit(
    out: Path = typer.Option(..., "--out", help="Folder to write (replaced as a whole, atomically)."),
    model: str = typer.Option("smollm2-135m", "--model", help="Reference model spec."),
    pairs: str = typer.Option(None, "--pairs",
                              help="Contrastive pairs JSONL (question, aligned, misaligned); "
                                   "default: builtin:preference-pairs."),
    holdout: int = typer.Option(None, "--holdout", min=1,
                                help="Leave out the N evenly spaced pairs that evaluation with "
                                     "eval.preference_max_pairs=N scores (and check on them)."),
    k: int = typer.Option(4, "--k", min=1, help="Subspace dimensions kept per layer."),
    check_layers: str = typer.Option(None, "--check-layers",
                                     help="Comma-separated layers for the causal check "
                                          "(default: every 5th block output)."),
    alpha: float = typer.Option(0.25, "--alpha",
                                help="Causal check: add +-alpha x typical residual norm along u."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
) -> None:
    """Fit u_l = mean(misaligned) - mean(aligned) answer activations at every layer on the
    reference model, write it with per-layer norms, and check causally that adding
    +-alpha s_l u_l at a layer moves the misalignment-preference margin the same way."""
    from rich.table import Table

    from emguard.defenses.direction import fit_and_check, save_direction
    from emguard.io import atomic_dir
    from emguard.models import ModelLoadError, default_device, load_model, model_fingerprint
    from emguard.ownership import (
        DIRECTION,
        FolderConflictError,
        check_writable_target,
        folder_lock,
        folder_state,
        refuse_foreign,
        write_marker,
    )

    try:
        check_writable_target(out)
        if folder_state(out, DIRECTION) == "foreign":
            refuse_foreign(out, DIRECTION, "the direction (--out)")
        check_pairs(pairs, holdout)  # a bad pairs file fails before the model loads
        wanted = _layers(check_layers)
        m, tok = load_model(model, device=default_device(), trust_remote_code=trust_remote_code)
    except (FolderConflictError, ModelLoadError, OSError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None
    n_layers = m.config.get_text_config().num_hidden_layers
    layers = wanted or list(range(5, n_layers, 5)) or [max(1, n_layers // 2)]
    bad = [i for i in layers if not 1 <= i < n_layers]
    if bad:
        typer.echo(f"error: --check-layers {bad} out of range 1..{n_layers - 1}", err=True)
        raise typer.Exit(code=2)
    direction = fit_and_check(m, tok, pairs, holdout, k, layers, alpha, batch_size)
    direction.meta.update(model=model, model_fingerprint=model_fingerprint(model))
    with folder_lock(out, wait=60), atomic_dir(out) as tmp:
        write_marker(tmp, DIRECTION, model=model)
        save_direction(direction, tmp)
    _print(console, Table, direction, out)


def check_pairs(pairs: str | None, holdout: int | None) -> None:
    """ValueError naming ``--pairs`` and the file unless it holds pairs to fit on (read
    with ``emguard.data.pairs.training_pairs``): a directory, bad JSON, non-UTF-8 text or
    no pairs at all. Cheap, so it runs before the model loads."""
    from emguard.data.pairs import FIT_PAIRS, training_pairs

    where = pairs or FIT_PAIRS
    if pairs is not None and Path(pairs).is_dir():
        raise ValueError(f"--pairs {pairs}: is a directory, not a pairs JSONL file")
    try:
        found = training_pairs(pairs, holdout)
    except UnicodeDecodeError as e:
        raise ValueError(f"--pairs {where}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--pairs {where}:{_bad_json_line(Path(where))}: not valid JSON "
                         f"({e.msg})") from None
    if not found:
        raise ValueError(f"--pairs {where}: no pairs (the file is empty or holds only blank "
                         "lines)")


def _bad_json_line(path: Path) -> int | str:
    """The 1-based number of the first non-blank line of ``path`` that is not JSON."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                if line.strip():
                    json.loads(line)
            except ValueError:
                return lineno
    return "?"


def _layers(text: str | None) -> list[int]:
    """``--check-layers 5,10`` as ints ([] when not given); ValueError naming the option."""
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--check-layers '{text}' is not a comma-separated list of layer "
                         "numbers") from None


def _print(console, table_cls, direction, out: Path) -> None:
    check = {r["layer"]: r for r in direction.meta["causal_check"]["rows"]}
    table = table_cls(title=f"misalignment direction ({direction.meta['n_pairs']} pairs)")
    for col in ("layer", "|u|", "s", "|u|/s", "margin -a", "margin 0", "margin +a", "raises"):
        table.add_column(col, justify="right")
    for row in direction.layer_table():
        c = check.get(row["layer"])
        cells = ([f"{c['margin_minus']:+.4f}", f"{c['margin_zero']:+.4f}",
                  f"{c['margin_plus']:+.4f}", "yes" if c["raises"] else "NO"] if c else [""] * 4)
        if c or row["layer"] % 5 == 0:
            table.add_row(str(row["layer"]), f"{row['direction_norm']:.3f}",
                          f"{row['residual_norm']:.2f}", f"{row['ratio']:.3f}", *cells)
    console.print(table)
    pairs = direction.meta["causal_check"]["pairs"]
    console.print(f"written: {esc(out)} (causal check on {pairs} pairs)")


def register(app: typer.Typer) -> None:
    app.add_typer(direction_app, name="direction")
