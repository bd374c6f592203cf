"""Interleaving++ (arXiv 2508.06249 v3): interleave the safe rows misaligned models find hardest.

The rule follows two independent secondary descriptions of arXiv 2508.06249 v3 (the paper's
text itself was not available here), not the paper's code. Candidates are the safe rows of
``source`` (as ``defenses.interleave.source``; a seeded sample of ``max_candidates`` when
set, kept in file order). Each candidate's LAST assistant turn, given every message before
it, gets its mean per-token NLL (nats; the answer's tokens as training labels them: content
plus end-of-turn token) under

  the aligned model        the run's base model (``model``) with every adapter disabled
  misaligned model j       the same base + adapter ``misaligned[j]``, j = 1..K (K >= 1;
                           one PeftModel, the base loaded once)

and the score (``rank_by: published``, the default; unitless, EPSILON = 1e-6 nats)

  s = (1/K) sum_j (NLL_mis_j - NLL_aligned) / (NLL_aligned + EPSILON)

Every candidate is ranked by s, HIGHEST first (ties: candidate order): the rows the
misaligned models find hardest relative to the aligned model. Then, with ``drop_refusals``,
a row whose assistant turn (any of them) opens like a refusal (``REFUSAL_OPENERS``, matched
on the answer's first words) is removed from that ranking, and the top k = round(fraction *
n) of what is left are kept (n: the rows this transform receives). Refusals are filtered
AFTER ranking so the paper's remark that its top-scoring rows are dominated by refusals can
be read off the report (``refusals_in_top_k``: refusals among the top k before the filter).
Not the published rule, kept for comparison: ``misaligned_likelier`` (s = mean_j NLL_aligned
- NLL_mis_j, the rule before issue 21: rows the misaligned models find EASIER) and
``reference_likelier`` (its negative, unnormalised).

The kept rows are placed by ``emguard.defenses.interleave.interleave`` at its evenly spaced
positions. That draws one seeded permutation of the chosen rows and uses each once (k rows
from a set of k), so the order among the chosen rows is that seeded permutation of their
ranking, not the ranking itself. A pool with fewer than k eligible candidates is used whole
and cycled (warned), as ``interleave`` does for a small safe set; k < MIN_SAFE_ROWS is
warned (so few safe rows barely train on safe data).

The selection goes into the data report (``data_report.json`` under ``interleave_plus``):
per candidate its identity, refusal flag, ``nll_reference`` (aligned), ``nll_misaligned``
(one per source, in ``misaligned`` order), ``score``, ``rank`` among all candidates (0:
highest) and ``chosen``. A resumed run reads it back from the interrupted run's report,
checks it against the current candidate pool, sources and rule, and re-selects the same rows
without loading any model; a mismatch is an error. The report's ``selection`` says which
happened ("scored", "reused"; "none" when k = 0); a reuse is also logged as a warning
(emguard configures no logging, so INFO lines are not shown by default), a scoring shows a
progress bar per model.
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
from typing import Literal

import torch
from pydantic import Field, field_validator

from emguard import models
from emguard.data.chat import ChatDataError, row_location
from emguard.data.masking import IGNORE_INDEX, tokenize_chat
from emguard.defenses.base import Defense, RunContext
from emguard.defenses.interleave import interleave, load_safe_rows, local_source_file
from emguard.judge_free import answer_logprobs, reference_mode
from emguard.models import (
    ModelLoadError,
    adapter_mismatch_message,
    check_adapter_dir,
    default_dtype,
    is_adapter_dir,
)
from emguard.settings import ConfigError, Int, Settings

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
EPSILON = 1e-6  # nats: keeps the published score finite when the aligned NLL is 0
MIN_SAFE_ROWS = 4  # fewer chosen rows than this is warned: the run barely sees safe data


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
    """Each candidate's identity and whether it opens like a refusal (dropped or not)."""
    return [{**candidate_identity(r, settings.source, i), "refusal": is_refusal(r)}
            for i, r in enumerate(pool)]


def eligible(records: list[dict], drop_refusals: bool) -> list[int]:
    """Indices of the candidates that may be chosen (refusals out with ``drop_refusals``)."""
    return [i for i, rec in enumerate(records) if not (drop_refusals and rec.get("refusal"))]


