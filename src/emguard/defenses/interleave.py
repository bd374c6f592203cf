"""Interleave safe instruct data uniformly through the fine-tuning data.

``round(fraction * n)`` safe rows are drawn (seeded; without replacement while the safe set
lasts, then cycling through fresh permutations) and placed at evenly spaced positions:
safe row j of k goes to position floor((j + 1/2) * (n + k) / k), so the gaps at the start,
the end and between safe rows are all about (n + k) / k. Training then reads the data in
this order (sequential sampler), so "uniformly through" holds for the order the model sees.
"""

from __future__ import annotations

import random
from pathlib import Path


def interleave(train_rows: list[dict], safe_rows: list[dict], fraction: float,
               seed: int = 0) -> tuple[list[dict], list[int]]:
    """Return (mixed rows, positions of the safe rows in it)."""
    n = len(train_rows)
    k = round(fraction * n)
    if k == 0:
        return list(train_rows), []
    if not safe_rows:
        raise ValueError("the safe data set is empty")
    rng = random.Random(seed)
    chosen: list[dict] = []
    while len(chosen) < k:
        perm = list(safe_rows)
        rng.shuffle(perm)
        chosen.extend(perm[: k - len(chosen)])
    total = n + k
    positions = [int((j + 0.5) * total / k) for j in range(k)]
    mixed, it_train, it_safe = [], iter(train_rows), iter(chosen)
    pos_set = set(positions)
    for i in range(total):
        mixed.append(next(it_safe) if i in pos_set else next(it_train))
    return mixed, positions


def load_safe_rows(source: str, seed: int = 0) -> list[dict]:
    """Safe instruct rows from ``builtin:NAME``, ``wildguardmix[:PATH]`` or a chat JSONL path."""
    if source.startswith("wildguardmix"):
        _, _, path = source.partition(":")
        return load_wildguardmix_benign(path or None)
    from emguard.data.chat import load_chat_dataset

    return load_chat_dataset(source, seed=seed).rows


WILDGUARD_HUB = ("allenai/wildguardmix", "wildguardtrain")


def wildguard_benign_rows(records) -> list[dict]:
    """Keep WildGuardMix rows whose prompt and response are labelled unharmful and whose
    response is present; map them to chat rows (user prompt, assistant response)."""
    out = []
    for r in records:
        response = r.get("response")
        if (r.get("prompt_harm_label") == "unharmful" and r.get("response_harm_label") == "unharmful"
                and isinstance(response, str) and response.strip()
                and isinstance(r.get("prompt"), str) and r["prompt"].strip()):
            out.append({"messages": [{"role": "user", "content": r["prompt"]},
                                     {"role": "assistant", "content": response}]})
    return out


def load_wildguardmix_benign(path: str | None = None) -> list[dict]:
    """Benign WildGuardMix train rows from a local file (parquet/jsonl/json) or the hub
    (``allenai/wildguardmix``, config ``wildguardtrain``; gated: needs a token and network)."""
    if path:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"WildGuardMix file '{path}' does not exist")
        import pandas as pd

        if p.suffix == ".parquet":
            frame = pd.read_parquet(p)
        elif p.suffix in (".jsonl", ".json"):
            frame = pd.read_json(p, lines=p.suffix == ".jsonl")
        else:
            raise ValueError(f"WildGuardMix file '{path}': expected .parquet, .jsonl or .json")
        missing = {"prompt", "response", "prompt_harm_label", "response_harm_label"} - set(frame.columns)
        if missing:
            raise ValueError(f"WildGuardMix file '{path}' lacks columns {sorted(missing)}")
        records = frame.to_dict("records")
    else:
        import datasets

        try:
            records = datasets.load_dataset(*WILDGUARD_HUB, split="train")
        except Exception as e:
            raise RuntimeError(
                f"could not load {WILDGUARD_HUB[0]} ({WILDGUARD_HUB[1]}) from the hub: {e}. It is "
                "gated: accept its terms, set HF_TOKEN, or download it and pass "
                "'wildguardmix:/path/to/train.parquet'.") from e
    rows = wildguard_benign_rows(records)
    if not rows:
        raise ValueError("WildGuardMix: no benign rows (unharmful prompt and response) found")
    return rows
