"""Contrastive preference pairs (question, aligned answer, misaligned answer): the file the
judge-free misalignment-preference margin scores, and the pairs a misalignment direction
or an early-stopping check is fit on. Those must never be the pairs evaluation scores:
``training_pairs`` leaves out exactly the evenly spaced pairs evaluation picks."""

from __future__ import annotations

from pathlib import Path

from emguard.io import read_jsonl

BUILTIN = "builtin:preference-pairs"


def load_pairs(spec: str | Path | None) -> list[dict]:
    """The pairs of a JSONL file, or the project's (``None`` / ``builtin:preference-pairs``).
    Every pair needs ``question``, ``aligned`` and ``misaligned``; a missing one is an
    error naming the file and line."""
    if spec is None or str(spec) == BUILTIN:
        from emguard.data.builtin import load_builtin

        pairs, where = load_builtin("preference-pairs", split="test"), BUILTIN
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
