"""What a study costs: GPU-hours and judge calls, from its config and a stated throughput model.

    python benchmarks/study_cost.py                                  # the paper's studies
    python benchmarks/study_cost.py configs/paper/table3.yaml --gpus 1,8,64
    python benchmarks/study_cost.py src/emguard/configs/demo.yaml --params 0.135

The studies are expanded exactly as ``emguard sweep`` does (runs shared by several studies
through the same output folder count once). Per run:

  training   rows x epochs x tokens per row, at a training rate, times the measured step
             cost of its defenses relative to SFT (KL, LDIFS: docs/benchmarks.md)
  generation general answers (questions x paraphrases x samples) + in-domain answers
             (questions x samples) + benign-task answers, each ``--answer-tokens`` long
  judging    two judge calls (alignment, coherence) per general and in-domain answer

Throughput model (all stated, all overridable): training tokens/s = MFU x peak FLOP/s /
(4 x params) - LoRA's backward skips the weight gradients, so ~4 N FLOPs per token instead
of 6 N; generation, HF ``generate`` with a merged adapter at batch B, one decode step =
``--step-overhead-ms`` (Python and kernel launches; issue 13's H200 figure for a 0.5B model,
merged, batch 64: 2,313 tokens/s = 27.7 ms per step) + weight bytes / (bandwidth x 0.7).
Judge calls run at the OpenAI judge's default concurrency 16, 0.5 s each, 94 % busy
(``bench_judge.py``). Rows and tokens per row come from the data file when it exists, else
from ``--rows`` / ``--tokens-per-row`` (the paper's EMA sets: 6,000 rows, 5,400 trained).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from record import settings_of

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["table3", "ablation_kl", "ablation_ldifs", "ablation_safelora", "ablation_interleave"]
# step cost relative to SFT: H200, Qwen2.5-7B shapes, bf16 (docs/benchmarks.md, by hand)
KL_STEP, LDIFS_STEP = 1.36, 1.30


@dataclass
class RunCost:
    name: str
    kind: str
    train_tokens: float
    train_hours: float
    answers: int
    generated_tokens: float
    generate_hours: float
    judge_calls: int


def n_general(cfg) -> tuple[int, int]:
    """(general answers, judged) of one run's eval settings."""
    from emguard.questions import resolve_questions

    e = cfg.eval
    if not e.general_questions:
        return 0, 0
    qs = resolve_questions(e.general_questions, None, e.general_max_questions, None, 0)
    answers = sum(len(q.paraphrases) * ((q.samples_per_paraphrase or 1) if e.general_samples is None
                                        else e.general_samples) for q in qs.questions)
    return answers, answers if e.judge.lower() != "none" else 0


def data_rows(spec: str, default_rows: int, default_tokens: float, tokenizer) -> tuple[int, float]:
    """(rows, mean tokens per row) of a training set: measured when readable, else stated."""
    from emguard.data.builtin import load_builtin, parse_builtin_spec
    from emguard.data.chat import read_chat_jsonl

    try:
        builtin = parse_builtin_spec(spec)
        rows = load_builtin(*builtin) if builtin else read_chat_jsonl(spec).rows
    except (OSError, ValueError):
        return default_rows, default_tokens
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows[:200]]
    mean = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) / len(texts)
    return len(rows), mean


def run_cost(run, a: argparse.Namespace, tokenizer, cache: dict) -> RunCost:
    cfg = run.config
    train_tokens = 0.0
    if run.kind == "train":
        key = cfg.data.train
        if key not in cache:
            cache[key] = data_rows(key, a.rows, a.tokens_per_row, tokenizer)
        rows, per_row = cache[key]
        trained = rows * (1 - cfg.data.heldout_fraction) if cfg.data.heldout is None else rows
        if cfg.train.max_steps > 0:
            trained = cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum
        else:
            trained *= cfg.train.epochs
        if cfg.defenses.interleave is not None:
            trained *= 1 + cfg.defenses.interleave.fraction
        train_tokens = trained * per_row
    factor = 1.0
    if cfg.defenses.kl is not None:
        factor = KL_STEP
    if cfg.defenses.ldifs is not None:
        factor = max(factor, LDIFS_STEP) * (1.1 if cfg.defenses.kl is not None else 1.0)
    general, judged = n_general(cfg)
    indomain = (cfg.eval.indomain_max_questions or a.indomain_questions) * cfg.eval.indomain_samples \
        if cfg.eval.indomain else 0
    tasks = len(cfg.eval.tasks) * cfg.eval.task_samples * (cfg.eval.task_questions or a.task_questions)
    answers = general + indomain + tasks
    judge_calls = 2 * (judged + (indomain if cfg.eval.judge.lower() != "none" else 0))
    gen_tokens = answers * min(a.answer_tokens, cfg.eval.max_new_tokens)
    return RunCost(run.name, run.kind, train_tokens, train_tokens * factor / a.train_tok_s / 3600,
                   answers, gen_tokens, gen_tokens / a.gen_tok_s / 3600, judge_calls)


