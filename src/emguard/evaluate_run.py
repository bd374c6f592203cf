"""Evaluate a finished run folder: what it held out is read from the folder, never rebuilt.

``evaluate_run(run_dir)`` takes the run's config (its ``eval`` block, optionally
overridden), its adapter (the SafeLoRA-projected one when the run has one; none for the
untrained baseline) and its recorded split (emguard.data.split), and writes:

  RUN/eval/general/    the general questions, if any (+ the benign tasks, scored on the test
                       sets the run recorded: OpSwap's generated test part, FoQA's test
                       split of the source it trained on)
  RUN/eval/general_trigger/  with ``eval.trigger_format``: the general questions and the
                       preference pairs again, each question wrapped in that format
                       (preference margin + sampled, judged answers; no drift, no tasks)
  RUN/eval/indomain/   the run's held-out set (``heldout.jsonl``)
  RUN/eval/trajectory/step-N/{general,indomain}/  with ``train.trajectory_steps``: the
                       judge-free measures of the adapter kept at step N (emguard.trajectory)

Each is an eval folder of emguard.evaluate (cached, resumable); its ``metrics.json``
names the run: path, config hash, method, seed, split seed.
"""

from __future__ import annotations

from pathlib import Path

from emguard.config import ConfigError, EvalSettings, RunConfig, load_run_config
from emguard.data.split import HELDOUT_FILE, SPLIT_FILE
from emguard.evaluate import ModelHolder, run_eval
from emguard.identity import config_sha256
from emguard.io import read_json, write_json_atomic
from emguard.model_card import write_cards
from emguard.tracking import log_run_evaluation
from emguard.trajectory import evaluate_trajectory

EVAL_DIR = "eval"
TRIGGER_PART = "general_trigger"  # the general part asked in eval.trigger_format
SETTINGS_FILE = "settings.json"  # the eval settings of the last complete evaluate_run


class RunNotReadyError(ValueError):
    """The folder is not a finished run (no summary.json, or no recorded split)."""


def load_run(run_dir: str | Path, overrides: list[str] = ()) -> tuple[RunConfig, dict, dict]:
    """(config with ``overrides`` applied to it, summary.json, data_split.json) of a run."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "summary.json", SPLIT_FILE):
        if not (run_dir / name).is_file():
            what = ("the run has not finished (train it first: emguard train / sweep)"
                    if name == "summary.json" else "it is not an emguard run folder, or was "
                    "trained before runs recorded their split (retrain it)")
            raise RunNotReadyError(f"{run_dir}: no {name}: {what}")
    cfg = load_run_config(run_dir / "config.yaml", list(overrides))
    return cfg, read_json(run_dir / "summary.json"), read_json(run_dir / SPLIT_FILE)


def method_of(cfg: RunConfig, summary: dict) -> str:
    """A short name of what the run is: untrained, sft, or its defenses joined by '+'."""
    if not summary.get("trained", True):
        return "untrained"
    return "+".join(summary.get("defenses") or []) or "sft"


def run_info(run_dir: Path, cfg: RunConfig, summary: dict, split: dict) -> dict:
    """What metrics.json says about the run it evaluates."""
    return {"path": str(Path(run_dir).resolve()), "config_sha256": config_sha256(cfg),
            "method": method_of(cfg, summary), "seed": cfg.train.seed,
            "split_seed": split.get("split_seed"), "train_source": split.get("train_source"),
            "heldout_source": split.get("heldout_source"), "model": cfg.model}


def evaluated_adapter(run_dir: Path, summary: dict) -> Path | None:
    """The adapter to evaluate: SafeLoRA's projection if the run made one, else the
    trained adapter, else None (the untrained baseline)."""
    name = (summary.get("safelora") or {}).get("adapter") or summary.get("adapter")
    return Path(run_dir) / name if name else None


def task_data(run_dir: Path, settings: EvalSettings, split: dict) -> dict[str, str | None]:
    """Test data per benign task: what the run recorded, else the eval block's, else
    FoQA's test split of the source the run trained on, else None (the task default)."""
    out: dict[str, str | None] = {}
    for task in settings.tasks:
        recorded = (split.get("tasks") or {}).get(task)
        if recorded:
            out[task] = str(Path(run_dir) / recorded["file"])
        elif task in settings.task_data:
            out[task] = settings.task_data[task]
        elif task == "foqa" and split.get("foqa_source"):
            out[task] = split["foqa_source"]
        else:
            out[task] = None
    return out


