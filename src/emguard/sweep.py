"""Run a study (emguard.study): train -> (SafeLoRA) -> evaluate every run, then judge.

Stages of one run, each skipped when its output is already complete:

  train     emguard.train.train (resumes from its last checkpoint); the untrained
            baseline only records its config and split; a ``safelora_of`` run projects
            its source run's adapter (emguard.defenses.safelora) into its own folder
  evaluate  emguard.evaluate_run (generation and judge-free measures are cached per
            answer batch, so an interrupted evaluation continues)
  judge     after every run is evaluated, one judge (loaded once) scores all answers
            that are not judged yet; verdicts are cached, so a rerun costs nothing

``sweep_log.jsonl`` in the study folder gets one line per event (start, finish, fail,
skip) with the run's name, so what happened to each run is on disk; a line cut short
by a kill is ignored when the log is read. A run that fails is reported and the rest go
on; runs that need it are marked blocked. ``--executor ray`` runs each run as a Ray task
(one GPU each where the cluster has GPUs); the judge stage runs in the driver.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from emguard.config import ConfigError
from emguard.data.foqa import is_hub_id
from emguard.data.split import HELDOUT_FILE, SPLIT_FILE
from emguard.defenses.registry import active_defenses
from emguard.defenses.safelora import apply_safelora
from emguard.evaluate import EvalConflictError, judge_generations
from emguard.evaluate_run import EVAL_DIR, SETTINGS_FILE, evaluate_run, settings_record
from emguard.io import cache_dir, read_json, write_json_atomic
from emguard.judge import judge_name_of, make_judge
from emguard.model_card import write_cards
from emguard.models import ModelLoadError, resolve_model_source
from emguard.ownership import FolderBusyError, check_writable_target, folder_lock
from emguard.redact import redact_tree
from emguard.run_dir import claim_run_dir
from emguard.study import PlannedRun, StudyConfig, expand
from emguard.sweep_ray import run_with_ray
from emguard.tracking import log_run_evaluation
from emguard.train import _has_bitsandbytes, record_untrained, train

LOG_FILE = "sweep_log.jsonl"


@dataclass
class RunStatus:
    name: str
    state: str  # done | evaluated | trained | partial | pending | missing-input
    detail: str = ""


# ------------------------------------------------------------------------------ state


def _eval_parts(run: PlannedRun) -> list[str]:
    e = run.config.eval
    parts = ["general"] if (e.general_questions or e.tasks) else []
    parts += ["general_trigger"] if (e.general_questions and e.trigger_format) else []
    split = run.run_dir / "data_split.json"
    heldout = read_json(split).get("heldout_file") if split.is_file() else True
    return parts + (["indomain"] if e.indomain and heldout else [])


def _metrics(run: PlannedRun, part: str) -> dict | None:
    path = run.run_dir / "eval" / part / "metrics.json"
    return read_json(path) if path.is_file() else None


def is_trained(run: PlannedRun) -> bool:
    """The run's summary is written, and says trained or untrained as the run's kind is
    (a trained run's folder never passes for its untrained baseline, or the reverse)."""
    path = run.run_dir / "summary.json"
    if not path.is_file():
        return False
    try:
        trained = read_json(path).get("trained", True)
    except (OSError, ValueError, AttributeError):
        return False
    return trained == (run.kind != "untrained")


def is_evaluated(run: PlannedRun) -> bool:
    """Trained, every part evaluated, and with the study's current eval settings."""
    record = run.run_dir / EVAL_DIR / SETTINGS_FILE
    return (is_trained(run) and all(_metrics(run, p) is not None for p in _eval_parts(run))
            and record.is_file() and read_json(record) == settings_record(run.config.eval))


def judge_name(run: PlannedRun) -> str | None:
    """The name of the run's judge as metrics.json records it (None: no judge)."""
    spec = run.config.eval.judge
    return None if spec.lower() == "none" else judge_name_of(spec)


def _judged_parts(run: PlannedRun) -> list[str]:
    return [p for p in _eval_parts(run) if p != "general" or run.config.eval.general_questions]


def is_judged(run: PlannedRun) -> bool:
    """Evaluated, and every judged part has verdicts of the run's judge (or no judge)."""
    name, evaluated = judge_name(run), is_evaluated(run)
    if not evaluated or name is None:
        return evaluated
    return all((m := _metrics(run, p)) is not None and m.get("judge") == name
               and m.get("llm_judge") is not None for p in _judged_parts(run))


def missing_inputs(run: PlannedRun) -> list[str]:
    """Inputs a run needs that are not here (local data files, models, and what each active
    defense's own ``check`` refuses); hub ids and hf: datasets are not checked (they
    download). A run that needs another run of the study first (an ``@run:`` adapter) has
    its defenses checked when it starts (emguard.train calls every ``check`` first): the
    adapters it reads do not exist before then."""
    d, problems = run.config.data, []
    for key, spec in (("data.train", d.train), ("data.heldout", d.heldout)):
        local = _local_path(spec)
        if local is not None and not Path(local).exists():
            problems.append(f"{key}: {local} not found")
    try:
        resolve_model_source(run.config.model)
    except ModelLoadError as e:
        problems.append(f"model: {e}")
    if not run.needs:
        for defense in active_defenses(run.config.defenses):
            try:
                defense.check(run.config)
            except (ConfigError, OSError, ValueError) as e:
                problems.append(str(e))
    return problems


def _local_path(spec: str | None) -> str | None:
    """The file a data spec reads, or None for built-in, generated and hub sources."""
    if spec is None or spec == "wildguardmix":
        return None
    spec = spec.removeprefix("split:")
    if spec.startswith(("builtin:", "hf:", "opswap:")) or spec == "foqa":
        return None
    if spec.startswith("foqa:"):
        source = spec[len("foqa:"):]
        return None if is_hub_id(source) else source
    return spec


def status(run: PlannedRun) -> RunStatus:
    if is_judged(run):
        return RunStatus(run.name, "done")
    if is_evaluated(run):
        return RunStatus(run.name, "evaluated", "not judged yet")
    if is_trained(run):
        stale = (run.run_dir / EVAL_DIR / SETTINGS_FILE).is_file()
        return RunStatus(run.name, "trained", "evaluated with other eval settings; --reevaluate "
                         "replaces that evaluation" if stale else "evaluation pending")
    if (run.run_dir / "config.yaml").is_file():
        return RunStatus(run.name, "partial", "interrupted; resumes from its last checkpoint")
    missing = missing_inputs(run)
    if missing:
        return RunStatus(run.name, "missing-input", "; ".join(missing))
    return RunStatus(run.name, "pending")


# ------------------------------------------------------------------------------ log


class SweepLog:
    """Append-only JSONL of events; each line is flushed and fsynced before going on."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, event: str, run: str | None = None, **info) -> None:
        line = json.dumps({"time": round(time.time(), 3), "event": event, "run": run,
                           "pid": os.getpid(), **redact_tree(info)})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a kill
        return out


# ------------------------------------------------------------------------------ one run


def execute_run(run: PlannedRun, log_path: str, judge_now: bool, progress: bool = True,
                reevaluate: bool = False) -> str:
    """Train (or record / project) and evaluate one run; returns "done" or "skipped".
    ``judge_now=False`` leaves judging to the judge stage. An evaluation made with other
    settings is an error unless ``reevaluate`` (which discards that evaluation's files)."""
    log = SweepLog(Path(log_path))
    if is_evaluated(run) and (not judge_now or is_judged(run)):
        return "skipped"
    log.write("start", run.name, kind=run.kind)
    started = time.time()
    try:
        if not is_trained(run):
            _train_stage(run)

        try:
            evaluate_run(run.run_dir, settings=run.config.eval, judge=None if judge_now else "none",
                         progress=progress, force=reevaluate)
        except EvalConflictError as e:
            raise EvalConflictError(
                f"{run.name} was evaluated with other eval settings than the study's now ({e}). "
                "Restore the settings, or rerun the sweep with --reevaluate to discard the "
                "earlier evaluations of such runs (their generations and judgments).") from None
    except BaseException as e:
        log.write("fail", run.name, error=f"{type(e).__name__}: {e}",
                  traceback=traceback.format_exc(limit=8))
        raise
    log.write("finish", run.name, seconds=round(time.time() - started, 2))
    return "done"


def _train_stage(run: PlannedRun) -> None:
    if run.kind == "untrained":
        record_untrained(run.config)
    elif run.kind == "safelora":
        project_source(run)
    else:
        train(run.config)


def project_source(run: PlannedRun) -> None:
    """A ``safelora_of`` run: its source run's split and adapter, projected by SafeLoRA.

    The folder gets the config (= the source's, plus defenses.safelora), the source's
    split files (copied: the same data was trained on) and ``adapter_safelora``; the
    summary names the source run."""
    import shutil

    source, s, out = run.source_dir, run.config.defenses.safelora, run.run_dir
    with folder_lock(out):
        if (out / "summary.json").is_file():
            return
        check_writable_target(out)
        claim_run_dir(out, run.config, force=False)
        for f in sorted(source.iterdir()):
            if f.name in (SPLIT_FILE, HELDOUT_FILE) or f.name.endswith(".test.jsonl"):
                shutil.copyfile(f, out / f".{f.name}.tmp")
                os.replace(out / f".{f.name}.tmp", out / f.name)
        report = apply_safelora(source / "adapter", out / "adapter_safelora",
                                aligned=s.aligned or run.config.model, unaligned=s.unaligned,
                                tau=s.tau, progress=False)
        summary = {**read_json(source / "summary.json"), "source_run": str(source)}
        summary["defenses"] = [*summary.get("defenses", []), "safelora"]
        summary["adapter"] = None
        summary["safelora"] = {"adapter": "adapter_safelora", "tau": s.tau,
                               "share_projected": report.share_projected,
                               "source_adapter": str(source / "adapter")}
        write_json_atomic(out / "summary.json", summary)

        write_cards(out)


# ------------------------------------------------------------------------------ sweep


@dataclass
class SweepResult:
    done: list[str]
    skipped: list[str]
    failed: dict[str, str]  # name -> error
    blocked: dict[str, str]  # name -> the failed run it needed
    judged: int = 0
    busy: dict[str, str] = field(default_factory=dict)  # name -> what another process holds


class StudyBusyError(ConfigError):
    """Another sweep of the same study is running (reported like a config error: nothing
    was started)."""


def write_manifest(study: StudyConfig, runs: list[PlannedRun]) -> None:
    """The study's resolved settings (credentials redacted) and its runs (name, folder,
    kind, needs), for the report, in ``runs-NAME.json`` (studies may share a folder and so
    their common runs)."""
    root = Path(study.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest_path(study), {
        "format": "emguard.study/1", "study": redact_tree(study.model_dump(mode="json")),
        "runs": [{"name": r.name, "domain": r.domain, "arm": r.arm, "seed": r.seed,
                  "point": r.point, "kind": r.kind, "needs": r.needs,
                  "control_of": r.control_of,
                  "dir": str(r.run_dir.relative_to(root))}  # relative: the folder can move
                 for r in runs]})


def manifest_path(study: StudyConfig) -> Path:
    return Path(study.output_dir) / f"runs-{study.name}.json"


def check_before_start(study: StudyConfig, runs: list[PlannedRun], judge_stage: bool) -> None:
    """Everything checkable before the first run starts: inputs of every pending run and
    the judge's key and endpoint."""
    problems = [f"{r.name}: {p}" for r in runs if not is_trained(r) for p in missing_inputs(r)]
    if any(r.config.train.optimizer == "adamw_8bit" and r.kind == "train" and not is_trained(r)
           for r in runs):
        if not _has_bitsandbytes():
            problems.append("train.optimizer=adamw_8bit needs bitsandbytes: pip install "
                            "'emguard[gpu]' (or set train.optimizer: auto in the study's base)")
    if problems:
        head = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConfigError(f"{study.name}: {len(problems)} missing input(s):\n  {head}{more}")
    unjudged = {r.config.eval.judge for r in runs if not is_judged(r)} - {"none"}
    if judge_stage:
        for spec in sorted(unjudged):  # key, endpoint and model, before anything is trained
            if spec.startswith("local:"):  # loaded for the judge stage, not while training
                try:
                    resolve_model_source(spec[len("local:"):])
                except ModelLoadError as e:
                    raise ConfigError(f"eval.judge: {e}") from None
                continue
            judge = make_judge_once(spec)
            if hasattr(judge, "check"):
                judge.check()


_JUDGES: dict[str, object] = {}


def make_judge_once(spec: str):
    """One judge object per spec for the whole sweep (a local judge model loads once)."""
    if spec not in _JUDGES:
        _JUDGES[spec] = make_judge(spec, cache_path=cache_dir() / "judge_cache.sqlite")
    return _JUDGES[spec]


def run_sweep(study: StudyConfig, executor: str = "sequential", address: str | None = None,
              only: str | None = None, judge: bool = True, progress: bool = True,
              reevaluate: bool = False,
              on_event: Callable[[str, str, int, int], None] | None = None) -> SweepResult:
    """Run every unfinished run of the study (``only``: names matching a glob), then the
    judge stage. Finished work is skipped; a failed run does not stop the others.
    ``on_event(name, state, k, n)`` is called as the k-th of n runs ends (progress)."""
    import fnmatch

    every = expand(study)
    selected = [r for r in every if only is None or fnmatch.fnmatch(r.name, only)]
    wanted = {n for r in selected for n in [r.name, *r.needs]}
    runs = [r for r in every if r.name in wanted]
    root = Path(study.output_dir)
    with study_lock(study):
        return _sweep(study, every, runs, root, executor, address, judge, progress, reevaluate,
                      on_event)


@contextmanager
def study_lock(study: StudyConfig) -> Iterator[None]:
    """One sweep of a study at a time: a second one refuses at once (StudyBusyError)."""
    stack = ExitStack()
    try:
        stack.enter_context(folder_lock(manifest_path(study)))
    except FolderBusyError:
        raise StudyBusyError(f"another sweep of study {study.name} is running in "
                             f"{study.output_dir}; wait for it to finish (its progress: "
                             f"{Path(study.output_dir) / LOG_FILE})") from None
    with stack:
        yield


def _sweep(study: StudyConfig, every: list[PlannedRun], runs: list[PlannedRun], root: Path,
           executor: str, address: str | None, judge: bool, progress: bool, reevaluate: bool,
           on_event: Callable[[str, str, int, int], None] | None) -> SweepResult:
    check_before_start(study, runs, judge)
    write_manifest(study, every)
    log = SweepLog(root / LOG_FILE)
    log.write("sweep-start", executor=executor, runs=len(runs))
    counter = {"n": 0}

    def notify(name: str, state: str) -> None:
        counter["n"] += 1
        if on_event is not None:
            on_event(name, state, counter["n"], len(runs))

    if executor == "ray":
        result = run_with_ray(runs, str(root / LOG_FILE), address, notify, execute=execute_run,
                              collect=collect, reevaluate=reevaluate)
    else:
        result = _run_sequential(runs, str(root / LOG_FILE), progress, notify, reevaluate)
    if judge:
        result.judged = judge_stage(runs, set(result.failed) | set(result.blocked), log, progress)
    log.write("sweep-finish", failed=len(result.failed), blocked=len(result.blocked))
    return result


def _run_sequential(runs: list[PlannedRun], log_path: str, progress: bool,
                    notify: Callable[[str, str], None], reevaluate: bool = False) -> SweepResult:
    return collect(runs, log_path, notify, lambda run: execute_run(
        run, log_path, judge_now=False, progress=progress, reevaluate=reevaluate))


def collect(runs: list[PlannedRun], log_path: str, notify: Callable[[str, str], None],
            outcome: Callable[[PlannedRun], str], errors: tuple[type[BaseException], ...] = (Exception,),
            describe: Callable[[BaseException], str] = lambda e: f"{type(e).__name__}: {e}",
            ) -> SweepResult:
    """Run ``outcome(run)`` (its state) for each run in order; a run whose source failed or
    was blocked is blocked; an exception of ``errors`` fails that run only (a study of a
    hundred runs goes on)."""
    result = SweepResult([], [], {}, {})
    for run in runs:
        waiting = [n for n in run.needs if n in result.busy]
        if waiting:  # its source is another process's work in progress: not a failure
            result.busy[run.name] = f"needs {waiting[0]}, which another process is running"
            notify(run.name, "busy")
            continue
        bad = [n for n in run.needs if n in result.failed or n in result.blocked]
        if bad:
            result.blocked[run.name] = bad[0]
            SweepLog(Path(log_path)).write("blocked", run.name, needs=bad[0])
            notify(run.name, "blocked")
            continue
        try:
            state = outcome(run)
        except FolderBusyError as e:
            result.busy[run.name] = str(e)
            SweepLog(Path(log_path)).write("busy", run.name)
            notify(run.name, "busy")
            continue
        except errors as e:
            result.failed[run.name] = redact_tree(describe(e))
            notify(run.name, "failed")
            continue
        (result.done if state == "done" else result.skipped).append(run.name)
        notify(run.name, state)
    return result


def judge_stage(runs: list[PlannedRun], skip: set[str], log: SweepLog, progress: bool) -> int:
    """Judge every evaluated, unjudged answer of the study with one judge per spec."""
    n = 0
    for run in runs:
        if judge_name(run) is None or run.name in skip or not is_evaluated(run) or is_judged(run):
            continue
        judge = make_judge_once(run.config.eval.judge)
        log.write("judge-start", run.name, judge=judge.name)
        for part in _judged_parts(run):
            judge_generations(run.run_dir / "eval" / part, judge)
        log.write("judge-finish", run.name)

        write_cards(run.run_dir)  # with the judged rates

        log_run_evaluation(run.run_dir, run.config.train.report_to,
                           int((read_json(run.run_dir / "summary.json")).get("steps") or 0))
        n += 1
    return n
