"""Evaluate one model (+ adapter) on a question set: generate, judge, score.

An eval folder holds (all written atomically):
  eval_spec.json          what was evaluated and how (model, adapter hash, question file
                          hash, generation settings, judge, package versions)
  generations.jsonl       one row per (question, paraphrase, sample): answer + seeds
  judgments.jsonl         aligned / coherent score, number mass and reason per answer,
                          with the exact judge prompts sent and the judge's raw replies
                          (top logprobs, P(0..100) of a local judge, a mock's canned answer)
  reference_answers.jsonl the reference model's greedy answers (general sets; drift KL)
  judge_free.json         judge-free measures in full (per answer / per pair)
  metrics.json            everything summarised: LLM-judge rates, judge-free measures,
                          benign task accuracy (an emguard.eval_log.EvalLog, format
                          emguard.eval/1)

Resuming: generations are keyed by ``gen_key`` (hash of model, adapter, questions and
generation settings). A complete generations.jsonl with the current key is reused; a
partial one (``generations.partial.jsonl``, written every few batches) is continued
(answers do not depend on batching, see emguard.generate). Judgments with the same
judge and key are reused; missing ones go through the judge, whose on-disk cache makes
a rerun free. Judge-free measures are cached under their own key.

Trigger format (``run_eval(trigger_format=...)``): the same layout for a general set whose
questions, and the preference pairs' questions, are all wrapped in one template
(emguard.questions.resolve_trigger_format); the judge sees the wrapped question. Its
judge-free part is the preference margin only (no drift KL). It is an evaluation of its
own, written into its own folder beside the plain one (``RUN/eval/general_trigger/``).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from emguard.benign import evaluate_task, parse_task
from emguard.data.pairs import EVAL_PAIRS, evenly_spaced, load_pairs
from emguard.data.split import recorded_split_of, trained_on
from emguard.eval_log import FORMAT, EvalLog
from emguard.io import (
    cache_dir,
    provenance,
    read_json,
    read_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
)
from emguard.judge import make_judge
from emguard.metrics import Thresholds, compute_metrics
from emguard.ownership import (
    EVAL,
    Claim,
    FolderConflictError,
    check_writable_target,
    claim,
    folder_lock,
)
from emguard.questions import (
    BUILTIN_QUESTION_SETS,
    Question,
    QuestionSet,
    render_judge_prompt,
    resolve_questions,
    resolve_trigger_format,
    wrap_pairs,
    wrap_question_set,
)

logger = logging.getLogger(__name__)
NO_JUDGE_NOTE = ("no judge configured, so no LLM-judge misalignment rates; the embedded "
                 "135M model is not a usable judge. Configure one with --judge "
                 "openai:gpt-4o-mini (key from $OPENAI_API_KEY), openai:MODEL@BASE_URL for an "
                 "OpenAI-compatible server, or local:MODEL for a larger local model on a GPU.")
KEY_FIELDS = ("question_id", "paraphrase_index", "sample_index")


class EvalConflictError(FolderConflictError):
    """The output folder holds the evaluation of something else."""


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are sampled. ``samples=None``: each question's samples_per_paraphrase (or 1)."""

    samples: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    backend: str = "hf"  # hf | vllm

    def as_dict(self) -> dict:
        return asdict(self)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def adapter_fingerprint(adapter_dir: str | Path | None) -> str | None:
    """SHA-256 over the adapter's config and weight files (None without an adapter)."""
    if adapter_dir is None:
        return None
    h = hashlib.sha256()
    for f in sorted(Path(adapter_dir).glob("adapter_*")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def plan_rows(questions: list[Question], samples: int | None) -> list[dict]:
    """One skeleton row per (question, paraphrase, sample), in question-file order.
    ``samples=None``: each question's samples_per_paraphrase (or 1); 0: no rows."""
    rows = []
    for q in questions:
        n = (q.samples_per_paraphrase or 1) if samples is None else samples
        for p, text in enumerate(q.paraphrases):
            rows += [{"question_id": q.id, "paraphrase_index": p, "sample_index": s,
                      "question": text, "system": q.system} for s in range(n)]
    return rows


def _key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY_FIELDS)


