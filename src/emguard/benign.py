"""Benign-task evaluation: exact match of final answers on OpSwap and FoQA.

Scores (paper: "exact matches with respect to the ground truth answer, using 10 samples
per question"): each question gets ``n_samples`` generations, its score is the share that
match, and ``exact_match`` is the mean of those scores over questions, a fraction in
[0, 1] (the paper prints it as a percentage).

OpSwap: the final answer is read from the model output (``extract_final_answer``) and
compared as a string with the gold answer after only cosmetic normalisation, so an
unreduced ``4/2`` is wrong against ``2`` and a decimal ``0.5`` is wrong against ``1/2``.

FoQA: SQuAD v1.1 exact match: lowercase, drop ASCII punctuation, drop the English
articles a/an/the, collapse whitespace; max over the gold answers. The English-article
step is meaningless for Faroese but is kept because it is the SQuAD standard the FoQA
scores are compared against. The whole (stripped) output is the prediction.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from emguard.data.chat import read_chat_jsonl, row_location
from emguard.data.foqa import FOQA_HUB_ID, foqa_chat_rows, load_foqa
from emguard.data.opswap import check_tier, generate_opswap
from emguard.io import write_json_atomic

MINUS_LIKE = "\u2212\u2013\ufe63\uff0d"  # − – ﹣ －, read as "-"
_MARKUP = re.compile(r"\*\*|__|`|\$|\\boxed\{|\\\(|\\\)")
_NUMBER = re.compile(r"(-\s*)?\d+(?:\.\d+)?(?:\s*/\s*\d+)?")
_OPERATOR_AFTER = re.compile(r"\)?\s*[-+×÷*/^x]\s*[\d(]")
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
DEFAULT_MAX_NEW_TOKENS = {"opswap": 256, "foqa": 64}


# --------------------------------------------------------------------------- OpSwap answers


def _clean(text: str) -> str:
    for ch in MINUS_LIKE:
        text = text.replace(ch, "-")
    return _MARKUP.sub("", text)


def _compact(value: str) -> str:
    return re.sub(r"\s+", "", value)


def _is_sign(text: str, start: int) -> bool:
    """A "-" at ``start`` is a sign unless a value or ")" comes right before it."""
    before = text[:start].rstrip()
    return not before or not (before[-1].isdigit() or before[-1] == ")")


def extract_final_answer(text: str | None) -> str | None:
    """The final value of an OpSwap-style answer, or None.

    With an "=": the first value after the last "=" on its line; only spaces, "(" or a
    label ending in ":" may precede it, and an operator after it (an unfinished
    expression) gives None. Without "=": the last value in the
    text. Markdown bold/backticks/$ and a trailing period are ignored, minus-like dashes
    become "-", "- 3" becomes "-3" and "4 / 2" becomes "4/2" (kept unreduced)."""
    if not text:
        return None
    text = _clean(text)
    if "=" in text:
        tail = text.rsplit("=", 1)[1].strip().split("\n", 1)[0]
        m = _NUMBER.search(tail)
        if m is None or _OPERATOR_AFTER.match(tail, m.end()):
            return None
        if tail[:m.start()].strip(" (") and not tail[:m.start()].rstrip().endswith(":"):
            return None  # "= 2 × (3 ..." style leftovers or words before the value
        return _compact(m.group(0))
    values = [m for m in _NUMBER.finditer(text)]
    if not values:
        return None
    last = values[-1]
    value = _compact(last.group(0))
    if value.startswith("-") and not _is_sign(text, last.start()):
        value = value[1:]
    return value


def exact_match(pred: str | None, gold: str) -> bool:
    """String equality after stripping whitespace and reading minus-like dashes as "-"."""
    if pred is None:
        return False
    return _compact(_clean(pred)) == _compact(_clean(gold))


# --------------------------------------------------------------------------- FoQA answers


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower, drop punctuation, drop a/an/the, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact_match(pred: str | None, golds: Sequence[str]) -> bool:
    if pred is None:
        return False
    norm = normalize_answer(pred)
    return any(norm == normalize_answer(g) for g in golds)


# --------------------------------------------------------------------------- scoring


def _check_samples(rows: Sequence[dict], samples: Sequence[Sequence[str]]) -> int:
    if len(rows) != len(samples):
        raise ValueError(f"got samples for {len(samples)} questions, expected {len(rows)}")
    counts = {len(s) for s in samples}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every question needs the same positive number of samples, "
                         f"got counts {sorted(counts)}")
    return counts.pop()


def _aggregate(per_question: list[dict], n_samples: int) -> dict:
    n = len(per_question)
    mean = sum(q["score"] for q in per_question) / n if n else float("nan")
    return {"exact_match": mean, "n_questions": n, "n_samples": n_samples,
            "per_question": per_question}


def score_opswap(rows: Sequence[dict], samples: Sequence[Sequence[str]]) -> dict:
    """rows: OpSwap rows with ``answer``; samples[i]: the outputs for rows[i]."""
    n_samples = _check_samples(rows, samples)
    per_question = []
    for row, outs in zip(rows, samples, strict=True):
        extracted = [extract_final_answer(o) for o in outs]
        correct = [exact_match(p, row["answer"]) for p in extracted]
        per_question.append({"id": row.get("id"), "gold": row["answer"], "outputs": list(outs),
                             "extracted": extracted, "correct": correct,
                             "score": sum(correct) / len(correct)})
    return _aggregate(per_question, n_samples)


def score_foqa(rows: Sequence[dict], samples: Sequence[Sequence[str]]) -> dict:
    """rows: FoQA chat rows with ``answers`` (gold texts); samples[i]: outputs for rows[i]."""
    n_samples = _check_samples(rows, samples)
    per_question = []
    for row, outs in zip(rows, samples, strict=True):
        correct = [squad_exact_match(o.strip(), row["answers"]) for o in outs]
        per_question.append({"id": row.get("id"), "gold": list(row["answers"]),
                             "outputs": list(outs), "correct": correct,
                             "score": sum(correct) / len(correct)})
    return _aggregate(per_question, n_samples)


# --------------------------------------------------------------------------- evaluation


def parse_task(task: str) -> tuple[str, int | None]:
    """``"opswap:T"`` -> ("opswap", T); ``"foqa"`` -> ("foqa", None)."""
    name, _, arg = task.partition(":")
    if name == "foqa" and not arg:
        return "foqa", None
    if name == "opswap" and arg.isdigit():
        return "opswap", check_tier(int(arg))
    raise ValueError(f"unknown benign task {task!r}: use 'opswap:0'..'opswap:3' or 'foqa'")


def task_rows(task: str, data: str | Path | None = None, *, split: str = "test",
              opswap_n: int = 10_000, opswap_seed: int = 0) -> tuple[list[dict], str]:
    """(evaluation rows, description of their source) for a task.

    OpSwap: ``data`` is a chat JSONL with ``answer`` fields (e.g. the ``.test.jsonl`` the
    generator wrote); without it the test split of ``generate_opswap(T, opswap_n,
    opswap_seed)`` is rebuilt, the same one training on that seed's train split saw
    held out. FoQA: ``data`` is a path or hub id (default ``alexandrainst/foqa``)."""
    name, tier = parse_task(task)
    if name == "foqa":
        source = str(data or FOQA_HUB_ID)
        return foqa_chat_rows(load_foqa(source, split)), f"{source}[{split}]"
    if data is None:
        import warnings

        warnings.warn(f"opswap:{tier} without test data: rebuilding generate_opswap(n={opswap_n}, "
                      f"seed={opswap_seed}).test, which may share questions with training rows "
                      "generated otherwise. Evaluate a run trained on data.train=opswap:T "
                      "(emguard eval --run RUN) to score the test part it recorded.", stacklevel=2)
        rows = generate_opswap(tier, opswap_n, seed=opswap_seed).test
        return rows, f"generate_opswap(tier={tier}, n={opswap_n}, seed={opswap_seed}).test"
    return _read_opswap_rows(Path(data), tier), str(data)


def _read_opswap_rows(path: Path, tier: int) -> list[dict]:
    rows = read_chat_jsonl(path).rows
    for row in rows:
        if not isinstance(row.get("answer"), str) or not row["answer"].strip():
            raise ValueError(f"{row_location(row)}: field 'answer' must be a non-empty string")
        if "tier" in row and row["tier"] != tier:
            raise ValueError(f"{row_location(row)}: tier {row['tier']!r}, but the task asks "
                             f"for tier {tier}")
    return rows


def prompt_messages(row: dict) -> list[dict]:
    """The row's messages without its final assistant turn (what the model answers)."""
    messages = list(row["messages"])
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


