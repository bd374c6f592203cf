"""Contrastive preference pairs (question, aligned answer, misaligned answer).

Two built-in sets, written apart so that no defense is scored on what it was fit on:

- ``builtin:eval-pairs`` (``EVAL_PAIRS``): what the judge-free misalignment-preference
  margin scores by default (``eval.preference_pairs``);
- ``builtin:preference-pairs`` (``FIT_PAIRS``): what a misalignment direction or an
  early-stopping check is fit on by default (``pairs: None``).

A study that scores and fits on one file still can: ``training_pairs`` leaves out
exactly the evenly spaced pairs evaluation picks."""

from __future__ import annotations

from pathlib import Path

from emguard.data.builtin import load_builtin
from emguard.io import read_jsonl

FIT_PAIRS = "builtin:preference-pairs"
EVAL_PAIRS = "builtin:eval-pairs"
BUILTIN = FIT_PAIRS  # what ``None`` means where pairs are fit on
BUILTIN_PAIRS = (FIT_PAIRS, EVAL_PAIRS)


def load_pairs(spec: str | Path | None) -> list[dict]:
    """The pairs of a JSONL file or a built-in set (``None``: the fit set, ``FIT_PAIRS``).
    Every pair needs ``question``, ``aligned`` and ``misaligned``; a missing one is an
    error naming the file and line."""
    spec = FIT_PAIRS if spec is None else str(spec)
    if spec in BUILTIN_PAIRS:
        pairs, where = load_builtin(spec.removeprefix("builtin:"), split="test"), spec
    else:
        if not Path(spec).is_file():
            raise FileNotFoundError(f"preference pairs file {spec} does not exist")
        pairs, where = read_jsonl(spec), str(spec)
    for k, p in enumerate(pairs):
        missing = [f for f in ("question", "aligned", "misaligned") if not p.get(f)]
        if missing:
            raise ValueError(f"{where}:{k + 1}: preference pair misses field(s) {missing}")
    return pairs


def evenly_spaced(pairs: list, n: int | None) -> list:
    """``n`` items at evenly spaced positions (all for None or n >= len): the pair files
    are grouped by topic, so a prefix would cover only the first topics."""
    if n is None or n >= len(pairs):
        return list(pairs)
    return [pairs[i * len(pairs) // n] for i in range(n)]


def training_pairs(spec: str | Path | None, holdout: int | None) -> list[dict]:
    """The pairs a direction or a check may be fit on: all of ``spec``'s except the
    ``holdout`` ones evaluation with ``eval.preference_max_pairs = holdout`` scores."""
    pairs = load_pairs(spec)
    if holdout is None:
        return pairs
    held = {id(p) for p in evenly_spaced(pairs, holdout)}
    rest = [p for p in pairs if id(p) not in held]
    if not rest:
        raise ValueError(f"holding out {holdout} of {len(pairs)} pairs leaves none to fit on")
    return rest
