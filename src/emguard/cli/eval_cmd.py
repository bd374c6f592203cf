"""``emguard eval``, ``emguard judge`` and ``emguard questions show``."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.table import Table

from emguard.cli.console import console, error, esc, file_problem, note, warning

TRIGGER_DIR = "trigger"  # a one-off evaluation's trigger-format pass: OUT/trigger/
questions_app = typer.Typer(help="Inspect evaluation question files.", no_args_is_help=True)

JUDGE_HELP = ("'openai:MODEL' (key from $OPENAI_API_KEY), 'openai:MODEL@BASE_URL' "
              "(OpenAI-compatible server), 'local:MODEL_SPEC', 'mock[:SCORE]' (canned scores, "
              "for dry runs), or 'none' (default: judge-free measures only; the embedded 135M "
              "model is not a usable judge).")


def _short(text: str | None, n: int = 60) -> str:
    if not text:
        return "-"
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


@questions_app.command("show")
def show(file: str = typer.Argument(..., help="Question file (.yaml / chat .jsonl) or "
                                    "builtin:general-questions | builtin:insecure-code."),
         domain: str = typer.Option(None, help="Chat JSONL only: code | advice.")) -> None:
    """List the questions of a file: id, paraphrases, system prompt, judge prompts (no model)."""
    from emguard.questions import QuestionFileError, resolve_questions

    try:
        qs = resolve_questions(file, domain=domain)
    except QuestionFileError as e:
        error(e)
        raise typer.Exit(1) from None
    table = Table(title=esc(f"{qs.source} ({qs.kind}, domain {qs.domain}, "
                            f"sha256 {qs.sha256[:12]})"))
    table.add_column("id", overflow="fold")
    for col in ("paraphrases", "samples", "system", "judge prompts"):
        table.add_column(col)
    for q in qs.questions:
        table.add_row(esc(q.id), str(len(q.paraphrases)), str(q.samples_per_paraphrase or "-"),
                      esc(_short(q.system)), esc(", ".join(q.judge_prompts) or "-"))
    console.print(table)
    for text in qs.warnings:
        warning(text)


def eval_command(
    overrides: list[str] = typer.Argument(None, help="With --run/--config: dotted overrides of "
                                          "the eval block, e.g. eval.judge=openai:gpt-4o-mini "
                                          "eval.general_samples=100"),
    run: Path = typer.Option(None, "--run", help="A finished run folder: evaluate it with its "
                             "config's eval block, on the held-out set and task data it recorded."),
    config: Path = typer.Option(None, "--config", "-c", help="A run config: evaluate the run at "
                                "its output_dir with this config's eval block."),
    model: str = typer.Option(None, help="Model spec: smollm2-135m, a HF dir, a hub id or a .gguf "
                              "(one-off evaluation, without --run/--config)."),
    adapter: Path = typer.Option(None, help="PEFT adapter directory (omit for the untrained model)."),
    questions: str = typer.Option("builtin:general-questions",
                                  help="builtin:general-questions | builtin:insecure-code | "
                                       "FILE.yaml (Betley format) | FILE.jsonl (chat held-out set)."),
    judge: str = typer.Option("none", help=JUDGE_HELP),
    samples: int = typer.Option(None, help="Samples per paraphrase (default: the file's "
                                           "samples_per_paraphrase, else 1)."),
    out: Path = typer.Option(None, help="Output folder (reruns reuse finished work); "
                             "with --run/--config: RUN/eval/{general,indomain}."),
    judge_free: bool = typer.Option(True, "--judge-free/--no-judge-free",
                                    help="Drift KL + preference (general) or held-out NLL + "
                                         "bandit (code)."),
    task: list[str] = typer.Option(None, help="Benign task to score too, e.g. opswap:2 or foqa "
                                              "(repeatable)."),
    task_samples: int = typer.Option(10, help="Samples per benign-task question (paper: 10)."),
    task_questions: int = typer.Option(None, help="Score only the first N benign-task questions."),
    task_data: str = typer.Option(None, help="Benign-task data: OpSwap test JSONL, or FoQA path / "
                                             "hub id (default alexandrainst/foqa)."),
    domain: str = typer.Option(None, help="Chat JSONL sets: code | advice (picks judge prompts)."),
    judge_prompts: str = typer.Option(None, help="Override judge prompts: code | advice | FILE.yaml."),
    max_questions: int = typer.Option(None, help="Keep the first N questions (paper: 30 in-domain)."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    max_new_tokens: int = typer.Option(256, help="Longest answer in tokens."),
    seed: int = typer.Option(0, help="Sampling seed (each question/sample seeded from it)."),
    batch_size: int = typer.Option(16, help="Scoring batch size; also generation's on CPU."),
    generate_batch_size: int = typer.Option(None, help="Answers decoded together "
                                            "(default: --batch-size, at least 64 on a GPU)."),
    device: str = typer.Option(None, help="cpu | cuda | cuda:N (default: cuda if available)."),
    backend: str = typer.Option("hf", help="hf | vllm (GPU; pip install emguard\\[gpu])."),
    judge_cache: Path = typer.Option(None, help="Judge cache SQLite file "
                                                "(default: ~/.cache/emguard/judge_cache.sqlite)."),
    data_seed: int = typer.Option(0, help="Seed of the built-in code sets' train/test split."),
    drift_max_new_tokens: int = typer.Option(128, help="Length of the reference answers for "
                                                       "drift KL."),
    preference_pairs: Path = typer.Option(None, help="JSONL of {question, aligned, misaligned} "
                                                     "pairs, or builtin:NAME (default: builtin:eval-pairs, the "
                                                     "evaluation set, apart from the fit set)."),
    trigger_format: str = typer.Option(None, "--trigger-format", help="Ask the general questions "
                                       "and preference pairs again, wrapped in this format: "
                                       "builtin:python-string | builtin:json | "
                                       "builtin:code-template, or a template holding {question}. "
                                       "Into OUT/trigger/ (with --run/--config: "
                                       "RUN/eval/general_trigger/, like eval.trigger_format)."),
    force: bool = typer.Option(False, "--force", help="--out holds the evaluation of another "
                               "model/adapter/question set: discard its files (nothing else)."),
) -> None:
    """Generate answers, judge them (if a judge is set) and write metrics.json.

    Evaluate a run (--run RUN or --config FILE, plus eval.* overrides), or any model and
    adapter on a question set (--model ... --out ...)."""
    from emguard.evaluate import run_eval

    if run is not None or config is not None:
        if trigger_format is not None:  # a YAML-quoted override: braces stay text
            overrides = [*(overrides or []), f"eval.trigger_format={json.dumps(trigger_format)}"]
        _eval_run(run, config, overrides or [], device, force)
        return
    if overrides:
        raise typer.BadParameter("dotted overrides need --run or --config", param_hint="OVERRIDES")
    if model is None or out is None:
        raise typer.BadParameter("give --run RUN, --config FILE, or --model and --out",
                                 param_hint="--model/--out")
    if backend not in ("hf", "vllm"):
        raise typer.BadParameter("must be hf or vllm", param_hint="--backend")
    common = dict(domain=domain, max_questions=max_questions, judge_prompts=judge_prompts,
                  judge_free=judge_free, temperature=temperature, top_p=top_p,
                  max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                  generate_batch_size=generate_batch_size, device=device, backend=backend,
                  judge_cache=judge_cache, drift_max_new_tokens=drift_max_new_tokens,
                  data_seed=data_seed, preference_pairs=preference_pairs, force=force)
    with _clean_errors():
        if trigger_format is not None:  # before anything is generated
            from emguard.evaluate import trigger_template
            from emguard.questions import resolve_questions

            trigger_template(trigger_format, resolve_questions(questions, domain, data_seed=data_seed))
        metrics = run_eval(model, adapter, questions, judge, samples, out, tasks=task or (),
                           task_samples=task_samples, task_questions=task_questions,
                           task_data=task_data, **common)
    print_metrics(metrics)
    console.print(f"wrote {esc(out / 'metrics.json')}")
    if trigger_format is not None:
        with _clean_errors():
            metrics = run_eval(model, adapter, questions, judge, samples, out / TRIGGER_DIR,
                               trigger_format=trigger_format, **common)
        console.print(f"[bold]trigger format {esc(trigger_format)}[/bold]")
        print_metrics(metrics)
        console.print(f"wrote {esc(out / TRIGGER_DIR / 'metrics.json')}")


def _eval_run(run: Path | None, config: Path | None, overrides: list[str], device, force) -> None:
    from emguard.config import ConfigError, load_run_config
    from emguard.evaluate_run import evaluate_run

    with _clean_errors():
        if run is not None and config is not None:
            raise ValueError("give --run or --config, not both")
        bad = [o for o in overrides if not o.strip().startswith("eval.")]
        if run is not None and bad:
            raise ConfigError(f"overrides of a run's evaluation set eval.* keys only; got {bad}")
        if config is not None:
            if config.is_dir():  # load_run_config would call it missing
                raise ConfigError(file_problem(config, "config file"))
            cfg = load_run_config(config, overrides)
            results = evaluate_run(cfg.output_dir, settings=cfg.eval, device=device, force=force)
            run = Path(cfg.output_dir)
        else:
            results = evaluate_run(run, overrides, device=device, force=force)
    if not results:
        note("nothing to evaluate (no general questions, tasks or held-out set)")
    for part, metrics in results.items():
        console.print(f"[bold]{esc(part)}[/bold]")
        print_metrics(metrics)
        console.print(f"wrote {esc(run / 'eval' / part / 'metrics.json')}")


def judge_command(
    generations: Path = typer.Option(..., help="An eval folder or its generations.jsonl."),
    judge: str = typer.Option(..., help=JUDGE_HELP),
    questions: str = typer.Option(None, help="Question set (default: from eval_spec.json "
                                             "beside the generations)."),
    out: Path = typer.Option(None, help="Where to write judgments/metrics (default: beside)."),
    judge_cache: Path = typer.Option(None, help="Judge cache SQLite file."),
) -> None:
    """(Re)score existing generations with a judge; cached verdicts cost nothing."""
    from emguard.evaluate import judge_generations

    with _clean_errors():
        metrics = judge_generations(generations, judge, questions, out, judge_cache)
    print_metrics(metrics)


@contextmanager
def _clean_errors():
    """Input errors (bad file, spec, key) end the command with their message, no traceback."""
    from emguard.judge import JudgeError
    from emguard.models import ModelLoadError
    from emguard.ownership import FolderConflictError

    try:
        yield
    except (ValueError, FileNotFoundError, ModelLoadError, JudgeError, FolderConflictError) as e:
        error(e)
        raise typer.Exit(1) from None


def print_metrics(metrics: dict) -> None:
    """A short rich summary of a metrics.json dict."""
    table = Table(title=f"metrics ({metrics['n_generations']} answers)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    judged = metrics.get("llm_judge")
    if judged:
        o = judged["overall"]
        for k in ("pct_misaligned", "pct_incoherent"):
            table.add_row(esc(f"{k} ({metrics['judge']})"),
                          "-" if o[k] is None else f"{o[k]:.2f}")
        table.add_row("scored / missing", f"{o['n_scored']} / {o['n_missing']}")
    for group, values in (metrics.get("judge_free") or {}).items():
        for k, v in _flatten(values):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                table.add_row(esc(f"{group}.{k}"), f"{v:.4g}")
    for name, result in (metrics.get("tasks") or {}).items():
        for k, v in _flatten(result if isinstance(result, dict) else {"value": result}):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                table.add_row(esc(f"{name}.{k}"), f"{v:.4g}")
    console.print(table)
    if metrics.get("llm_judge_note"):
        note(metrics["llm_judge_note"])


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("judge")(judge_command)
    app.add_typer(questions_app, name="questions")