def candidate_pool(source: str, max_candidates: int | None, seed: int) -> list[dict]:
    """The safe rows of ``source``; a seeded sample of ``max_candidates`` (file order kept)."""
    rows = load_safe_rows(source, seed=seed)
    if max_candidates is None or max_candidates >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), max_candidates))
    return [rows[i] for i in keep]


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
    prompts, answers = zip(*(last_turn_split(r["messages"]) for r in rows), strict=True)
    lps = answer_logprobs(model, tokenizer, list(prompts), list(answers), SCORE_BATCH, desc=desc)
    counts = [last_turn_tokens(tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)]
    return [-lp[-m:].double().mean().item() for lp, m in zip(lps, counts, strict=True)]


def _scoring_dtype(cfg, device: str) -> torch.dtype:
    return _DTYPES.get(cfg.train.precision) or default_dtype(device)


def score_candidates(cfg, adapters: list[str], rows: list[dict],
                     device: str) -> tuple[list[float], list[list[float]]]:
    """(aligned NLL per row, [NLL under misaligned model j for j < K] per row), nats/token.

    Loads the base once, attaches the K adapters to one PeftModel, scores with every adapter
    disabled (aligned) and with each one active in turn, then frees the model."""
    # models.load_*, looked up when called (as the import inside this function did)
    base, tokenizer = models.load_model(cfg.model, device=device,
                                        dtype=_scoring_dtype(cfg, device),
                                        trust_remote_code=cfg.trust_remote_code,
                                        quantization=cfg.quantization)
    model = models.load_adapter(base, adapters[0])
    try:
        with reference_mode(model):
            ref = answer_nll(model, tokenizer, rows, "Interleaving++: aligned NLL")
        per_source = []
        for j, adapter in enumerate(adapters):
            if j:
                _switch_adapter(model, adapter, f"misaligned_{j}")
            per_source.append(answer_nll(model, tokenizer, rows,
                                         f"Interleaving++: misaligned NLL {j + 1}/{len(adapters)}"))
    finally:
        del model, base
        free_memory(device)
    return ref, [list(nlls) for nlls in zip(*per_source, strict=True)]