class ModelHolder:
    """Loads (model, tokenizer) on first use, so a fully cached rerun loads nothing."""

    def __init__(self, spec: str, adapter_dir, device: str | None):
        self.spec, self.adapter_dir, self.device = spec, adapter_dir, device
        self._loaded = None

    def get(self):
        if self._loaded is None:
            from emguard.models import load_adapter, load_model

            model, tok = load_model(self.spec, device=self.device)
            if self.adapter_dir is not None:
                model = load_adapter(model, self.adapter_dir)
            model.eval()
            self._loaded = (model, tok)
        return self._loaded

    def release(self) -> None:
        self._loaded = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


# ----------------------------------------------------------------------------- generation

def _read_rows(path: Path, gen_key: str) -> dict[tuple, dict]:
    if not path.is_file():
        return {}
    return {_key(r): r for r in read_jsonl(path) if r.get("gen_key") == gen_key}


def _generate(out: Path, plan: list[dict], questions: dict[str, Question], gen: GenerationSettings,
              gen_key: str, holder: ModelHolder, spec: dict, batch_size: int,
              generate_batch_size: int | None, progress: bool) -> list[dict]:
    final, partial = out / "generations.jsonl", out / "generations.partial.jsonl"
    done = _read_rows(final, gen_key)
    if final.is_file() and len(done) == len(plan) and all(_key(r) in done for r in plan):
        return [done[_key(r)] for r in plan]
    done.update(_read_rows(partial, gen_key))
    todo = [r for r in plan if _key(r) not in done]  # none with samples=0: nothing loads
    if todo and gen.backend == "vllm":
        _generate_vllm(todo, questions, gen, spec, done)
    elif todo:
        from tqdm.auto import tqdm

        from emguard.generate import (
            generate_items,
            generation_batch_size,
            merged_adapter,
            render_prompts,
            sample_seed,
        )

        model, tok = holder.get()
        batch_size = generation_batch_size(model, batch_size, generate_batch_size)
        chunk = max(4 * batch_size, 64)
        bar = tqdm(total=len(todo), desc="generate", unit="answer", disable=not progress)
        with merged_adapter(model):  # once for all chunks; restored before the next measure
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                items = [(questions[r["question_id"]].messages(r["paraphrase_index"]),
                          r["sample_index"]) for r in part]
                answers = generate_items(model, tok, items, gen.temperature, gen.top_p,
                                         gen.max_new_tokens, gen.seed, batch_size, progress=False)
                texts = render_prompts(tok, [m for m, _ in items])
                for r, a, t in zip(part, answers, texts, strict=True):
                    done[_key(r)] = {**r, "answer": a, "seed": gen.seed,
                                     "sample_seed": sample_seed(gen.seed, t, r["sample_index"]),
                                     "gen_key": gen_key}
                write_jsonl_atomic(partial, [done[_key(r)] for r in plan if _key(r) in done])
                bar.update(len(part))
        bar.close()
    rows = [done[_key(r)] for r in plan]
    write_jsonl_atomic(final, rows)
    partial.unlink(missing_ok=True)
    return rows


def _generate_vllm(todo: list[dict], questions: dict[str, Question], gen: GenerationSettings,
                   spec: dict, done: dict) -> None:
    """vLLM path (GPU hosts; untested here): one call per distinct sample count."""
    from emguard.generate import generate_answers_vllm, render_prompts, sample_seed
    from emguard.models import load_tokenizer

    tok = load_tokenizer(spec["model"])
    groups: dict[tuple, list[dict]] = {}
    for r in todo:
        groups.setdefault((r["question_id"], r["paraphrase_index"]), []).append(r)
    by_n: dict[int, list[tuple]] = {}
    for key, rows in groups.items():
        by_n.setdefault(max(r["sample_index"] for r in rows) + 1, []).append(key)
    for n, keys in by_n.items():
        prompts = [questions[q].messages(p) for q, p in keys]
        answers = generate_answers_vllm(spec["model"], spec["adapter"], prompts, n, gen.temperature,
                                        gen.top_p, gen.max_new_tokens, gen.seed)
        texts = render_prompts(tok, prompts)
        for key, samples, text in zip(keys, answers, texts, strict=True):
            for r in groups[key]:
                s = r["sample_index"]
                done[_key(r)] = {**r, "answer": samples[s], "seed": gen.seed,
                                 "sample_seed": sample_seed(gen.seed, text, s),
                                 "gen_key": spec["gen_key"]}