def evaluate_run(run_dir: str | Path, overrides: list[str] = (), settings: EvalSettings | None = None,
                 judge=None, parts: tuple[str, ...] = ("general", "indomain"),
                 progress: bool = True, device: str | None = None, force: bool = False) -> dict:
    """Evaluate a run; returns {part: metrics}. ``overrides`` are dotted keys applied to
    the run's config (``eval.judge=openai:gpt-4o-mini``); ``settings`` replaces its eval
    block; ``judge`` (a Judge object) replaces ``settings.judge`` (a sweep loads one judge
    for all runs; ``"none"`` defers judging)."""
    run_dir = Path(run_dir)
    cfg, summary, split = load_run(run_dir, overrides)
    s = settings or cfg.eval
    info = run_info(run_dir, cfg, summary, split)
    adapter = evaluated_adapter(run_dir, summary)
    judge = s.judge if judge is None else judge
    spec = judge if isinstance(judge, str) else "none"  # a Judge object is handed over as is
    model = ModelHolder(cfg.model, adapter, device)  # loaded once, on first use, for both parts
    common = dict(model=model, judge=None if isinstance(judge, str) else judge, device=device,
                  progress=progress, force=force, run=info)
    results = {}
    try:
        if "general" in parts and (s.general_questions or s.tasks):
            results["general"] = run_eval(
                cfg.model, adapter, s.general_pass(task_data(run_dir, s, split), judge=spec),
                run_dir / EVAL_DIR / "general", **common)
        if "general" in parts and s.general_questions and s.trigger_format:
            results[TRIGGER_PART] = run_eval(
                cfg.model, adapter, s.general_pass(judge=spec, trigger=True),
                run_dir / EVAL_DIR / TRIGGER_PART, **common)
        held = split.get("heldout_file")
        if "indomain" in parts and s.indomain and held:
            domain = indomain_domain(cfg, judging=str(judge).lower() != "none")
            results["indomain"] = run_eval(
                cfg.model, adapter, s.indomain_pass(str(run_dir / HELDOUT_FILE), domain, judge=spec),
                run_dir / EVAL_DIR / "indomain", **common)
    finally:
        model.release()
    if set(parts) >= {"general", "indomain"} and s.trajectory and s.judge_free:
        steps = evaluate_trajectory(run_dir, cfg, s, info, indomain_domain(cfg, judging=False),
                                    device=device, progress=progress, force=force)
        if steps:
            results["trajectory"] = steps
    if set(parts) >= {"general", "indomain"}:
        write_json_atomic(run_dir / EVAL_DIR / SETTINGS_FILE, settings_record(s))

    write_cards(run_dir)  # the adapters' cards now show the evaluation (or judging)
    log_run_evaluation(run_dir, cfg.train.report_to, int(summary.get("steps") or 0))
    return results


def settings_record(s: EvalSettings) -> dict:
    """What an evaluation of a run was asked to do, less the judge (judging is a stage of
    its own): a sweep re-evaluates a run whose record differs from the study's settings.
    ``trigger_format`` is left out while unset, so records written before it existed
    still match."""
    exclude = {"judge"} | ({"trigger_format"} if s.trigger_format is None else set())
    return s.model_dump(mode="json", exclude=exclude)


def indomain_domain(cfg: RunConfig, judging: bool = True) -> str | None:
    """The in-domain judge prompt set: ``data.domain``, else ``code`` for the built-in
    code sets; else None without a judge, a ConfigError with one (no prompts fit an
    unknown domain)."""
    if cfg.data.domain:
        return cfg.data.domain
    sources = " ".join(filter(None, [cfg.data.train, cfg.data.heldout]))
    if "-code" in sources and "builtin:" in sources:
        return "code"
    if cfg.eval.indomain_judge_prompts is not None:
        return "custom"
    if not judging:
        return None
    raise ConfigError(f"data.domain: set it to code or advice (or eval.indomain_judge_prompts) "
                      f"to judge the in-domain answers of '{cfg.data.train}'")
