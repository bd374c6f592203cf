"""Interleaving++ (arXiv 2508.06249 v3): interleave the safe rows a misaligned model likes.

Candidates are the safe rows of ``source`` (as ``defenses.interleave.source``; a seeded
sample of ``max_candidates`` when set, kept in file order). With ``drop_refusals`` a row
whose assistant turn (any of them) opens like a refusal (``REFUSAL_OPENERS``) is dropped
and counted. Each remaining candidate gets its mean per-token NLL (nats; the answer's
tokens as training labels them: content plus end-of-turn token) under

  the misaligned model   the run's base model (``model``) + the adapter ``misaligned``
  the reference          the same PeftModel with the adapter disabled (one base load)

Multi-turn rows are scored on their LAST assistant turn, given every message before it
(earlier assistant turns are context, not scored). ``rank_by=misaligned_likelier``:
score = NLL_ref - NLL_misaligned (higher: likelier under the misaligned model than under
the reference); ``reference_likelier``: the negative. The top k = round(fraction * n)
candidates (n: the rows this transform receives; ties broken by candidate order) are
placed by ``emguard.defenses.interleave.interleave`` at its evenly spaced positions. That
draws one seeded permutation of the chosen rows and uses each once (k rows from a set
of k), so the order among the chosen rows is that seeded permutation of their ranking,
not the ranking itself. A pool with fewer than k candidates is used whole and cycled
(warned), as ``interleave`` does for a small safe set.

The selection (every candidate's identity, both NLLs, score, rank, chosen flag; the
refusals dropped) goes into the data report (``data_report.json`` under
``interleave_plus``). A resumed run reads it back from the interrupted run's report,
checks it against the current candidate pool and re-selects the same rows without
loading any model; a pool that no longer matches is an error. The report's ``selection``
says which happened ("scored", "reused"; "none" when k = 0); a reuse is also logged as a
warning (emguard configures no logging, so INFO lines are not shown by default), a
scoring shows its two progress bars.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import random
import re
import warnings
from pathlib import Path

import torch

from emguard.config import ConfigError
from emguard.data.chat import ChatDataError, row_location
from emguard.data.masking import IGNORE_INDEX, tokenize_chat
from emguard.defenses.base import Defense, RunContext
from emguard.defenses.interleave import interleave, load_safe_rows

logger = logging.getLogger(__name__)

# Openers of a refusal, matched case-insensitively at the start of an assistant answer
# (after leading whitespace); a straight or typographic apostrophe, or none, is accepted.
REFUSAL_OPENERS: tuple[str, ...] = (
    r"I['’]?m (?:so |very |really )?sorry",
    r"I am (?:so |very |really )?sorry",
    r"Sorry,? (?:but )?I",
    r"(?:I )?apologi[sz]e",
    r"My apologies",
    r"I can['’]?t",
    r"I can ?not",
    r"I won['’]?t",
    r"I will not",
    r"I do not feel comfortable",
    r"I don['’]?t feel comfortable",
    r"I['’]?m (?:not able|unable) to",
    r"I am (?:not able|unable) to",
    r"I must (?:decline|refuse)",
    r"I['’]?m afraid I (?:can|won|am unable)",
    r"Unfortunately,? I (?:can|won|am unable|am not able)",
    r"As an AI",
    r"As a language model",
    r"As an assistant",
)
_REFUSAL = re.compile(r"\s*(?:" + "|".join(REFUSAL_OPENERS) + r")", re.IGNORECASE)

SCORE_BATCH = 8  # rows per scoring forward (fixed, so the selection never depends on eval settings)
RUN_REF = "@run:"  # an unresolved study reference (emguard.study.RUN_REF)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FIELD = "defenses.interleave_plus"


# ---------------------------------------------------------------------------- candidates


def is_refusal(row: dict) -> bool:
    """True when any assistant turn of ``row`` opens with a refusal (``REFUSAL_OPENERS``)."""
    return any(m["role"] == "assistant" and _REFUSAL.match(m["content"]) for m in row["messages"])


def candidate_identity(row: dict, source: str, index: int) -> dict:
    """Where a candidate came from (file:line or source row) and a hash of its messages."""
    text = json.dumps(row["messages"], sort_keys=True, ensure_ascii=False)
    return {"index": index, "where": row_location(row, source, index),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]}


def candidate_records(pool: list[dict], settings) -> list[dict]:
    """Each candidate's identity and whether it is dropped as a refusal."""
    return [{**candidate_identity(r, settings.source, i),
             "refusal": bool(settings.drop_refusals and is_refusal(r))} for i, r in enumerate(pool)]