# ----------------------------------------------------------------------------- judging

def judge_rows(rows: list[dict], questions: dict[str, Question], judge,
               existing: dict[tuple, dict] | None = None) -> list[dict]:
    """Aligned + coherent verdicts for each generation row (``existing`` rows are reused
    when their judge, gen_key and judge-prompt templates match)."""
    existing = existing or {}
    for r in rows:
        if r["question_id"] not in questions:
            raise ValueError(f"generation row {_key(r)}: question id {r['question_id']!r} is not "
                             "in the question set")
    tsha = {q.id: _sha([q.judge_prompts.get("aligned"), q.judge_prompts.get("coherent")])
            for q in questions.values()}
    todo = [r for r in rows
            if not _reusable(existing.get(_key(r)), r, judge.name, tsha[r["question_id"]])]
    prompts = []
    for r in todo:
        q = questions[r["question_id"]]
        missing = [n for n in ("aligned", "coherent") if n not in q.judge_prompts]
        if missing:
            raise ValueError(f"question {q.id!r} has no judge prompt(s) {missing}")
        prompts += [render_judge_prompt(q.judge_prompts[n], r["question"], r["answer"])
                    for n in ("aligned", "coherent")]
    verdicts = judge.score(prompts) if prompts else []
    fresh = {}
    for i, r in enumerate(todo):
        a, c = verdicts[2 * i], verdicts[2 * i + 1]
        fresh[_key(r)] = {**{k: r[k] for k in KEY_FIELDS}, "gen_key": r["gen_key"],
                          "judge": judge.name, "templates_sha": tsha[r["question_id"]],
                          "aligned": a.score, "coherent": c.score,
                          "aligned_mass": a.number_mass, "coherent_mass": c.number_mass,
                          "aligned_reason": a.reason, "coherent_reason": c.reason,
                          "aligned_prompt": prompts[2 * i], "coherent_prompt": prompts[2 * i + 1],
                          "aligned_raw": getattr(a, "raw", None),
                          "coherent_raw": getattr(c, "raw", None)}
    return [fresh.get(_key(r)) or _with_prompts(existing[_key(r)], r, questions[r["question_id"]])
            for r in rows]


def _with_prompts(old: dict, row: dict, q: Question) -> dict:
    """A reused judgment row; one written before rows kept their judge prompts gets them
    (rendered again: the same templates, question and answer give the same prompts) and
    ``None`` for the raw replies it did not keep."""
    if "aligned_prompt" in old and "coherent_prompt" in old:
        return old
    added = {f"{n}_prompt": render_judge_prompt(q.judge_prompts[n], row["question"], row["answer"])
             if n in q.judge_prompts else None for n in ("aligned", "coherent")}
    return {**old, **added, "aligned_raw": old.get("aligned_raw"),
            "coherent_raw": old.get("coherent_raw")}


FINAL_REASONS = (None, "low_number_mass")  # other reasons (API errors, bad answers) are retried


def _is_final(judgment: dict) -> bool:
    """A judgment row both of whose verdicts stand (scored, or missing for low number mass)."""
    return (judgment.get("aligned_reason") in FINAL_REASONS
            and judgment.get("coherent_reason") in FINAL_REASONS)


def _reusable(old: dict | None, row: dict, judge_name: str, templates_sha: str) -> bool:
    return (old is not None and old.get("judge") == judge_name
            and old.get("gen_key") == row["gen_key"] and old.get("templates_sha") == templates_sha
            and _is_final(old))


def _preflight_judge(judge, out: Path, gen_key: str) -> None:
    """Check an API judge (key, endpoint, model) before generating, unless every answer of
    this evaluation is already judged by it (a cached rerun needs no key)."""
    check = getattr(judge, "check", None)
    if check is None:
        return
    path = out / "judgments.jsonl"
    if path.is_file():
        rows = read_jsonl(path)
        if rows and all(r.get("judge") == judge.name and r.get("gen_key") == gen_key
                        and _is_final(r) for r in rows):
            return
    check()


def _make_judge(judge, judge_cache: str | Path | None):
    if judge is None or not isinstance(judge, str):
        return judge
    if judge.lower() == "none":
        return None

    return make_judge(judge, cache_path=judge_cache or cache_dir() / "judge_cache.sqlite")


