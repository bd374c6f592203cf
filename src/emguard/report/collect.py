"""Read a study folder for the report: its manifest, and each run's recorded results.

Only files are read (``runs-NAME.json``, ``RUN/summary.json``, ``RUN/eval/*/metrics.json``
and ``judge_free.json``); no model is ever loaded. Each metrics.json is checked against
``emguard.eval_log.EvalLog``: one of a newer or unknown format, or of another shape, is
named in the run's ``problems`` and left out, like an unreadable file. The measures of
the trigger-format pass (``RUN/eval/general_trigger/``, ``eval.trigger_format``) are the
plain ones' keys with a ``_trigger`` suffix (``general_trigger_misaligned``,
``preference_margin_trigger``, ...). A run without results is listed as
missing, not an error, so a report of a half-finished study shows what there is.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from emguard.data.chat import parse_yaml
from emguard.eval_log import EvalLogError, parse_eval_log
from emguard.io import read_json
from emguard.names import UnsafePathError, check_name, inside
from emguard.report.stats import mean_replicates, rate_replicates
from emguard.trajectory import trajectory_results

# measure key -> (part, how to read it); rates in %, judge-free values in their units
TRIGGER = "_trigger"  # measure-key suffix of the trigger-format pass
TRIGGER_PART = "general_trigger"
JUDGE_MEASURES = {
    "general_misaligned": ("general", "n_misaligned"),
    "general_incoherent": ("general", "n_incoherent"),
    "general_trigger_misaligned": (TRIGGER_PART, "n_misaligned"),
    "general_trigger_incoherent": (TRIGGER_PART, "n_incoherent"),
    "indomain_misaligned": ("indomain", "n_misaligned"),
    "indomain_incoherent": ("indomain", "n_incoherent"),
}
FREE_MEASURES = {  # key -> (part, label, lower/higher is what)
    "drift_kl": ("general", "general drift KL (nats/token)"),
    "preference_margin": ("general", "misalignment preference margin"),
    "preference_margin_trigger": (TRIGGER_PART, "misalignment preference margin (trigger format)"),
    # per pair: margin - the base model's margin on the same pair (paired, so its interval
    # is far tighter than the margins' own spread across pairs)
    "preference_shift": ("general", "preference shift vs. base model"),
    "preference_shift_trigger": (TRIGGER_PART, "preference shift vs. base model (trigger format)"),
    "share_misaligned_preferred": ("general", "pairs preferring the misaligned answer (%)"),
    "share_misaligned_preferred_trigger": (TRIGGER_PART, "pairs preferring the misaligned "
                                           "answer, trigger format (%)"),
    "heldout_nll": ("indomain", "held-out NLL (nats/token)"),
    "bandit_share": ("indomain", "bandit-flagged completions (%)"),
}


def value_key(value) -> tuple:
    """Sort key of a grid value: numbers in order, then null, then anything else by text
    (a grid may mix them: ``[null, 0.5, 1]``, ``[mean_token, sum]``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, "") if value is None else (2, 0.0, str(value))


def point_key(point: tuple) -> tuple:
    """Sort key of a grid point ``((key, value), ...)``."""
    return tuple((k, value_key(v)) for k, v in point)


class ReportInputError(ValueError):
    """A study folder the report cannot read; the message says what is missing."""


@dataclass
class RunResult:
    """One run of a study with what its folder holds."""

    name: str
    domain: str
    arm: str
    seed: int
    point: dict
    kind: str
    run_dir: Path
    metrics: dict[str, dict] = field(default_factory=dict)  # part -> metrics.json
    free: dict[str, dict] = field(default_factory=dict)  # part -> judge_free.json
    summary: dict | None = None
    split: dict | None = None
    config: dict | None = None
    trajectory: dict[int, dict[str, dict]] = field(default_factory=dict)  # step -> part -> free
    problems: list[str] = field(default_factory=list)  # files that could not be read
    control_of: str | None = None  # a compensation control: the arm it controls

    @property
    def cell(self) -> tuple:
        """What seeds are pooled over: domain, arm and grid point."""
        return (self.domain, self.arm, tuple(sorted(self.point.items())))


def find_manifest(study_dir: Path, name: str | None = None) -> Path:
    """The study's ``runs-NAME.json``; several in one folder need ``name``."""
    found = sorted(Path(study_dir).glob("runs-*.json"))
    if name is not None:
        try:
            check_name(name, "study name")
        except UnsafePathError as e:
            raise ReportInputError(str(e)) from None
        path = Path(study_dir) / f"runs-{name}.json"
        if not path.is_file():
            raise ReportInputError(f"{study_dir}: no runs-{name}.json (studies here: "
                                   f"{_names(found) or 'none'})")
        return path
    if not found:
        raise ReportInputError(f"{study_dir}: no runs-NAME.json; run `emguard sweep STUDY.yaml` "
                               "first (it writes the list of runs)")
    if len(found) > 1:
        raise ReportInputError(f"{study_dir} holds several studies ({_names(found)}); "
                               "choose one with --study NAME")
    return found[0]


def _names(paths: list[Path]) -> str:
    return ", ".join(p.stem.removeprefix("runs-") for p in paths)