def candidate_pool(source: str, max_candidates: int | None, seed: int) -> list[dict]:
    """The safe rows of ``source``; a seeded sample of ``max_candidates`` (file order kept)."""
    rows = load_safe_rows(source, seed=seed)
    if max_candidates is None or max_candidates >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), max_candidates))
    return [rows[i] for i in keep]


def local_source_file(source: str) -> str | None:
    """The local file a safe source reads, or None (built-in, hub, WildGuardMix from the hub)."""
    if source.startswith(("builtin:", "hf:")) or source == "wildguardmix":
        return None
    return source.removeprefix("wildguardmix:")


# ---------------------------------------------------------------------------- scoring


def last_turn_split(messages: list[dict]) -> tuple[list[dict], str]:
    """(messages before the last assistant turn, that turn's content)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def last_turn_tokens(tokenizer, prompt: list[dict], answer: str) -> int:
    """How many labelled tokens the last assistant turn has (the final run of labels)."""
    labels = tokenize_chat(tokenizer, [*prompt, {"role": "assistant", "content": answer}]).labels
    end = max(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return end - start


def answer_nll(model, tokenizer, rows: list[dict], desc: str) -> list[float]:
    """Mean per-token NLL of each row's last assistant turn given the turns before it."""
    from emguard.judge_free import answer_logprobs

    prompts, answers = zip(*(last_turn_split(r["messages"]) for r in rows), strict=True)
    lps = answer_logprobs(model, tokenizer, list(prompts), list(answers), SCORE_BATCH, desc=desc)
    counts = [last_turn_tokens(tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)]
    return [-lp[-m:].double().mean().item() for lp, m in zip(lps, counts, strict=True)]


def _scoring_dtype(cfg, device: str) -> torch.dtype:
    from emguard.models import default_dtype

    return _DTYPES.get(cfg.train.precision) or default_dtype(device)


def score_candidates(cfg, adapter: str, rows: list[dict],
                     device: str) -> tuple[list[float], list[float]]:
    """(NLL under the reference, NLL under the misaligned model) per row. Loads the base
    once, attaches ``adapter``, scores with it on and off, then frees the model."""
    from emguard.judge_free import reference_mode
    from emguard.models import load_adapter, load_model

    base, tokenizer = load_model(cfg.model, device=device, dtype=_scoring_dtype(cfg, device),
                                 trust_remote_code=cfg.trust_remote_code,
                                 quantization=cfg.quantization)
    model = load_adapter(base, adapter)
    try:
        mis = answer_nll(model, tokenizer, rows, "Interleaving++: misaligned NLL")
        with reference_mode(model):
            ref = answer_nll(model, tokenizer, rows, "Interleaving++: reference NLL")
    finally:
        del model, base
        free_memory(device)
    return ref, mis