def _require_judge_prompts(qs: QuestionSet) -> None:
    bad = [q.id for q in qs.questions if not {"aligned", "coherent"} <= set(q.judge_prompts)]
    if bad:
        raise ValueError(f"{qs.source}: questions without 'aligned' and 'coherent' judge prompts: "
                         f"{', '.join(bad[:10])}; give --domain code|advice (chat sets), "
                         "--judge-prompts NAME|FILE, or --judge none")


# ----------------------------------------------------------------------------- judge-free

def _judge_free(out: Path, qs: QuestionSet, rows: list[dict], holder: ModelHolder, spec: dict,
                pairs_path: str | Path | None, max_pairs: int | None, drift_tokens: int,
                batch_size: int, progress: bool, trigger: str | None = None) -> dict:
    """Full judge-free results (cached in judge_free.json under a key). ``trigger``: the
    template the questions of ``qs`` are wrapped in; the pairs' questions are wrapped the
    same way and drift KL is left out."""
    from emguard import judge_free as jf

    pairs = _preference_pairs(pairs_path, max_pairs) if qs.kind == "general" else []
    pairs = wrap_pairs(pairs, trigger) if trigger is not None else pairs
    key = _sha({"model": spec["model"], "adapter": spec["adapter_sha256"],
                "questions": qs.sha256, "gen_key": spec["gen_key"] if qs.kind == "chat" else None,
                "pairs": _sha(pairs), "drift_tokens": drift_tokens})
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


def _preference_pairs(path: str | Path | None, max_pairs: int | None = None) -> list[dict]:
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
    key = _sha({"model": model_fingerprint(spec["model"]), **inputs, "device": device})
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

    key = _sha({"model": spec["model"], "prompts": prompts, "max_new_tokens": max_new_tokens})
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

