"""``metrics.json``, typed: the one log an evaluation writes (emguard.evaluate) and the
report reads (emguard.report.collect).

``EvalLog`` is exactly what ``emguard.evaluate`` writes, field for field and in that
order; every model forbids fields it does not name, so a field the evaluation writes and
the model lacks fails there and then, and a file with one fails to load. The file
carries its format, ``emguard.eval/N``; this version writes and reads N = 1
(``FORMAT``). A file without a ``format`` is read as version 1 when its fields are
version 1's; a newer or unknown format is refused (``EvalLogError`` naming the file,
the format found and the one supported).

Blocks whose shape belongs to another module stay plain JSON objects here: ``spec``
(eval_spec.json, emguard.evaluate), ``run`` (emguard.evaluate_run), the judge-free
summary (emguard.judge_free, one object per measure) and the benign tasks'
results (emguard.benign, one object per task).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

FORMAT_NAME = "emguard.eval"
VERSION = 1
FORMAT = f"{FORMAT_NAME}/{VERSION}"

Number = int | float  # as written: an int stays an int, a float a float


class EvalLogError(ValueError):
    """A metrics.json this version cannot read: unreadable, of another shape, or of a newer
    or unknown format. The message names the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Rates(_Strict):
    """Counts and percentages over a set of answers (emguard.metrics.summarize)."""

    n_answers: int
    n_scored: int
    n_missing: int
    n_misaligned: int
    n_incoherent: int
    pct_misaligned: float | None
    pct_incoherent: float | None


class ThresholdValues(_Strict):
    """The thresholds of the rule (emguard.metrics.Thresholds as a dict)."""

    aligned_below: Number
    coherent_above: Number
    incoherent_below: Number


class JudgeMetrics(_Strict):
    """LLM-judge rates (emguard.metrics.compute_metrics): pooled and per question."""

    rule: str
    thresholds: ThresholdValues
    overall: Rates
    per_question: dict[str, Rates]


class EvalLog(_Strict):
    """One evaluation's ``metrics.json`` (module doc)."""

    format: str = FORMAT
    run: dict[str, Any] | None = None  # what was trained (emguard.evaluate_run), or None
    spec: dict[str, Any]  # eval_spec.json: model, adapter, questions, generation, judge, ...
    n_generations: int
    judge: str | None = None  # the judge's name, None without one
    llm_judge: JudgeMetrics | None = None
    llm_judge_note: str | None = None  # why there are no LLM-judge rates
    judge_free: dict[str, dict[str, Any]] | None = None  # measure -> its summary
    tasks: dict[str, dict[str, Any]] | None = None  # benign task -> its result

    def to_dict(self) -> dict[str, Any]:
        """The dict written as metrics.json (every field, in order; values as given, so a
        NaN or an infinity is written as emguard.io.write_json_atomic always wrote it)."""
        return self.model_dump(mode="python")


def version_of(fmt: Any) -> int | None:
    """N of ``"emguard.eval/N"``; None for anything else."""
    name, sep, number = str(fmt).partition("/")
    if name != FORMAT_NAME or not sep or not number.isdigit():
        return None
    return int(number)


def parse_eval_log(data: Any, where: str | Path = "metrics.json") -> EvalLog:
    """An ``EvalLog`` from a metrics.json's parsed JSON; ``EvalLogError`` naming ``where``
    when it is of another format or shape. A missing ``format`` is version 1."""
    if not isinstance(data, dict):
        raise EvalLogError(f"{where}: not an evaluation log (a JSON object is expected, "
                           f"found {type(data).__name__})")
    if "format" in data:
        fmt = data["format"]
        version = version_of(fmt)
        if version is None:
            raise EvalLogError(f"{where}: unknown format {fmt!r}; this version of emguard "
                               f"reads {FORMAT!r}")
        if version != VERSION:
            newer = "written by a newer emguard; upgrade emguard to read it" \
                if version > VERSION else "no longer read"
            raise EvalLogError(f"{where}: format {fmt!r} is {newer} (this version reads "
                               f"{FORMAT!r})")
    try:
        return EvalLog.model_validate({**data, "format": FORMAT})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
                             for err in e.errors()[:5])
        raise EvalLogError(f"{where}: not a {FORMAT!r} evaluation log ({problems})") from None


def read_eval_log(path: str | Path) -> EvalLog:
    """The ``EvalLog`` in the metrics.json at ``path``; ``EvalLogError`` naming it when it
    is unreadable or not a log this version reads."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EvalLogError(f"{path}: unreadable ({str(e)[:120]})") from None
    return parse_eval_log(data, path)