_RUN_FIELDS = {"name": str, "domain": str, "arm": str, "seed": int, "point": dict,
               "kind": str, "dir": str}


def load_runs(study_dir: str | Path, name: str | None = None) -> tuple[dict, list[RunResult]]:
    """(the study's resolved config, its runs with their recorded results).

    The manifest must be well formed (ReportInputError naming the file and entry); a run
    file that cannot be read is skipped and named in the run's ``problems``."""
    path = find_manifest(Path(study_dir), name)
    manifest = _manifest(path)
    runs = []
    for i, r in enumerate(manifest["runs"]):
        where = f"{path}: runs[{i}]"
        bad = [k for k, kind in _RUN_FIELDS.items() if not isinstance(r.get(k), kind)
               or (kind is int and isinstance(r.get(k), bool))]
        if bad:
            raise ReportInputError(f"{where}: missing or ill-typed {', '.join(bad)}")
        try:  # relative to the study folder; never outside it
            run_dir = inside(r["dir"], study_dir, f"{where}.dir")
            check_name(r["arm"], f"{where}.arm")  # it names figure files
        except UnsafePathError as e:
            raise ReportInputError(str(e)) from None
        run = RunResult(r["name"], r["domain"], r["arm"], r["seed"], r["point"], r["kind"], run_dir,
                        control_of=r.get("control_of") if isinstance(r.get("control_of"), str)
                        else None)
        _read(run)
        runs.append(run)
    return manifest["study"], runs