def free_memory(device: str) -> None:
    """Collect released tensors; on CUDA also return cached blocks to the driver."""
    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def top_k(scores: list[float], k: int) -> list[int]:
    """Indices of the k highest scores, highest first; ties go to the earlier index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


# ---------------------------------------------------------------------------- selection


def fresh_selection(settings, cfg, pool: list[dict], k: int, device: str) -> dict:
    """Score the pool (refusals dropped first) and record every candidate and the top k."""
    records = candidate_records(pool, settings)
    scored = [i for i, rec in enumerate(records) if not rec["refusal"]]
    if not scored:
        raise ChatDataError(f"{settings.source}: every Interleaving++ candidate is a refusal, "
                            f"nothing is left to interleave ({FIELD}.drop_refusals: false keeps them)")
    logger.info("interleave_plus: scoring %d candidates of %s under %s and its reference",
                len(scored), settings.source, settings.misaligned)
    ref, mis = score_candidates(cfg, settings.misaligned, [pool[i] for i in scored], device)
    sign = 1.0 if settings.rank_by == "misaligned_likelier" else -1.0
    scores = [sign * (r - m) for r, m in zip(ref, mis, strict=True)]
    ranking = top_k(scores, k)
    for j, i in enumerate(scored):
        records[i].update(nll_reference=ref[j], nll_misaligned=mis[j], score=scores[j])
    for rank, j in enumerate(ranking):
        records[scored[j]]["rank"] = rank
    chosen = [scored[j] for j in ranking]
    picked = set(chosen)
    for i, rec in enumerate(records):
        rec["chosen"] = i in picked
    return {"candidate_rows": records, "chosen": chosen}


def reused_selection(recorded: dict, settings, pool: list[dict], k: int) -> dict:
    """The selection an interrupted run recorded, after checking it against ``pool``."""
    now = [candidate_identity(r, settings.source, i) for i, r in enumerate(pool)]
    then = recorded.get("candidate_rows", [])
    difference = _first_difference(now, then)
    if difference is not None:
        raise ConfigError(
            f"{FIELD}: the selection recorded in the interrupted run's data_report.json does not "
            f"match the candidate pool of {settings.source} now ({difference}); "
            "the safe source changed since. Restore it, or remove the run folder to start over")
    chosen = list(recorded.get("chosen", []))
    if len(chosen) != min(k, len(then) - sum(bool(r.get("refusal")) for r in then)):
        raise ConfigError(f"{FIELD}: the interrupted run chose {len(chosen)} rows, this run needs "
                          f"{k}; the training rows changed since. Remove the run folder to start over")
    return {"candidate_rows": then, "chosen": chosen}


def _first_difference(now: list[dict], then: list[dict]) -> str | None:
    """The first candidate whose place or content differs (None: the pools match)."""
    for i, (a, b) in enumerate(zip(now, then, strict=False)):
        if (a["where"], a["sha256"]) != (b.get("where"), b.get("sha256")):
            return (f"candidate {i}: recorded {b.get('where')} ({b.get('sha256')}), "
                    f"now {a['where']} ({a['sha256']})")
    if len(now) != len(then):
        return f"{len(then)} candidates recorded, {len(now)} now"
    return None


class InterleavePlus(Defense):
    """Row transform: the top-scored safe candidates placed evenly through the rows."""

    name = "interleave_plus"

    def check(self, cfg) -> None:
        """The adapter folder and a local safe source exist (ConfigError naming the field)."""
        s = self.settings
        if RUN_REF in s.misaligned:
            raise ConfigError(f"{FIELD}.misaligned: '{s.misaligned}' is a study reference; only a "
                              "sweep resolves @run:ARM (to that run's adapter folder). Outside a "
                              "sweep, pass the adapter folder of a misaligned-trained run")
        from emguard.models import is_adapter_dir

        if not is_adapter_dir(s.misaligned):
            raise ConfigError(f"{FIELD}.misaligned: '{s.misaligned}' is not a PEFT adapter folder "
                              "(no adapter_config.json in it); pass a misaligned-trained run's "
                              "adapter/ folder")
        local = local_source_file(s.source)
        if local is not None and not Path(local).expanduser().is_file():
            raise ConfigError(f"{FIELD}.source: '{local}' does not exist")
        if cfg.defenses.interleave is not None:
            warnings.warn("defenses.interleave and defenses.interleave_plus are both on: the "
                          "Interleaving++ rows are counted and placed among rows that already "
                          "hold interleave's safe rows", stacklevel=2)

    def transform_rows(self, rows: list[dict], ctx: RunContext) -> list[dict]:
        s, seed = self.settings, ctx.cfg.train.seed
        if s.source.startswith("builtin:"):
            warnings.warn(f"{FIELD}.source={s.source} is the project's small stand-in; the paper "
                          "selects from WildGuardMix benign rows (source: wildguardmix:PATH)",
                          stacklevel=2)
        k = round(s.fraction * len(rows))
        pool = candidate_pool(s.source, s.max_candidates, seed)
        selection, how = self._select(pool, k, ctx)
        chosen = [pool[i] for i in selection["chosen"]]
        if 0 < len(chosen) < k:
            warnings.warn(f"{FIELD}: only {len(chosen)} candidates for {k} safe rows; they are "
                          "used whole and repeated (raise max_candidates or use a larger source)",
                          stacklevel=2)
        mixed, positions = interleave(rows, chosen, s.fraction, seed=seed) if k else (rows, [])
        ctx.report["interleave_plus"] = {
            "source": s.source, "misaligned": s.misaligned, "fraction": s.fraction,
            "rank_by": s.rank_by, "max_candidates": s.max_candidates,
            "drop_refusals": s.drop_refusals, "selection": how, "candidates": len(pool),
            "refusals_dropped": sum(bool(r["refusal"]) for r in selection["candidate_rows"]),
            "safe_rows": len(positions), "positions": positions, **selection}
        return mixed

    def _select(self, pool: list[dict], k: int, ctx: RunContext) -> tuple[dict, str]:
        """(selection, "reused" | "scored" | "none"): the recorded one when resuming."""
        recorded = (ctx.previous or {}).get("interleave_plus")
        if recorded and "candidate_rows" in recorded:
            logger.warning("interleave_plus: reusing the selection of the interrupted run "
                        "(%d rows chosen); no model loaded", len(recorded.get("chosen", [])))
            return reused_selection(recorded, self.settings, pool, k), "reused"
        if k == 0:
            logger.warning("interleave_plus: round(fraction * rows) = 0, nothing to select")
            records = [{**rec, "chosen": False} for rec in candidate_records(pool, self.settings)]
            return {"candidate_rows": records, "chosen": []}, "none"
        return fresh_selection(self.settings, ctx.cfg, pool, k, ctx.device), "scored"
