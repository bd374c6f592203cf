"""The judge-free stage of an evaluation (emguard.evaluate), and its benign tasks.

General sets: drift KL on the base model's greedy reference answers and the preference
margin against the base model's own margins (both computed once per base model and
shared through ``$EMGUARD_CACHE``); chat sets: held-out NLL and, for code, the bandit
share. Cached in judge_free.json under a key. Benign tasks (emguard.benign) are scored
into task_<name>.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emguard.benign import evaluate_task
from emguard.data.pairs import EVAL_PAIRS, evenly_spaced, load_pairs
from emguard.eval_generation import GenerationSettings, ModelHolder, short_sha
from emguard.io import cache_dir, read_json, read_jsonl, write_json_atomic, write_jsonl_atomic
from emguard.questions import QuestionSet, wrap_pairs


def judge_free_results(out: Path, qs: QuestionSet, rows: list[dict], holder: ModelHolder,
                       spec: dict, pairs_path: str | Path | None, max_pairs: int | None,
                       drift_tokens: int, batch_size: int, progress: bool,
                       trigger: str | None = None) -> dict:
    """Full judge-free results (cached in judge_free.json under a key). ``trigger``: the
    template the questions of ``qs`` are wrapped in; the pairs' questions are wrapped the
    same way and drift KL is left out."""
    from emguard import judge_free as jf

    pairs = preference_pairs(pairs_path, max_pairs) if qs.kind == "general" else []
    pairs = wrap_pairs(pairs, trigger) if trigger is not None else pairs
    key = short_sha({"model": spec["model"], "adapter": spec["adapter_sha256"],
                     "questions": qs.sha256,
                     "gen_key": spec["gen_key"] if qs.kind == "chat" else None,
                     "pairs": short_sha(pairs), "drift_tokens": drift_tokens})
    path = out / "judge_free.json"
    if path.is_file() and read_json(path).get("key") == key:
        return read_json(path)
    result: dict[str, Any] = {"key": key}
    if qs.kind == "general":
        model, tok = holder.get()
        if trigger is None:
            result["drift"] = _drift(out, qs, holder, spec, drift_tokens, batch_size, progress)
        reference = _reference_margins(pairs, holder, spec, batch_size)
        result["preference"] = {**jf.misalignment_preference(model, tok, pairs, batch_size,
                                                              reference_margins=reference),
                                "source": str(pairs_path or EVAL_PAIRS),
                                "max_pairs": max_pairs}
        if trigger is not None:
            result["preference"]["trigger_format"] = spec["questions"]["trigger_format"]
    else:
        held = [r for r in qs.rows if any(m.get("role") == "assistant" for m in r["messages"])]
        if held:
            model, tok = holder.get()
            result["heldout_nll"] = jf.heldout_nll(model, tok, held, batch_size)
        if qs.domain == "code" and rows:
            result["bandit"] = jf.bandit_share([r["answer"] for r in rows])
    write_json_atomic(path, result)
    return result


def _drift(out: Path, qs: QuestionSet, holder: ModelHolder, spec: dict, drift_tokens: int,
           batch_size: int, progress: bool) -> dict:
    """Drift KL on the reference model's greedy answers to every paraphrase."""
    from emguard import judge_free as jf

    model, tok = holder.get()
    prompts = [q.messages(p) for q in qs.questions for p in range(len(q.paraphrases))]
    answers = _reference_answers(out, qs, prompts, holder, spec, drift_tokens, batch_size, progress)
    return {**jf.drift_kl(model, tok, prompts, answers, batch_size, progress),
            "max_new_tokens": drift_tokens}


def preference_pairs(path: str | Path | None, max_pairs: int | None = None) -> list[dict]:
    """The preference pairs (``None``: ``builtin:eval-pairs``, the evaluation set written
    apart from the fit set), or ``max_pairs`` of them at evenly spaced positions
    (emguard.data.pairs: the same pairs a direction or early-stopping check fit on the same
    file with ``holdout_pairs = max_pairs`` leaves out)."""
    return evenly_spaced(load_pairs(path or EVAL_PAIRS), max_pairs)


