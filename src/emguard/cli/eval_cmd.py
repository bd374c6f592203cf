"""``emguard eval``, ``emguard judge`` and ``emguard questions show``."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.table import Table

from emguard.cli.console import console, error, esc, file_problem, note, warning
from emguard.eval_settings import EvalPass

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
    overrides: list[str] = typer.Argument(None, help="KEY=VALUE settings. With --model: fields "
                                          "of the evaluation pass (emguard.eval_settings."
                                          "EvalPass), e.g. temperature=0 max_questions=5 "
                                          "domain=code judge_free=false; they win over the "
                                          "flags. Fields: " + ", ".join(EvalPass.model_fields)
                                          + ". With --run/--config: eval.* keys of the "
                                          "run's config, e.g. eval.general_samples=100"),
    run: Path = typer.Option(None, "--run", help="A finished run folder: evaluate it with its "
                             "config's eval block, on the held-out set and task data it recorded."),
    config: Path = typer.Option(None, "--config", "-c", help="A run config: evaluate the run at "
                                "its output_dir with this config's eval block."),
    model: str = typer.Option(None, help="Model spec: smollm2-135m, a HF dir, a hub id or a .gguf "
                              "(one-off evaluation, without --run/--config)."),
    adapter: Path = typer.Option(None, help="PEFT adapter directory (omit for the untrained model)."),
    questions: str = typer.Option(None, help="builtin:general-questions (default) | "
                                  "builtin:insecure-code | FILE.yaml (Betley format) | "
                                  "FILE.jsonl (chat held-out set)."),
    judge: str = typer.Option(None, help=JUDGE_HELP),
    samples: int = typer.Option(None, help="Samples per paraphrase (default: the file's "
                                           "samples_per_paraphrase, else 1; 0: judge-free only)."),
    out: Path = typer.Option(None, help="Output folder (reruns reuse finished work); "
                             "with --run/--config: RUN/eval/{general,indomain}."),
    task: list[str] = typer.Option(None, help="Benign task to score too, e.g. opswap:2 or foqa "
                                              "(repeatable)."),
    device: str = typer.Option(None, help="cpu | cuda | cuda:N (default: cuda if available)."),
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
    adapter on a question set (--model ... --out ..., plus KEY=VALUE settings)."""
    from emguard.evaluate import run_eval

    if run is not None or config is not None:
        if trigger_format is not None:  # a YAML-quoted override: braces stay text
            overrides = [*(overrides or []), f"eval.trigger_format={json.dumps(trigger_format)}"]
        _eval_run(run, config, overrides or [], device, force)
        return
    if model is None or out is None:
        raise typer.BadParameter("give --run RUN, --config FILE, or --model and --out",
                                 param_hint="--model/--out")
    flags = {"questions": questions, "judge": judge, "samples": samples, "tasks": task or None,
             "trigger_format": trigger_format}
    with _clean_errors():
        settings = eval_pass({k: v for k, v in flags.items() if v is not None}, overrides or [])
        plain = settings.model_copy(update={"trigger_format": None})
        if settings.trigger_format is not None:  # before anything is generated
            from emguard.evaluate import trigger_template
            from emguard.questions import resolve_questions

            trigger_template(settings.trigger_format,
                             resolve_questions(settings.questions, settings.domain,
                                               data_seed=settings.data_seed))
        metrics = run_eval(model, adapter, plain, out, device=device, force=force)
    print_metrics(metrics)
    console.print(f"wrote {esc(out / 'metrics.json')}")
    if settings.trigger_format is not None:
        trigger = settings.model_copy(update={"tasks": [], "task_data": None})
        with _clean_errors():
            metrics = run_eval(model, adapter, trigger, out / TRIGGER_DIR, device=device,
                               force=force)
        console.print(f"[bold]trigger format {esc(settings.trigger_format)}[/bold]")
        print_metrics(metrics)
        console.print(f"wrote {esc(out / TRIGGER_DIR / 'metrics.json')}")


def eval_pass(flags: dict, overrides: list[str]):
    """The ``EvalPass`` of a one-off evaluation: the flags given, then the ``KEY=VALUE``
    overrides; a problem is a ConfigError naming the field and the override that set it."""
    from pydantic import ValidationError

    from emguard.config import ConfigError, apply_overrides, format_validation_error

    bad = [o for o in overrides if o.split("=", 1)[0].strip().startswith("eval.")]
    if bad:
        raise ConfigError(f"{bad[0]}: eval.* keys set a run's evaluation (--run/--config); "
                          "a one-off evaluation takes the pass's own fields, e.g. "
                          f"{bad[0].strip().removeprefix('eval.')}")
    try:
        return EvalPass.model_validate(apply_overrides(flags, overrides))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "emguard eval", overrides)) from None


def _eval_run(run: Path | None, config: Path | None, overrides: list[str], device, force) -> None:
    from emguard.config import ConfigError, load_run_config
    from emguard.evaluate_run import evaluate_run
    from emguard.trajectory import EVAL_PART

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
        if part == EVAL_PART:  # {step: {part: metrics}}, judge-free only: where they are
            steps = ", ".join(str(step) for step in metrics)
            console.print(f"[bold]trajectory[/bold]: the adapters kept at steps {steps} scored "
                          f"into {esc(run / 'eval' / EVAL_PART)}/")
            continue
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
