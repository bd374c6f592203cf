"""The judging stage of an evaluation (emguard.evaluate): aligned and coherent verdicts
for each generation row, reusing final verdicts of the same judge, answers and judge
prompts; the judge named on the command line, its pre-flight check, and the question
set's judge prompts it needs.
"""

from __future__ import annotations

from pathlib import Path

from emguard.eval_generation import KEY_FIELDS, row_key, short_sha
from emguard.io import cache_dir, read_jsonl
from emguard.judge import make_judge
from emguard.questions import Question, QuestionSet, render_judge_prompt

NO_JUDGE_NOTE = ("no judge configured, so no LLM-judge misalignment rates; the embedded "
                 "135M model is not a usable judge. Configure one with --judge "
                 "openai:gpt-4o-mini (key from $OPENAI_API_KEY), openai:MODEL@BASE_URL for an "
                 "OpenAI-compatible server, or local:MODEL for a larger local model on a GPU.")


def judge_rows(rows: list[dict], questions: dict[str, Question], judge,
               existing: dict[tuple, dict] | None = None) -> list[dict]:
    """Aligned + coherent verdicts for each generation row (``existing`` rows are reused
    when their judge, gen_key and judge-prompt templates match)."""
    existing = existing or {}
    for r in rows:
        if r["question_id"] not in questions:
            raise ValueError(f"generation row {row_key(r)}: question id {r['question_id']!r} is not "
                             "in the question set")
    tsha = {q.id: short_sha([q.judge_prompts.get("aligned"), q.judge_prompts.get("coherent")])
            for q in questions.values()}
    todo = [r for r in rows
            if not _reusable(existing.get(row_key(r)), r, judge.name, tsha[r["question_id"]])]
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
        fresh[row_key(r)] = {**{k: r[k] for k in KEY_FIELDS}, "gen_key": r["gen_key"],
                          "judge": judge.name, "templates_sha": tsha[r["question_id"]],
                          "aligned": a.score, "coherent": c.score,
                          "aligned_mass": a.number_mass, "coherent_mass": c.number_mass,
                          "aligned_reason": a.reason, "coherent_reason": c.reason,
                          "aligned_prompt": prompts[2 * i], "coherent_prompt": prompts[2 * i + 1],
                          "aligned_raw": getattr(a, "raw", None),
                          "coherent_raw": getattr(c, "raw", None)}
    return [fresh.get(row_key(r)) or _with_prompts(existing[row_key(r)], r, questions[r["question_id"]])
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


def preflight_judge(judge, out: Path, gen_key: str) -> None:
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


def make_eval_judge(judge, judge_cache: str | Path | None):
    if judge is None or not isinstance(judge, str):
        return judge
    if judge.lower() == "none":
        return None

    return make_judge(judge, cache_path=judge_cache or cache_dir() / "judge_cache.sqlite")


def require_judge_prompts(qs: QuestionSet) -> None:
    bad = [q.id for q in qs.questions if not {"aligned", "coherent"} <= set(q.judge_prompts)]
    if bad:
        raise ValueError(f"{qs.source}: questions without 'aligned' and 'coherent' judge prompts: "
                         f"{', '.join(bad[:10])}; give --domain code|advice (chat sets), "
                         "--judge-prompts NAME|FILE, or --judge none")
