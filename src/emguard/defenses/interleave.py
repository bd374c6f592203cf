"""Interleave safe instruct data uniformly through the fine-tuning data.

``round(fraction * n)`` safe rows are drawn (seeded; without replacement while the safe set
lasts, then cycling through fresh permutations) and placed at evenly spaced positions:
safe row j of k goes to position floor((j + 1/2) * (n + k) / k), so the gaps at the start,
the end and between safe rows are all about (n + k) / k. Training then reads the data in
this order (sequential sampler), so "uniformly through" holds for the order the model sees.

Safe rows keep their provenance (``_source`` and ``_line``/``_row``, see
``emguard.data.chat``), so an error about one names the safe source's file and line, not
the training file's. Problems with the safe source are ChatDataError naming it.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

from pydantic import Field

from emguard.data.chat import ChatDataError, load_chat_dataset
from emguard.defenses.base import Defense, RunContext
from emguard.settings import ConfigError, Settings


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
    """Safe instruct rows from ``builtin:NAME``, ``wildguardmix[:PATH]`` or a chat JSONL path;
    an empty set is an error naming the source."""
    if source.startswith("wildguardmix"):
        _, _, path = source.partition(":")
        return load_wildguardmix_benign(path or None)
    rows = load_chat_dataset(source, seed=seed).rows
    if not rows:
        raise ChatDataError(f"{source}: the safe data set for interleaving has no rows")
    return rows


WILDGUARD_HUB = ("allenai/wildguardmix", "wildguardtrain")


def wildguard_benign_rows(records, source: str | None = None) -> list[dict]:
    """Keep WildGuardMix rows whose prompt and response are labelled unharmful and whose
    response is present; map them to chat rows (user prompt, assistant response). With
    ``source`` each row records it and its record index (``_source``, ``_row``)."""
    out = []
    for i, r in enumerate(records):
        response = r.get("response")
        if (r.get("prompt_harm_label") == "unharmful" and r.get("response_harm_label") == "unharmful"
                and isinstance(response, str) and response.strip()
                and isinstance(r.get("prompt"), str) and r["prompt"].strip()):
            row = {"messages": [{"role": "user", "content": r["prompt"]},
                                {"role": "assistant", "content": response}]}
            out.append(row if source is None else {**row, "_source": source, "_row": i})
    return out


def load_wildguardmix_benign(path: str | None = None) -> list[dict]:
    """Benign WildGuardMix train rows from a local file (parquet/jsonl/json) or the hub
    (``allenai/wildguardmix``, config ``wildguardtrain``; gated: needs a token and network).
    Every problem is a ChatDataError naming the file (or the hub set)."""
    if path:
        records = _read_wildguardmix_file(Path(path))
        source = path
    else:
        import datasets

        source = f"hf:{WILDGUARD_HUB[0]}"
        try:
            records = datasets.load_dataset(*WILDGUARD_HUB, split="train")
        except Exception as e:  # datasets raises many types (network, gated, missing config)
            raise ChatDataError(
                f"could not load {WILDGUARD_HUB[0]} ({WILDGUARD_HUB[1]}) from the hub: {e}. It is "
                "gated: accept its terms, set HF_TOKEN, or download it and pass "
                "'wildguardmix:/path/to/train.parquet'.") from e
    rows = wildguard_benign_rows(records, source)
    if not rows:
        raise ChatDataError(f"WildGuardMix {source}: no benign rows (unharmful prompt and "
                            "response) found")
    return rows


def _read_wildguardmix_file(p: Path) -> list[dict]:
    if not p.is_file():
        raise ChatDataError(f"WildGuardMix file '{p}' does not exist")
    if p.suffix not in (".parquet", ".jsonl", ".json"):
        raise ChatDataError(f"WildGuardMix file '{p}': expected .parquet, .jsonl or .json")
    import pandas as pd

    try:
        frame = (pd.read_parquet(p) if p.suffix == ".parquet"
                 else pd.read_json(p, lines=p.suffix == ".jsonl"))
    except (ValueError, OSError, UnicodeDecodeError) as e:  # pyarrow's errors are ValueErrors
        raise ChatDataError(f"WildGuardMix file '{p}' cannot be read as {p.suffix[1:]} "
                            f"({type(e).__name__}: {e})") from None
    missing = {"prompt", "response", "prompt_harm_label", "response_harm_label"} - set(frame.columns)
    if missing:
        raise ChatDataError(f"WildGuardMix file '{p}' lacks columns {sorted(missing)}")
    return frame.to_dict("records")


def local_source_file(source: str) -> str | None:
    """The local file a safe source reads, or None (built-in, hub, WildGuardMix from the hub)."""
    if source.startswith(("builtin:", "hf:")) or source == "wildguardmix":
        return None
    return source.removeprefix("wildguardmix:")


class InterleaveSettings(Settings):
    """Mix safe instruct data uniformly through the fine-tuning data."""

    fraction: float = Field(0.05, gt=0, le=10)  # safe rows = round(fraction * n_train)
    source: str = "builtin:safe-instruct"  # builtin:NAME, chat JSONL path, or wildguardmix[:PATH]


class Interleave(Defense):
    """Row transform: safe instruct rows placed evenly through the training rows."""

    settings_model = InterleaveSettings

    name = "interleave"
    identity_when_off = True

    def check(self, cfg) -> None:
        """A local safe source exists (ConfigError naming the field)."""
        local = local_source_file(self.settings.source)
        if local is not None and not Path(local).expanduser().is_file():
            raise ConfigError(f"defenses.interleave.source: '{local}' does not exist")

    def transform_rows(self, rows: list[dict], ctx: RunContext) -> list[dict]:
        s, seed = self.settings, ctx.cfg.train.seed
        if s.source.startswith("builtin:"):
            warnings.warn(f"defenses.interleave.source={s.source} is the project's small "
                          "stand-in; the paper interleaves WildGuardMix benign rows "
                          "(source: wildguardmix:PATH) and results may differ", stacklevel=2)
        n_task = len(rows)
        rows, positions = interleave(rows, load_safe_rows(s.source, seed=seed), s.fraction, seed=seed)
        if s.fraction > 1:
            warnings.warn(f"defenses.interleave.fraction={s.fraction} adds {len(positions)} safe "
                          f"rows to {n_task} task rows, so safe data outnumbers the task (the "
                          "paper's largest fraction is 0.5)", stacklevel=2)
        ctx.report["interleave"] = {"source": s.source, "fraction": s.fraction,
                                    "safe_rows": len(positions), "positions": positions}
        return rows