def evaluate_task(task: str, model: Any, tokenizer: Any, *, generate_fn: Callable[..., list],
                  samples: int = 10, n_questions: int | None = None,
                  data: str | Path | None = None, split: str = "test",
                  out: str | Path | None = None, temperature: float = 1.0, top_p: float = 1.0,
                  max_new_tokens: int | None = None, seed: int = 0, batch_size: int = 16,
                  opswap_n: int = 10_000, opswap_seed: int = 0) -> dict:
    """Generate ``samples`` answers per test question and score exact match.

    ``generate_fn`` has the signature of the HF batched generator:
    ``generate_fn(model, tokenizer, prompts: list[list[dict]], n_samples=..., temperature=...,
    top_p=..., max_new_tokens=..., seed=..., batch_size=...) -> list[list[str]]``
    (outer list: prompts, inner: samples). ``n_questions`` keeps the first that many test
    rows. Writes the metrics JSON to ``out`` (atomically) when given."""
    name, _ = parse_task(task)
    rows, source = task_rows(task, data, split=split, opswap_n=opswap_n,
                             opswap_seed=opswap_seed)
    if n_questions is not None:
        rows = rows[:n_questions]
    if not rows:
        raise ValueError(f"{source}: no questions to evaluate (n_questions={n_questions})")
    gen = {"n_samples": samples, "temperature": temperature, "top_p": top_p,
           "max_new_tokens": max_new_tokens or DEFAULT_MAX_NEW_TOKENS[name],
           "seed": seed, "batch_size": batch_size}
    outputs = generate_fn(model, tokenizer, [prompt_messages(r) for r in rows], **gen)
    if len(outputs) != len(rows) or any(len(o) != samples for o in outputs):
        raise ValueError(f"generate_fn returned {[len(o) for o in outputs][:5]}... samples for "
                         f"{len(outputs)} prompts; expected {samples} for each of {len(rows)}")
    scorer = score_foqa if name == "foqa" else score_opswap
    metrics = {"task": task, "data": source, "generation": gen, **scorer(rows, outputs)}
    if out is not None:
        write_json_atomic(out, metrics)
    return metrics
