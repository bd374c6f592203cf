"""Evaluate one model (+ adapter) on a question set: generate, judge, score.

``run_eval(model, adapter, settings, out)`` runs one pass; ``settings`` is an
emguard.eval_settings.EvalPass (what is asked, how answers are sampled and judged).
This module is the orchestration: which questions (leak_free_questions), the eval
folder's claim, run_eval and judge_generations. The stages live apart:
emguard.eval_generation (planning rows, the model holder, generations.jsonl),
emguard.eval_judging (judge verdicts, judgments.jsonl's rows, the judge's pre-flight)
and emguard.eval_judge_free (judge_free.json, reference answers and margins, benign
tasks). The names other modules use are re-exported here (``__all__``).

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

Trigger format (``EvalPass(trigger_format=...)``): the same layout for a general set whose
questions, and the preference pairs' questions, are all wrapped in one template
(emguard.questions.resolve_trigger_format); the judge sees the wrapped question. Its
judge-free part is the preference margin only (no drift KL). It is an evaluation of its
own, written into its own folder beside the plain one (``RUN/eval/general_trigger/``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from emguard.data.split import recorded_split_of, trained_on
from emguard.eval_generation import (
    GenerationSettings,
    ModelHolder,
    adapter_fingerprint,
    generate_rows,
    plan_rows,
    row_key,
    short_sha,
)
from emguard.eval_judge_free import judge_free_results, judge_free_summary, score_task
from emguard.eval_judging import (
    NO_JUDGE_NOTE,
    judge_rows,
    make_eval_judge,
    preflight_judge,
    require_judge_prompts,
)
from emguard.eval_log import FORMAT, EvalLog
from emguard.eval_settings import EvalPass
from emguard.io import (
    provenance,
    read_json,
    read_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
)
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
    resolve_questions,
    resolve_trigger_format,
    wrap_question_set,
)

__all__ = [
    # defined here: the orchestration
    "EvalConflictError",
    "EvalPass",
    "claim_eval_dir",
    "judge_generations",
    "leak_free_questions",
    "run_eval",
    "trigger_template",
    # the stages' names other modules import from here
    "NO_JUDGE_NOTE",
    "GenerationSettings",
    "ModelHolder",
    "adapter_fingerprint",
    "judge_free_summary",
    "judge_rows",
    "plan_rows",
]

logger = logging.getLogger(__name__)


class EvalConflictError(FolderConflictError):
    """The output folder holds the evaluation of something else."""


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


def run_eval(model_spec: str, adapter_dir: str | Path | None, settings: EvalPass,
             out_dir: str | Path, *, judge=None, device: str | None = None,
             thresholds: Thresholds = Thresholds(), progress: bool = True, force: bool = False,
             run: dict | None = None, model: ModelHolder | None = None) -> dict:
    """Generate, judge and score one model (+ adapter) on one question set, as ``settings``
    (emguard.eval_settings.EvalPass) asks; returns metrics.json's dict.

    ``judge``: a Judge object used in place of ``settings.judge`` (a sweep shares one).
    ``run``: what was trained (emguard.evaluate_run), recorded in eval_spec.json and
    metrics.json. ``model``: a ModelHolder of the same model and adapter, shared by several
    calls so the model loads once (the caller releases it). See the module doc for the
    folder layout and how reruns reuse finished work. An ``out_dir`` holding the evaluation
    of another model, adapter, question set or generation setting is refused (``force``:
    discard that evaluation's files first).
    """
    s = settings
    if judge is not None and s.samples == 0 and s.questions is not None:
        raise ValueError(f"samples=0 samples no answers, so the judge {judge.name} has nothing "
                         "to score; use no judge (judge-free measures only) or at least 1 sample")
    out = Path(out_dir)
    check_writable_target(out)
    _check_inputs(model_spec, adapter_dir, device)
    with folder_lock(out):  # one process at a time writes an eval folder
        judge_free = s.judge_free and s.questions is not None
        if s.questions is None:  # benign tasks only
            qs, judge = QuestionSet([], "none", short_sha([]), "none", "none"), None
        else:
            qs = leak_free_questions(adapter_dir, s.questions, s.domain, s.max_questions,
                                     s.judge_prompts, s.data_seed)
            judge = judge or make_eval_judge(s.judge, s.judge_cache)
        trigger = trigger_template(s.trigger_format, qs, s.tasks)
        if trigger is not None:
            qs = wrap_question_set(qs, trigger)
        if judge is not None:
            require_judge_prompts(qs)
        gen = GenerationSettings(s.samples, s.temperature, s.top_p, s.max_new_tokens, s.seed,
                                 s.backend)
        spec = {"model": model_spec, "adapter": str(adapter_dir) if adapter_dir else None,
                "adapter_sha256": adapter_fingerprint(adapter_dir),
                "questions": {"source": qs.source, "sha256": qs.sha256, "kind": qs.kind,
                              "domain": qs.domain, "n_questions": len(qs.questions),
                              "max_questions": s.max_questions, "judge_prompts": s.judge_prompts,
                              "data_seed": s.data_seed,
                              "skipped": qs.skipped, "warnings": qs.warnings},
                "generation": gen.as_dict(), "judge": getattr(judge, "name", None),
                "run": run}
        if trigger is not None:
            spec["questions"]["trigger_format"] = {"spec": s.trigger_format, "template": trigger}
        spec["gen_key"] = short_sha({k: spec[k] for k in ("model", "adapter_sha256", "generation")}
                                    | {"questions": qs.sha256, "max_questions": s.max_questions})
        spec["provenance"] = provenance()
        with claim_eval_dir(out, spec, force):
            if judge is not None:
                preflight_judge(judge, out, spec["gen_key"])
            write_json_atomic(out / "eval_spec.json", spec)

        holder = model or ModelHolder(model_spec, adapter_dir, device)
        if (holder.spec, holder.adapter_dir) != (model_spec, adapter_dir):
            raise ValueError(f"the shared model is {holder.spec} + {holder.adapter_dir}, "
                             f"not {model_spec} + {adapter_dir}")
        by_id = {q.id: q for q in qs.questions}
        rows = generate_rows(out, plan_rows(qs.questions, s.samples), by_id, gen, spec["gen_key"],
                             holder, spec, s.batch_size, s.generate_batch_size, progress)
        free = (judge_free_results(out, qs, rows, holder, spec, s.preference_pairs,
                                   s.preference_max_pairs, s.drift_max_new_tokens, s.batch_size,
                                   progress, trigger)
                if judge_free else None)
        task_results = {t: score_task(out, t, holder, gen, spec, s.task_samples, s.task_questions,
                                      s.task_data_of(t), s.batch_size) for t in s.tasks}
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


def _check_inputs(model_spec: str, adapter_dir, device: str | None) -> None:
    """Everything about the subject that can be checked before any model is loaded."""
    from emguard.models import check_adapter_dir, check_device, resolve_model_source

    check_device(device)
    resolve_model_source(model_spec)
    if adapter_dir is not None:
        check_adapter_dir(adapter_dir, "--adapter ")


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
        existing = {row_key(r): r for r in read_jsonl(path)} if path.is_file() else {}
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
    judge = make_eval_judge(judge_spec, judge_cache)
    if judge is None:
        raise ValueError("a judge is needed to (re)score generations: " + NO_JUDGE_NOTE)
    require_judge_prompts(qs)
    out = Path(out_dir) if out_dir else gpath.parent
    rows = read_jsonl(gpath)
    spec = {**spec, "judge": judge.name} if spec else {"generations": str(gpath), "judge": judge.name}
    with folder_lock(out), (
            claim_eval_dir(out, {**spec, "gen_key": spec.get("gen_key") or short_sha(rows)})
            if out.resolve() != gpath.parent.resolve() else nullcontext()):
        old = gpath.parent / "metrics.json"
        prior = read_json(old) if old.is_file() else {}
        return _finish(out, rows, {q.id: q for q in qs.questions}, judge, spec, thresholds,
                       prior.get("judge_free"), prior.get("tasks"))