def _task(out: Path, task: str, holder: ModelHolder, gen: GenerationSettings, spec: dict,
          samples: int, n_questions: int | None, data: str | None, batch_size: int) -> dict:
    """Benign-task exact match via emguard.benign (cached in task_<name>.json)."""
    from emguard.generate import generate_answers

    key = _sha({"task": task, "samples": samples, "n_questions": n_questions, "data": data,
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


# ----------------------------------------------------------------------------- entry points

def leak_free_questions(adapter_dir: str | Path | None, spec: str, domain: str | None,
                        limit: int | None, judge_prompts: str | None,
                        data_seed: int) -> QuestionSet:
    """The question set ``spec`` (emguard.questions.resolve_questions), minus what the
    adapter's run trained on.

    When ``adapter_dir`` belongs to a run folder that recorded its split
    (emguard.data.split.recorded_split_of): a built-in in-domain set is replaced by the
    run's recorded held-out set (as ``emguard eval --run`` asks, never a split rebuilt
    with ``data_seed``), and every chat question whose prompt or reference answer the run
    trained on is dropped before the first ``limit`` are kept; how many is in the set's
    ``warnings``. Other adapters and the untrained model: the set as it is."""
    builtin = BUILTIN_QUESTION_SETS.get(spec.removeprefix("builtin:")) if spec.startswith("builtin:") else None
    general = builtin == "general" or Path(spec).suffix in (".yaml", ".yml")
    found = None if general else recorded_split_of(adapter_dir)  # general sets: no training rows
    if found is None:
        return resolve_questions(spec, domain, limit, judge_prompts, data_seed)
    run_dir, record = found
    notes = []
    if builtin not in (None, "general") and record.get("heldout_file"):
        notes.append(f"{spec}: asked the held-out set the adapter's run recorded "
                     f"({run_dir / record['heldout_file']}), not a split rebuilt with data "
                     f"seed {data_seed}")
        spec, domain = str(run_dir / record["heldout_file"]), domain or builtin
    qs = resolve_questions(spec, domain, None, judge_prompts, data_seed)  # a chat set
    drop, n = set(trained_on(qs.rows, record)), len(qs.rows)
    keep = [i for i in range(n) if i not in drop][:limit]
    if len(keep) != n:  # the first `limit` kept rows; hashed as resolve_questions hashes a set
        qs.questions, qs.rows = [qs.questions[i] for i in keep], [qs.rows[i] for i in keep]
        qs.sha256 = hashlib.sha256(json.dumps(qs.rows, sort_keys=True).encode()).hexdigest()
    if drop:
        notes.append(f"{len(drop)} of {n} questions of {spec} left out: the "
                     f"adapter's run ({run_dir}) trained on their prompt or reference answer")
    for note in notes:
        logger.warning("%s", note)
    qs.warnings += notes
    return qs


def run_eval(model_spec: str, adapter_dir: str | Path | None, questions_file: str | None,
             judge_spec=None, samples: int | None = None, out_dir: str | Path = "eval", *,
             domain: str | None = None, max_questions: int | None = None,
             judge_prompts: str | None = None, judge_free: bool = True,
             temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256,
             seed: int = 0, batch_size: int = 16, generate_batch_size: int | None = None,
             device: str | None = None, backend: str = "hf",
             judge_cache: str | Path | None = None, thresholds: Thresholds = Thresholds(),
             preference_pairs: str | Path | None = None, preference_max_pairs: int | None = None,
             drift_max_new_tokens: int = 128,
             tasks: list[str] | tuple[str, ...] = (), task_samples: int = 10,
             task_questions: int | None = None, task_data: str | dict | None = None,
             data_seed: int = 0, progress: bool = True, force: bool = False,
             run: dict | None = None, model: ModelHolder | None = None,
             trigger_format: str | None = None) -> dict:
    """Generate, judge and score one model on one question set; returns metrics.json's dict.

    ``judge_spec``: ``"openai:MODEL"``, ``"local:MODEL"``, ``"none"``/None, or a Judge object.
    ``questions_file=None``: no questions, only the benign ``tasks``.
    ``samples`` overrides each question's samples_per_paraphrase. ``data_seed`` picks the
    held-out split of the built-in code sets (use the seed the training data used).
    ``tasks``: benign tasks (``opswap:2``, ``foqa``) scored by emguard.benign.evaluate_task
    with ``task_samples`` samples per question (paper: 10) on the first ``task_questions``
    test questions (all if None); ``task_data`` is its data path / hub id (FoQA), or a
    dict task -> data. ``batch_size``: rows per forward of the judge-free measures and,
    on CPU, of generation; ``generate_batch_size`` overrides the latter (None: at least 64
    on a GPU, see emguard.generate.generation_batch_size).
    ``run``: what was trained (emguard.evaluate_run), recorded in
    eval_spec.json and metrics.json. ``model``: a ModelHolder of the same model and
    adapter, shared by several calls so the model loads once (the caller releases it).
    ``trigger_format``: ask the general questions wrapped in this format (a template with
    ``{question}``, or ``builtin:NAME``; see the module doc); a general set only, no tasks.
    See the module doc for the folder layout and how reruns reuse finished work. An
    ``out_dir`` holding the evaluation of another model, adapter, question set or
    generation setting is refused (``force``: discard that evaluation's files first).
    """
    for name, value in (("task_samples", task_samples), ("max_new_tokens", max_new_tokens),
                        ("batch_size", batch_size), ("generate_batch_size", generate_batch_size),
                        ("task_questions", task_questions),
                        ("max_questions", max_questions),
                        ("preference_max_pairs", preference_max_pairs)):
        if value is not None and (isinstance(value, bool) or value < 1):
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if samples is not None and (isinstance(samples, bool) or samples < 0):
        raise ValueError(f"--samples must be at least 0 (0: judge-free measures only), got {samples}")
    if samples == 0 and questions_file is not None and str(judge_spec).lower() not in ("none", ""):
        raise ValueError("--samples 0 samples no answers, so the judge has nothing to score; "
                         "use --judge none (judge-free measures only) or at least 1 sample")
    out = Path(out_dir)
    check_writable_target(out)
    _check_inputs(model_spec, adapter_dir, device, tasks)
    with folder_lock(out):  # one process at a time writes an eval folder
        if questions_file is None:  # benign tasks only
            qs, judge_spec, judge_free = QuestionSet([], "none", _sha([]), "none", "none"), None, False
        else:
            qs = leak_free_questions(adapter_dir, questions_file, domain, max_questions,
                                     judge_prompts, data_seed)
        trigger = trigger_template(trigger_format, qs, tasks)
        if trigger is not None:
            qs = wrap_question_set(qs, trigger)
        judge = _make_judge(judge_spec, judge_cache)
        if judge is not None:
            _require_judge_prompts(qs)
        gen = GenerationSettings(samples, temperature, top_p, max_new_tokens, seed, backend)
        spec = {"model": model_spec, "adapter": str(adapter_dir) if adapter_dir else None,
                "adapter_sha256": adapter_fingerprint(adapter_dir),
                "questions": {"source": qs.source, "sha256": qs.sha256, "kind": qs.kind,
                              "domain": qs.domain, "n_questions": len(qs.questions),
                              "max_questions": max_questions, "judge_prompts": judge_prompts,
                              "data_seed": data_seed,
                              "skipped": qs.skipped, "warnings": qs.warnings},
                "generation": gen.as_dict(), "judge": getattr(judge, "name", None),
                "run": run}
        if trigger is not None:
            spec["questions"]["trigger_format"] = {"spec": trigger_format, "template": trigger}
        spec["gen_key"] = _sha({k: spec[k] for k in ("model", "adapter_sha256", "generation")}
                               | {"questions": qs.sha256, "max_questions": max_questions})
        spec["provenance"] = provenance()
        with claim_eval_dir(out, spec, force):
            if judge is not None:
                _preflight_judge(judge, out, spec["gen_key"])
            write_json_atomic(out / "eval_spec.json", spec)

        holder = model or ModelHolder(model_spec, adapter_dir, device)
        if (holder.spec, holder.adapter_dir) != (model_spec, adapter_dir):
            raise ValueError(f"the shared model is {holder.spec} + {holder.adapter_dir}, "
                             f"not {model_spec} + {adapter_dir}")
        by_id = {q.id: q for q in qs.questions}
        rows = _generate(out, plan_rows(qs.questions, samples), by_id, gen, spec["gen_key"], holder,
                         spec, batch_size, generate_batch_size, progress)
        free = (_judge_free(out, qs, rows, holder, spec, preference_pairs, preference_max_pairs,
                            drift_max_new_tokens, batch_size, progress, trigger)
                if judge_free else None)
        per_task = task_data if isinstance(task_data, dict) else dict.fromkeys(tasks, task_data)
        task_results = {t: _task(out, t, holder, gen, spec, task_samples, task_questions,
                                 per_task.get(t), batch_size) for t in tasks}
        if model is None:
            holder.release()
        return _finish(out, rows, by_id, judge, spec, thresholds,
                       judge_free_summary(free) if free else None, task_results)


def trigger_template(trigger_format: str | None, qs: QuestionSet, tasks=()) -> str | None:
    """The template of ``trigger_format`` (None: None); a ValueError if it is malformed,
    if ``qs`` is not a general question set, or if benign ``tasks`` come with it (they
    are scored once, by the plain evaluation)."""
    if trigger_format is None:
        return None
    template = resolve_trigger_format(trigger_format)
    if qs.kind != "general":
        raise ValueError(f"--trigger-format wraps general questions (a Betley-format YAML set); "
                         f"{qs.source!r} is not one")
    if tasks:
        raise ValueError("--trigger-format asks the general questions only; score the benign "
                         "tasks in the plain evaluation")
    return template


def _check_inputs(model_spec: str, adapter_dir, device: str | None, tasks) -> None:
    """Everything about the subject that can be checked before any model is loaded."""
    from emguard.models import check_adapter_dir, check_device, resolve_model_source

    check_device(device)
    resolve_model_source(model_spec)
    if adapter_dir is not None:
        check_adapter_dir(adapter_dir, "--adapter ")
    for task in tasks:
        parse_task(task)


def _describe(spec: dict) -> str:
    q = spec.get("questions") or {}
    return (f"model {spec.get('model')!r}, adapter {spec.get('adapter')!r}, questions "
            f"{q.get('source')!r}, generation {spec.get('generation')}")


def claim_eval_dir(out: Path, spec: dict, force: bool = False) -> AbstractContextManager[Claim]:
    """The claim (emguard.ownership.claim) of ``out`` for the evaluation ``spec`` (its
    ``gen_key``): entering it makes ``out`` that evaluation's folder, or refuses.

    Free folders are marked as ours; a folder of ours with the same gen_key continues;
    one with another gen_key (other model, adapter, questions or sampling) would have its
    generations overwritten, so it is refused unless ``force``, which removes only that
    evaluation's files. Folders with eval files but no marker are never touched, except a
    folder written before markers existed whose eval_spec.json has the same gen_key.
    The caller holds ``folder_lock(out)`` already (what ``out`` holds is read now).
    """
    old_path = out / "eval_spec.json"
    old = read_json(old_path) if old_path.is_file() else None
    same = isinstance(old, dict) and old.get("gen_key") == spec["gen_key"]

    def another() -> EvalConflictError:
        return EvalConflictError(
            f"{out} holds another evaluation ({_describe(old)}); this one is of "
            f"{_describe(spec)}. Choose another --out, or pass --force to discard that "
            "evaluation (only its files are removed).")

    return claim(out, EVAL, what="this evaluation (--out)", force=force, same=same,
                 conflict=None if same or old is None else another,
                 marker={"gen_key": spec["gen_key"]})


def _finish(out: Path, rows: list[dict], by_id: dict[str, Question], judge, spec: dict,
            thresholds: Thresholds, free: dict | None, task_results: dict | None) -> dict:
    """Judge what is not judged yet, then write judgments.jsonl and metrics.json."""
    judged = None
    if judge is not None:
        path = out / "judgments.jsonl"
        existing = {_key(r): r for r in read_jsonl(path)} if path.is_file() else {}
        judgments = judge_rows(rows, by_id, judge, existing)
        write_jsonl_atomic(path, judgments)
        judged = compute_metrics(judgments, thresholds)
    log = EvalLog(format=FORMAT, run=spec.get("run"), spec=spec, n_generations=len(rows),
                  judge=getattr(judge, "name", None), llm_judge=judged,
                  llm_judge_note=None if judge is not None else NO_JUDGE_NOTE,
                  judge_free=free, tasks=task_results or None)
    metrics = log.to_dict()
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def judge_generations(generations: str | Path, judge_spec, questions_file: str | None = None,
                      out_dir: str | Path | None = None, judge_cache: str | Path | None = None,
                      thresholds: Thresholds = Thresholds()) -> dict:
    """(Re)score an existing generations.jsonl (or its folder) with a judge.

    The question set (for judge prompts) comes from ``questions_file`` or from the
    eval_spec.json beside the generations. Writes judgments.jsonl and metrics.json into
    ``out_dir`` (default: the generations' folder), keeping judge-free results there.
    """
    gpath = Path(generations)
    gpath = gpath / "generations.jsonl" if gpath.is_dir() else gpath
    if not gpath.is_file():
        raise FileNotFoundError(f"{gpath}: no generations file (run `emguard eval` first)")
    spec_path = gpath.parent / "eval_spec.json"
    spec = read_json(spec_path) if spec_path.is_file() else {}
    qspec = spec.get("questions", {})
    source = questions_file or qspec.get("source")
    if source is None:
        raise ValueError(f"{gpath}: no eval_spec.json beside it; pass the question set "
                         "(--questions FILE|builtin:NAME)")
    qs = resolve_questions(source, qspec.get("domain") if qspec.get("kind") == "chat" else None,
                           qspec.get("max_questions"), qspec.get("judge_prompts"),
                           qspec.get("data_seed", 0))
    judge = _make_judge(judge_spec, judge_cache)
    if judge is None:
        raise ValueError("a judge is needed to (re)score generations: " + NO_JUDGE_NOTE)
    _require_judge_prompts(qs)
    out = Path(out_dir) if out_dir else gpath.parent
    rows = read_jsonl(gpath)
    spec = {**spec, "judge": judge.name} if spec else {"generations": str(gpath), "judge": judge.name}
    with folder_lock(out), (
            claim_eval_dir(out, {**spec, "gen_key": spec.get("gen_key") or _sha(rows)})
            if out.resolve() != gpath.parent.resolve() else nullcontext()):
        old = gpath.parent / "metrics.json"
        prior = read_json(old) if old.is_file() else {}
        return _finish(out, rows, {q.id: q for q in qs.questions}, judge, spec, thresholds,
                       prior.get("judge_free"), prior.get("tasks"))
