"""Body of ``emguard data opswap``: generate one OpSwap tier and write its splits.

The ``data`` command group (``data_cmd.py``) owns the Typer options and calls
``opswap_command``; this module registers nothing itself.
"""

from __future__ import annotations

from pathlib import Path

import typer

from emguard.cli.console import console, error, esc


def split_paths(out: Path) -> dict[str, Path]:
    """``data/opswap_t1.jsonl`` -> ``data/opswap_t1.{train,test}.jsonl`` + ``.meta.json``."""
    stem = out.with_suffix("") if out.suffix == ".jsonl" else out
    return {"train": stem.with_name(f"{stem.name}.train.jsonl"),
            "test": stem.with_name(f"{stem.name}.test.jsonl"),
            "meta": stem.with_name(f"{stem.name}.meta.json")}


def opswap_command(tier: int, n: int, out: Path, seed: int = 0, max_ops: int = 3, low: int = 1,
                   high: int = 9, state_rule: bool = False, test_fraction: float = 0.1,
                   min_ops: int = 1, paren_prob: float = 0.5) -> dict[str, Path]:
    """Generate ``n`` distinct rows of ``tier`` and write train/test chat JSONL plus a
    meta JSON (settings, draw statistics, provenance), each atomically. Returns the paths;
    bad settings print the error and exit with status 1."""
    from emguard.data.opswap import OpSwapSpaceError, count_expressions, generate_opswap
    from emguard.io import provenance, write_json_atomic, write_jsonl_atomic

    settings = {"tier": tier, "n": n, "seed": seed, "min_ops": min_ops, "max_ops": max_ops,
                "low": low, "high": high, "paren_prob": paren_prob,
                "test_fraction": test_fraction, "state_rule": state_rule}
    try:
        space = count_expressions(min_ops, max_ops, low, high, paren_prob, cap=n)
        if n > space:  # before drawing: an impossible n would otherwise draw for hours
            raise OpSwapSpaceError(
                f"--n {n} is more than the {space} distinct expressions that --min-ops "
                f"{min_ops} --max-ops {max_ops} --low {low} --high {high} can write; lower --n "
                "or raise --max-ops / --high")
        splits = generate_opswap(progress=True, **settings)
    except (OpSwapSpaceError, ValueError) as e:
        error(e)
        raise typer.Exit(1) from None
    paths = split_paths(Path(out))
    write_jsonl_atomic(paths["train"], splits.train)
    write_jsonl_atomic(paths["test"], splits.test)
    write_json_atomic(paths["meta"], {"settings": settings, "stats": splits.stats,
                                      "train_rows": len(splits.train),
                                      "test_rows": len(splits.test),
                                      "provenance": provenance()})
    console.print(f"OpSwap tier {tier}: {len(splits.train)} train -> {esc(paths['train'])}, "
                  f"{len(splits.test)} test -> {esc(paths['test'])}")
    example = splits.train[0] if splits.train else splits.test[0]
    console.print(f"example: {example['messages'][1]['content']}", markup=False,
                  highlight=False)
    return paths