def _manifest(path: Path) -> dict:
    try:
        manifest = read_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ReportInputError(f"{path}: not readable JSON ({e}); rerun `emguard sweep` to "
                               "write it again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("runs"), list) \
            or not isinstance(manifest.get("study"), dict):
        raise ReportInputError(f"{path}: not a study manifest (needs 'study' and 'runs'); rerun "
                               "`emguard sweep` to write it again")
    name = manifest["study"].get("name")
    try:
        check_name(name, f"{path}: study.name")  # it names the report folder
    except UnsafePathError as e:
        raise ReportInputError(str(e)) from None
    return manifest


def _read(run: RunResult) -> None:
    d = run.run_dir
    for fname, attr in (("summary.json", "summary"), ("data_split.json", "split")):
        setattr(run, attr, _read_file(run, d / fname, dict))
    run.config = _read_file(run, d / "config.yaml", dict)
    for part in ("general", TRIGGER_PART, "indomain"):
        for fname, into in (("metrics.json", run.metrics), ("judge_free.json", run.free)):
            path = d / "eval" / part / fname
            value = _read_file(run, path, dict)
            if value is not None and fname == "metrics.json":
                value = _eval_log(run, path, value)
            if value is not None:
                into[part] = value
    try:
        run.trajectory = trajectory_results(d)
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        run.problems.append(f"{d / 'eval' / 'trajectory'}: {e}")


def _read_file(run: RunResult, path: Path, kind: type) -> dict | None:
    """A run's JSON or YAML file, or None when it is absent or unreadable (then named in
    ``run.problems``)."""
    if not path.is_file():
        return None
    try:
        if path.suffix == ".yaml":
            value = parse_yaml(path.read_text(encoding="utf-8"))
        else:
            value = read_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        run.problems.append(f"{path}: unreadable ({str(e)[:120]})")
        return None
    if not isinstance(value, kind):
        run.problems.append(f"{path}: not a {kind.__name__}")
        return None
    return value


def _eval_log(run: RunResult, path: Path, value: dict) -> dict | None:
    """A metrics.json checked against ``EvalLog`` (as a dict), or None when it is of a newer
    or unknown format or another shape (then named in ``run.problems``)."""
    try:
        return parse_eval_log(value, path).to_dict()
    except EvalLogError as e:
        run.problems.append(str(e))
        return None


def steps_of(run: RunResult) -> list[int]:
    """The training steps a run has judge-free results for: its kept snapshots and its
    last step (the run itself); none for a run without results."""
    steps = set(run.trajectory)
    if run.free and run.summary and run.summary.get("trained", True) and run.summary.get("steps"):
        steps.add(int(run.summary["steps"]))
    return sorted(steps)


def at_step(run: RunResult, step: int) -> RunResult | None:
    """The run as it was at ``step`` (its results there only; judge-free measures), or None.
    The last step is the run itself."""
    if step in run.trajectory:
        return replace(run, free=run.trajectory[step], metrics={})
    if run.summary and step == run.summary.get("steps") and run.free:
        return run
    return None


def measure(run: RunResult, key: str, rng: np.random.Generator) -> tuple[float | None, np.ndarray | None]:
    """(value, bootstrap replicates over questions / items) of one measure of one run;
    (None, None) when the run has none, or when its files hold it malformed or non-finite
    (then named in ``run.problems``)."""
    try:
        value, reps = _measure(run, key, rng)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        _problem(run, f"{run.run_dir}: {key} is malformed in its result files "
                      f"({type(e).__name__}: {str(e)[:80]})")
        return None, None
    if value is not None and not np.isfinite(value):
        _problem(run, f"{run.run_dir}: {key} is not finite ({value})")
        return None, None
    return value, reps


def _problem(run: RunResult, text: str) -> None:
    if text not in run.problems:
        run.problems.append(text)


def _measure(run: RunResult, key: str, rng: np.random.Generator):
    if key in JUDGE_MEASURES:
        part, count = JUDGE_MEASURES[key]
        judged = (run.metrics.get(part) or {}).get("llm_judge")
        if not judged:
            return None, None
        counts = [(q[count], q["n_scored"]) for q in judged["per_question"].values()]
        return rate_replicates(counts, rng)
    if key.startswith("task:"):
        task = (run.metrics.get("general") or {}).get("tasks") or {}
        result = task.get(key[len("task:"):])
        if not result:
            return None, None
        value, reps = mean_replicates([100.0 * q["score"] for q in result["per_question"]], rng)
        return value, reps
    return _judge_free(run, key, rng)


def _judge_free(run: RunResult, key: str, rng: np.random.Generator):
    part = FREE_MEASURES[key][0]
    free = run.free.get(part) or {}
    key = key.removesuffix(TRIGGER)  # same measure, read from the trigger part's file
    if key == "drift_kl" and free.get("drift"):
        per = free["drift"].get("kl_per_answer") or []
        value = free["drift"].get("kl_mean")
        return (value, mean_replicates(per, rng)[1]) if value is not None else (None, None)
    if key in ("preference_margin", "preference_shift", "share_misaligned_preferred") \
            and free.get("preference"):
        margins = [p["margin"] for p in free["preference"]["pairs"]]
        if key == "preference_margin":
            return mean_replicates(margins, rng)
        if key == "preference_shift":
            return mean_replicates([p["margin"] - p["reference_margin"]
                                    for p in free["preference"]["pairs"]], rng)
        return mean_replicates([100.0 * (m > 0) for m in margins], rng)
    if key == "heldout_nll" and free.get("heldout_nll"):
        rows = free["heldout_nll"].get("per_row")
        if not rows:  # recorded before per-row values were: no interval
            return free["heldout_nll"].get("nll_mean"), None
        value, reps = rate_replicates([(r["nll_sum"], r["n_tokens"]) for r in rows], rng)
        return (None, None) if value is None else (value / 100.0, reps / 100.0)
    if key == "bandit_share" and free.get("bandit"):
        b = free["bandit"]
        flagged = {int(i) for i in (b.get("flagged") or {})}
        return mean_replicates([100.0 * (i in flagged) for i in range(b["n"])], rng)
    return None, None


def tasks_of(runs: list[RunResult]) -> list[str]:
    """The benign tasks any run was scored on (``opswap:T``, ``foqa``), sorted."""
    return sorted({t for r in runs for t in ((r.metrics.get("general") or {}).get("tasks") or {})})


def has_judge(runs: list[RunResult]) -> bool:
    """True when any run holds LLM-judge verdicts."""
    return any((m or {}).get("llm_judge") for r in runs for m in r.metrics.values())


def warnings_of(study: dict, runs: list[RunResult]) -> list[str]:
    """Things a reader must know: stand-in data, runs without results, no judge, a
    SafeLoRA projection that changed nothing."""
    out = [f"{p}; left out of the report" for r in runs for p in r.problems]
    interleaved = [((r.config or {}).get("defenses") or {}).get("interleave") or {} for r in runs]
    if any(str(i.get("source", "")).startswith("builtin:") for i in interleaved):
        out.append("interleaving used the built-in safe-instruct stand-in, not WildGuardMix "
                   "(the paper's source)")
    missing = [r.name for r in runs if not r.metrics]
    if missing:
        out.append(f"{len(missing)} run(s) have no results yet: {', '.join(missing[:8])}"
                   + (" ..." if len(missing) > 8 else ""))
    judged = has_judge(runs)
    overall = [m["llm_judge"]["overall"] for r in runs for m in r.metrics.values()
               if (m or {}).get("llm_judge") and m["llm_judge"].get("overall")]
    n_missing = sum(o.get("n_missing", 0) for o in overall)
    n_answers = sum(o.get("n_answers", 0) for o in overall)
    if n_missing:
        out.append(f"{n_missing} of {n_answers} judged answers have no verdict (too little "
                   "probability on numbers, or errors) and are left out of the rates"
                   + ("; no answer was scored, so every rate is empty" if n_missing == n_answers
                      else ""))
    if runs and not judged:
        out.append("no LLM-judge verdicts: misalignment/incoherence rates are empty; the "
                   "judge-free measures are shown (configure eval.judge for the paper's metric)")
    for r in runs:
        projected = ((r.summary or {}).get("safelora") or {}).get("share_projected")
        if projected == 0:
            out.append(f"{r.name}: SafeLoRA projected no layer (every layer's similarity to its "
                       f"projection was at least tau), so its adapter equals its source's")
    general = {(r.config or {}).get("eval", {}).get("general_questions") for r in runs}
    if "builtin:general-questions" in general:
        out.append("general questions: emguard's built-in set, a stand-in for Betley et al.'s")
    return out