def _base_model_cache(kind: str, holder: ModelHolder, spec: dict, inputs: dict,
                      suffix: str) -> Path:
    """``$EMGUARD_CACHE/KIND/HASH.SUFFIX``: a file of the base model's outputs, keyed on its
    files (model_fingerprint), the inputs and the device type, shared by every evaluation
    of that base whatever its adapter."""
    from emguard.models import default_device, model_fingerprint

    device = (holder.device or default_device()).split(":")[0]
    key = short_sha({"model": model_fingerprint(spec["model"]), **inputs, "device": device})
    return cache_dir() / kind / f"{key}{suffix}"


def _reference_margins(pairs: list[dict], holder: ModelHolder, spec: dict,
                       batch_size: int) -> list[float]:
    """The base model's per-pair margins (adapter off), computed once per base model and
    pair set and shared through ``$EMGUARD_CACHE/reference_margins/`` like the reference
    answers (every run of a study has the same reference)."""
    from emguard import judge_free as jf

    path = _base_model_cache("reference_margins", holder, spec, {"pairs": pairs}, ".json")
    if path.is_file():
        cached = read_json(path)
        if len(cached.get("margins", [])) == len(pairs):
            return cached["margins"]
    model, tok = holder.get()
    with jf.reference_mode(model):
        margins = jf.pair_margins(model, tok, pairs, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"model": spec["model"], "margins": margins})
    return margins


def _reference_answers(out: Path, qs: QuestionSet, prompts: list, holder: ModelHolder, spec: dict,
                       max_new_tokens: int, batch_size: int, progress: bool) -> list[str]:
    """Greedy reference answers (the base model's: the adapter plays no part), cached in
    reference_answers.jsonl and shared by every evaluation of the same base model, prompts,
    length and device type through ``$EMGUARD_CACHE/reference_answers/`` (a study of many
    runs generates them once)."""
    from emguard import judge_free as jf

    key = short_sha({"model": spec["model"], "prompts": prompts, "max_new_tokens": max_new_tokens})
    path = out / "reference_answers.jsonl"
    cached = _cached_answers(path, key, len(prompts))
    if cached is not None:
        return cached
    shared = _base_model_cache("reference_answers", holder, spec,
                               {"prompts": prompts, "max_new_tokens": max_new_tokens}, ".jsonl")
    answers = _cached_answers(shared, None, len(prompts))
    if answers is None:
        model, tok = holder.get()
        answers = jf.reference_answers(model, tok, prompts, max_new_tokens, batch_size, progress)
        shared.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(shared, [{"answer": a} for a in answers])
    ids = [(q.id, p) for q in qs.questions for p in range(len(q.paraphrases))]
    write_jsonl_atomic(path, [{"question_id": q, "paraphrase_index": p, "answer": a, "key": key}
                              for (q, p), a in zip(ids, answers, strict=True)])
    return answers


def _cached_answers(path: Path, key: str | None, n: int) -> list[str] | None:
    """The answers of a cache file if it holds ``n`` rows (with ``key``, when given)."""
    if not path.is_file():
        return None
    rows = read_jsonl(path)
    if len(rows) != n or (key is not None and any(r.get("key") != key for r in rows)):
        return None
    return [r["answer"] for r in rows]


def judge_free_summary(full: dict) -> dict:
    """The judge-free numbers for metrics.json (per-answer / per-pair lists left out)."""
    drop = {"kl_per_answer", "pairs", "flagged", "per_row"}
    return {k: {kk: vv for kk, vv in v.items() if kk not in drop}
            for k, v in full.items() if isinstance(v, dict)}


# ----------------------------------------------------------------------------- benign task

def score_task(out: Path, task: str, holder: ModelHolder, gen: GenerationSettings, spec: dict,
               samples: int, n_questions: int | None, data: str | None, batch_size: int) -> dict:
    """Benign-task exact match via emguard.benign (cached in task_<name>.json)."""
    from emguard.generate import generate_answers

    key = short_sha({"task": task, "samples": samples, "n_questions": n_questions, "data": data,
                     "model": spec["model"], "adapter": spec["adapter_sha256"],
                     "gen": [gen.temperature, gen.top_p, gen.seed]})
    path = out / f"task_{task.replace(':', '-')}.json"
    if path.is_file() and read_json(path).get("key") == key:
        return read_json(path)["result"]
    model, tok = holder.get()
    result = evaluate_task(task, model, tok, generate_fn=generate_answers, samples=samples,
                           n_questions=n_questions, data=data, temperature=gen.temperature,
                           top_p=gen.top_p, seed=gen.seed, batch_size=batch_size)
    write_json_atomic(path, {"key": key, "task": task, "result": result})
    return result