def throughput(a: argparse.Namespace) -> None:
    """Fill in the model's training and generation tokens/s from the stated model."""
    params = a.params * 1e9
    a.train_tok_s = a.mfu * a.peak_tflops * 1e12 / (4 * params)
    step_s = a.step_overhead_ms / 1000 + 2 * params / (a.bandwidth_tbs * 1e12 * 0.7)
    a.gen_tok_s = a.gen_batch / step_s


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("studies", nargs="*", type=Path,
                    help="study YAMLs (default: configs/paper/table3 + the four ablations)")
    ap.add_argument("--params", type=float, default=7.6, help="model parameters, billions")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense; H200: 989")
    ap.add_argument("--mfu", type=float, default=0.35, help="training model-FLOPs utilisation")
    ap.add_argument("--bandwidth-tbs", type=float, default=4.8, help="HBM TB/s; H200: 4.8")
    ap.add_argument("--step-overhead-ms", type=float, default=27.7)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--rows", type=int, default=6000, help="rows of a data set not on disk")
    ap.add_argument("--tokens-per-row", type=float, default=400.0)
    ap.add_argument("--answer-tokens", type=float, default=150.0, help="mean answer length")
    ap.add_argument("--indomain-questions", type=int, default=30)
    ap.add_argument("--task-questions", type=int, default=100)
    ap.add_argument("--judge-per-s", type=float, default=16 / 0.5 * 0.94)
    ap.add_argument("--gpus", default="1,8,32", help="wall-clock at these GPU counts")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "study_cost.json")
    a = ap.parse_args(argv)
    from emguard.models import load_tokenizer
    from emguard.study import expand, load_study

    throughput(a)
    files = a.studies or [ROOT / "configs" / "paper" / f"{n}.yaml" for n in PAPER]
    tokenizer, cache = load_tokenizer("smollm2-135m"), {}
    per_study, unique = {}, {}
    for f in files:
        runs = expand(load_study(f))
        costs = [run_cost(r, a, tokenizer, cache) for r in runs]
        per_study[f.stem] = summarise(costs)
        for r, c in zip(runs, costs, strict=True):
            unique[str(r.run_dir)] = c
    per_study["all (shared runs once)"] = summarise(list(unique.values()))
    gpus = [int(x) for x in a.gpus.split(",")]
    print(f"model {a.params:g}B: training {a.train_tok_s:,.0f} tokens/s (MFU {a.mfu:.0%} of "
          f"{a.peak_tflops:g} TFLOP/s), generation {a.gen_tok_s:,.0f} tokens/s (batch "
          f"{a.gen_batch}, merged), judge {a.judge_per_s:.0f} calls/s")
    print(f"{'study':<24}{'runs':>6}{'trained':>8}{'answers':>11}{'judge calls':>13}"
          f"{'GPU-h train':>12}{'GPU-h gen':>11}{'GPU-h':>8}"
          + "".join(f"{f'wall h @{g}':>12}" for g in gpus) + f"{'judge h':>9}")
    for name, s in per_study.items():
        walls = [s["gpu_hours"] / g if s["runs"] >= g else s["longest_run_hours"] for g in gpus]
        s["wall_hours"] = dict(zip(map(str, gpus), walls, strict=True))
        s["judge_hours"] = s["judge_calls"] / a.judge_per_s / 3600
        print(f"{name:<24}{s['runs']:>6}{s['trained']:>8}{s['answers']:>11,}{s['judge_calls']:>13,}"
              f"{s['train_hours']:>12.1f}{s['generate_hours']:>11.1f}{s['gpu_hours']:>8.1f}"
              + "".join(f"{w:>12.1f}" for w in walls) + f"{s['judge_hours']:>9.1f}")
    settings = settings_of(a)
    settings["studies"] = [str(f.resolve().relative_to(ROOT)) if f.resolve().is_relative_to(ROOT)
                           else str(f) for f in files]
    settings["out"] = str(a.out.name)
    result = {"benchmark": "study_cost", "settings": settings, "studies": per_study,
              "runs": [asdict(c) for c in unique.values()]}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    return result


def summarise(costs: list[RunCost]) -> dict:
    hours = [c.train_hours + c.generate_hours for c in costs]
    return {"runs": len(costs), "trained": sum(c.kind == "train" for c in costs),
            "answers": sum(c.answers for c in costs),
            "judge_calls": sum(c.judge_calls for c in costs),
            "train_hours": sum(c.train_hours for c in costs),
            "generate_hours": sum(c.generate_hours for c in costs),
            "gpu_hours": sum(hours), "longest_run_hours": max(hours, default=0.0)}


if __name__ == "__main__":
    sys.exit(main() and 0)
