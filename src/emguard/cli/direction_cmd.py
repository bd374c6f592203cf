"""``emguard direction fit``: a misalignment direction of a model, as a reusable folder
(emguard.defenses.direction), from one of two sources:

- contrastive pairs (default): the mean difference of misaligned and aligned answer
  activations on the reference model (persona vectors), with the causal check that it
  moves the preference margin;
- ``--from-run RUN`` / ``--adapter DIR``: CAFT's principal components of (fine-tuned -
  base) residual differences on neutral chat prompts (no causal check)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from emguard.cli.console import console, esc

direction_app = typer.Typer(help="Misalignment directions (steering, ablation, anchoring).",
                            no_args_is_help=True)
DEFAULT_MODEL = "smollm2-135m"


@direction_app.command("fit")
def fit(
    out: Path = typer.Option(..., "--out", help="Folder to write (replaced as a whole, atomically)."),
    model: str = typer.Option(None, "--model",
                              help="Reference model spec (default: smollm2-135m; with --from-run "
                                   "the run's model)."),
    pairs: str = typer.Option(None, "--pairs",
                              help="Contrastive pairs JSONL (question, aligned, misaligned); "
                                   "default: builtin:preference-pairs."),
    holdout: int = typer.Option(None, "--holdout", min=1,
                                help="Leave out the N evenly spaced pairs that evaluation with "
                                     "eval.preference_max_pairs=N scores (and check on them)."),
    k: int = typer.Option(4, "--k", min=1,
                          help="Dimensions kept per layer (contrastive: the mean difference and "
                               "k-1 principal directions; --from-run: the top k components)."),
    check_layers: str = typer.Option(None, "--check-layers",
                                     help="Comma-separated layers for the causal check "
                                          "(default: every 5th block output)."),
    alpha: float = typer.Option(0.25, "--alpha",
                                help="Causal check: add +-alpha x typical residual norm along u."),
    from_run: Path = typer.Option(None, "--from-run",
                                  help="CAFT: a finished run folder; PCA of its adapter's "
                                       "(fine-tuned - base) residual differences."),
    adapter: Path = typer.Option(None, "--adapter",
                                 help="CAFT: a fine-tuned adapter folder (with --model) instead "
                                      "of a run."),
    prompts: str = typer.Option(None, "--prompts",
                                help="CAFT: neutral prompts, chat JSONL (the turns before each "
                                     "row's first assistant turn); default builtin:safe-instruct."),
    answer_tokens: int = typer.Option(32, "--answer-tokens", min=1,
                                      help="CAFT: new tokens of each greedy answer the "
                                           "differences are taken at."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
) -> None:
    """Fit u_l = mean(misaligned) - mean(aligned) answer activations at every layer on the
    reference model, write it with per-layer norms, and check causally that adding
    +-alpha s_l u_l at a layer moves the misalignment-preference margin the same way.
    With --from-run / --adapter: CAFT's top-k principal components of the per-token
    (fine-tuned - base) residual differences on the fine-tuned model's answers to neutral
    prompts (none an evaluation prompt), with their explained-variance ratios."""
    caft = from_run is not None or adapter is not None
    try:
        _check_source(from_run, adapter, pairs, holdout, check_layers, prompts)
        _check_out(out)
        if caft:
            direction, model = _fit_caft(from_run, adapter, model, prompts, k, answer_tokens,
                                         batch_size, trust_remote_code)
        else:
            model = model or DEFAULT_MODEL
            direction = _fit_contrastive(model, pairs, holdout, k, check_layers, alpha,
                                         batch_size, trust_remote_code)
    except _Failed as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None
    _write(out, direction, model)
    if caft:
        _print_caft(direction, out)
    else:
        _print(console, _table(), direction, out)


class _Failed(Exception):
    """A bad request, reported as one line and exit code 2."""


def _check_source(from_run, adapter, pairs, holdout, check_layers, prompts) -> None:
    """_Failed for options of the other source, or for both --from-run and --adapter."""
    if from_run is not None and adapter is not None:
        raise _Failed("give --from-run RUN or --adapter DIR, not both")
    caft = from_run is not None or adapter is not None
    wrong = ([n for n, v in (("--pairs", pairs), ("--holdout", holdout),
                             ("--check-layers", check_layers)) if v is not None] if caft
             else ["--prompts"] if prompts is not None else [])
    if wrong:
        raise _Failed(f"{', '.join(wrong)} belong(s) to the "
                      f"{'contrastive' if caft else '--from-run / --adapter (CAFT)'} source only")


OUT_WHAT = "the direction (--out)"  # what --out is for, in a refusal


def _check_out(out: Path) -> None:
    from emguard.ownership import DIRECTION, FolderConflictError, check_claim

    try:
        check_claim(out, DIRECTION, OUT_WHAT)
    except (FolderConflictError, OSError, ValueError) as e:
        raise _Failed(str(e)) from None


def _load(model: str, trust_remote_code: bool):
    from emguard.models import ModelLoadError, default_device, load_model

    try:
        return load_model(model, device=default_device(), trust_remote_code=trust_remote_code)
    except (ModelLoadError, OSError, ValueError) as e:
        raise _Failed(str(e)) from None


def _fit_contrastive(model: str, pairs, holdout, k, check_layers, alpha, batch_size,
                     trust_remote_code):
    from emguard.defenses.direction import fit_and_check
    from emguard.models import model_fingerprint

    try:
        check_pairs(pairs, holdout)  # a bad pairs file fails before the model loads
        wanted = _layers(check_layers)
    except (OSError, ValueError) as e:
        raise _Failed(str(e)) from None
    m, tok = _load(model, trust_remote_code)
    n_layers = m.config.get_text_config().num_hidden_layers
    layers = wanted or list(range(5, n_layers, 5)) or [max(1, n_layers // 2)]
    bad = [i for i in layers if not 1 <= i < n_layers]
    if bad:
        raise _Failed(f"--check-layers {bad} out of range 1..{n_layers - 1}")
    try:
        direction = fit_and_check(m, tok, pairs, holdout, k, layers, alpha, batch_size)
    except ValueError as e:  # identical answers, non-finite states
        raise _Failed(str(e)) from None
    direction.meta.update(model=model, model_fingerprint=model_fingerprint(model))
    return direction


def _fit_caft(from_run, adapter, model, prompts, k, answer_tokens, batch_size,
              trust_remote_code):
    """(the CAFT direction, the model spec): prompts read and filtered, and the run or
    adapter checked, before the model loads."""
    from emguard.defenses.direction import NEUTRAL_PROMPTS, fit_caft, neutral_prompts
    from emguard.evaluate import adapter_fingerprint
    from emguard.models import ModelLoadError, load_adapter, model_fingerprint

    try:
        model, adapter, sets, record = _caft_source(from_run, adapter, model)
        kept, dropped = neutral_prompts(prompts, sets)
    except (ModelLoadError, OSError, ValueError) as e:
        raise _Failed(str(e)) from None
    m, tok = _load(model, trust_remote_code)
    try:
        m = load_adapter(m, adapter)
    except ModelLoadError as e:
        raise _Failed(str(e)) from None
    try:
        direction = fit_caft(m, tok, [r["messages"] for r in kept], k, answer_tokens, batch_size)
    except ValueError as e:  # an adapter that changes nothing, non-finite states
        raise _Failed(str(e)) from None
    direction.meta.update(
        record, model=model, model_fingerprint=model_fingerprint(model),
        adapter=str(adapter), adapter_sha256=adapter_fingerprint(adapter),
        prompts=prompts or NEUTRAL_PROMPTS, prompt_ids=[r["id"] for r in kept],
        evaluation_sets=sorted(sets), dropped_evaluation_prompts=dropped)
    return direction, model


def _caft_source(from_run: Path | None, adapter: Path | None, model: str | None):
    """(model spec, adapter folder, the evaluation sets' prompts, what to record) of
    --from-run RUN (its model, RUN/adapter, its held-out set and evaluation sets) or
    --adapter DIR (the built-in evaluation sets only)."""
    from emguard.data.split import HELDOUT_FILE
    from emguard.defenses.direction import evaluation_prompts
    from emguard.models import check_adapter_dir

    if from_run is None:
        check_adapter_dir(adapter, "--adapter ")
        return model or DEFAULT_MODEL, adapter, evaluation_prompts(), {"run": None}
    from emguard.evaluate_run import load_run

    cfg, _, _ = load_run(from_run)
    adapter = from_run / "adapter"
    check_adapter_dir(adapter, "--from-run: ")
    general = (cfg.eval.general_questions,) if cfg.eval.general_questions else ()
    sets = evaluation_prompts(from_run / HELDOUT_FILE, general, (cfg.eval.preference_pairs,))
    held = from_run / HELDOUT_FILE
    return model or cfg.model, adapter, sets, {
        "run": str(from_run), "heldout": str(held) if held.is_file() else None}


def _write(out: Path, direction, model: str) -> None:
    """Write the fit into ``out`` (replaced atomically); a folder that changed hands while
    the fit ran is refused with the same message as before it (exit 2), nothing written."""
    from emguard.defenses.direction import save_direction
    from emguard.ownership import DIRECTION, FolderConflictError, claim

    try:
        with claim(out, DIRECTION, what=OUT_WHAT, wait=60, marker={"model": model}) as claimed:
            save_direction(direction, claimed.path)  # replaces out when the block ends
    except FolderConflictError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None


def _table():
    from rich.table import Table

    return Table


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


def _print_caft(direction, out: Path) -> None:
    """Per layer (every 5th, and the last): |mean shift|, s and the components' shares."""
    meta, table = direction.meta, _table()(
        title=f"CAFT components ({direction.meta['n_prompts']} prompts, "
              f"{direction.meta['n_tokens']} answer tokens)")
    for col in ("layer", "|mean x|", "s", "explained variance (top components)"):
        table.add_column(col, justify="right")
    last = max(direction.basis)
    for row in direction.layer_table():
        if row["layer"] % 5 == 0 or row["layer"] == last:
            ratios = meta["explained_variance_ratio"][str(row["layer"])]
            table.add_row(str(row["layer"]), f"{row['direction_norm']:.3f}",
                          f"{row['residual_norm']:.2f}", " ".join(f"{r:.3f}" for r in ratios[:5]))
    console.print(table)
    dropped = meta["dropped_evaluation_prompts"]
    console.print(f"written: {esc(out)} (dropped as evaluation prompts: "
                  f"{esc(json.dumps({k: len(v) for k, v in dropped.items()})) if dropped else 'none'})")


def register(app: typer.Typer) -> None:
    app.add_typer(direction_app, name="direction")