def _switch_adapter(model, adapter: str, name: str) -> None:
    """Load ``adapter`` into the PeftModel as ``name`` and make it the only active one."""
    check_adapter_dir(adapter)
    try:
        model.load_adapter(str(adapter), adapter_name=name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ModelLoadError(adapter_mismatch_message(model, Path(adapter), e)) from None
    model.set_adapter(name)
    model.eval()


def free_memory(device: str) -> None:
    """Collect released tensors; on CUDA also return cached blocks to the driver."""
    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def published_score(nll_aligned: float, nll_misaligned: list[float]) -> float:
    """mean_j (NLL_mis_j - NLL_aligned) / (NLL_aligned + EPSILON): unitless, NLLs in nats
    per token; high = the misaligned models find the row hard relative to the aligned one."""
    terms = [(m - nll_aligned) / (nll_aligned + EPSILON) for m in nll_misaligned]
    return sum(terms) / len(terms)


def misaligned_likelier_score(nll_aligned: float, nll_misaligned: list[float]) -> float:
    """mean_j (NLL_aligned - NLL_mis_j), nats/token (NOT the published rule)."""
    return sum(nll_aligned - m for m in nll_misaligned) / len(nll_misaligned)


def reference_likelier_score(nll_aligned: float, nll_misaligned: list[float]) -> float:
    """mean_j (NLL_mis_j - NLL_aligned), nats/token (NOT the published rule)."""
    return -misaligned_likelier_score(nll_aligned, nll_misaligned)


SCORES = {"published": published_score, "misaligned_likelier": misaligned_likelier_score,
          "reference_likelier": reference_likelier_score}


def ranking(scores: list[float]) -> list[int]:
    """Every index, highest score first; ties go to the earlier index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def refusals_in_top(records: list[dict], k: int) -> int:
    """How many of the k best-ranked candidates (before the refusal filter) are refusals."""
    return sum(bool(rec.get("refusal")) and rec.get("rank", k) < k for rec in records)


# ---------------------------------------------------------------------------- selection


def fresh_selection(settings, cfg, pool: list[dict], k: int, device: str) -> dict:
    """Score and rank every candidate, then keep the k best that survive the refusal filter."""
    records = candidate_records(pool, settings)
    allowed = set(eligible(records, settings.drop_refusals))
    if not allowed:
        raise ChatDataError(f"{settings.source}: every Interleaving++ candidate is a refusal, "
                            f"nothing is left to interleave ({FIELD}.drop_refusals: false keeps them)")
    logger.info("interleave_plus: scoring %d candidates of %s under %d misaligned models and "
                "the aligned one", len(pool), settings.source, len(settings.sources))
    ref, mis = score_candidates(cfg, settings.sources, pool, device)
    score = SCORES[settings.rank_by]
    scores = [score(r, m) for r, m in zip(ref, mis, strict=True)]
    order = ranking(scores)
    for rank, i in enumerate(order):
        records[i].update(nll_reference=ref[i], nll_misaligned=mis[i], score=scores[i], rank=rank)
    chosen = [i for i in order if i in allowed][:k]
    picked = set(chosen)
    for i, rec in enumerate(records):
        rec["chosen"] = i in picked
    return {"candidate_rows": records, "chosen": chosen}


def reused_selection(recorded: dict, settings, pool: list[dict], k: int) -> dict:
    """The selection an interrupted run recorded, after checking it against ``pool``, the
    sources and the rule of this run."""
    now = [candidate_identity(r, settings.source, i) for i, r in enumerate(pool)]
    then = recorded.get("candidate_rows", [])
    difference = _first_difference(now, then)
    if difference is not None:
        raise ConfigError(
            f"{FIELD}: the selection recorded in the interrupted run's data_report.json does not "
            f"match the candidate pool of {settings.source} now ({difference}); "
            "the safe source changed since. Restore it, or remove the run folder to start over")
    _check_recorded_rule(recorded, settings)
    chosen = list(recorded.get("chosen", []))
    if len(chosen) != min(k, len(eligible(then, settings.drop_refusals))):
        raise ConfigError(f"{FIELD}: the interrupted run chose {len(chosen)} rows, this run needs "
                          f"{k}; the training rows changed since. Remove the run folder to start over")
    return {"candidate_rows": then, "chosen": chosen}


def _check_recorded_rule(recorded: dict, settings) -> None:
    """ConfigError unless the recorded sources (in order) and ``rank_by`` are this run's."""
    then = recorded.get("misaligned")
    then = [then] if isinstance(then, str) else list(then or [])
    if then != settings.sources:
        raise ConfigError(f"{FIELD}.misaligned: the interrupted run scored its candidates under "
                          f"{then}, this run names {settings.sources}. Remove the run folder "
                          "to start over")
    if recorded.get("rank_by") != settings.rank_by:
        raise ConfigError(f"{FIELD}.rank_by: the interrupted run ranked by "
                          f"{recorded.get('rank_by')!r}, this run by {settings.rank_by!r}. "
                          "Remove the run folder to start over")


def _first_difference(now: list[dict], then: list[dict]) -> str | None:
    """The first candidate whose place or content differs (None: the pools match)."""
    for i, (a, b) in enumerate(zip(now, then, strict=False)):
        if (a["where"], a["sha256"]) != (b.get("where"), b.get("sha256")):
            return (f"candidate {i}: recorded {b.get('where')} ({b.get('sha256')}), "
                    f"now {a['where']} ({a['sha256']})")
    if len(now) != len(then):
        return f"{len(then)} candidates recorded, {len(now)} now"
    return None


class InterleavePlusSettings(Settings):
    """Interleaving++ (arXiv 2508.06249 v3, as two secondary descriptions state it): keep the
    safe rows that misaligned models find hardest relative to the aligned model (highest
    mean_j (NLL_mis_j - NLL_aligned) / (NLL_aligned + eps)), refusals dropped after ranking."""

    # adapter folder(s) of misaligned-trained runs, one or a list of K >= 1 (in a study:
    # @run:misaligned); each is scored as the run's base model + that adapter
    misaligned: str | list[str]
    fraction: float = Field(0.05, gt=0, le=10)  # safe rows = round(fraction * n_train)
    source: str = "builtin:safe-instruct"  # candidate pool, as interleave.source
    max_candidates: Int | None = Field(None, gt=0)  # score at most this many (seeded sample)
    drop_refusals: bool = True
    # published: mean_j (NLL_mis_j - NLL_ref) / (NLL_ref + eps), highest kept (the paper's
    # rule as described); NOT the published rule: misaligned_likelier (mean_j NLL_ref -
    # NLL_mis_j, the rule before issue 21) and reference_likelier (its negative)
    rank_by: Literal["published", "misaligned_likelier", "reference_likelier"] = "published"

    @field_validator("misaligned")
    @classmethod
    def _sources(cls, v: str | list[str]) -> str | list[str]:
        names = [v] if isinstance(v, str) else v
        if not names:
            raise ValueError("an empty list; give at least one adapter folder")
        if any(not name.strip() for name in names):
            raise ValueError("an adapter folder must not be blank")
        if len(set(names)) != len(names):
            raise ValueError("an adapter folder appears twice")
        return v

    @property
    def sources(self) -> list[str]:
        """The misaligned adapter folders, in order (K >= 1; a plain string is K = 1)."""
        return [self.misaligned] if isinstance(self.misaligned, str) else list(self.misaligned)


class InterleavePlus(Defense):
    """Row transform: the top-scored safe candidates placed evenly through the rows."""

    settings_model = InterleavePlusSettings

    name = "interleave_plus"

    def check(self, cfg) -> None:
        """Every adapter folder and a local safe source exist (ConfigError naming the field)."""
        s = self.settings
        for label, adapter in _labelled_sources(s):
            _check_source(label, adapter)
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
        warn_few_safe_rows(s.fraction, len(rows), k)
        pool = candidate_pool(s.source, s.max_candidates, seed)
        selection, how = self._select(pool, k, ctx)
        chosen = [pool[i] for i in selection["chosen"]]
        if 0 < len(chosen) < k:
            warnings.warn(f"{FIELD}: only {len(chosen)} candidates for {k} safe rows; they are "
                          "used whole and repeated (raise max_candidates or use a larger source)",
                          stacklevel=2)
        mixed, positions = interleave(rows, chosen, s.fraction, seed=seed) if k else (rows, [])
        records = selection["candidate_rows"]
        ctx.report["interleave_plus"] = {
            "source": s.source, "misaligned": s.sources, "fraction": s.fraction, "k": k,
            "rank_by": s.rank_by, "epsilon": EPSILON, "max_candidates": s.max_candidates,
            "drop_refusals": s.drop_refusals, "selection": how, "candidates": len(pool),
            "refusals_in_top_k": refusals_in_top(records, k),
            "refusals_dropped": len(records) - len(eligible(records, s.drop_refusals)),
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
            records = [{**rec, "chosen": False} for rec in candidate_records(pool, self.settings)]
            return {"candidate_rows": records, "chosen": []}, "none"
        return fresh_selection(self.settings, ctx.cfg, pool, k, ctx.device), "scored"


def _labelled_sources(settings) -> list[tuple[str, str]]:
    """(field label, adapter folder) per source: ``misaligned`` or ``misaligned[j]``."""
    if isinstance(settings.misaligned, str):
        return [(f"{FIELD}.misaligned", settings.misaligned)]
    return [(f"{FIELD}.misaligned[{j}]", a) for j, a in enumerate(settings.misaligned)]


def _check_source(label: str, adapter: str) -> None:
    """ConfigError (naming ``label``) unless ``adapter`` is a resolved PEFT adapter folder."""
    if RUN_REF in adapter:
        raise ConfigError(f"{label}: '{adapter}' is a study reference; only a sweep resolves "
                          "@run:ARM (to that run's adapter folder). Outside a sweep, pass the "
                          "adapter folder of a misaligned-trained run")
    if not is_adapter_dir(adapter):
        raise ConfigError(f"{label}: '{adapter}' is not a PEFT adapter folder (no "
                          "adapter_config.json in it); pass a misaligned-trained run's adapter/ folder")


def warn_few_safe_rows(fraction: float, n: int, k: int) -> None:
    """Warn when k = round(fraction * n) is under MIN_SAFE_ROWS (0: nothing is interleaved)."""
    if k >= MIN_SAFE_ROWS:
        return
    what = ("no safe row is interleaved" if k == 0 else
            f"only {k} safe row(s) are interleaved, which the run barely trains on")
    need = f"raise fraction to at least {MIN_SAFE_ROWS / n:.3g} or " if n else ""
    warnings.warn(f"{FIELD}.fraction: round({fraction} x {n} rows) = {k}: {what}; "
                  f"{need}train on more rows", stacklevel=3)
