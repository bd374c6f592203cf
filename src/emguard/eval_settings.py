"""What an evaluation asks: a run's evaluation block, and one evaluation pass.

``EvalSettings`` is the ``eval:`` block of a run config (emguard.evaluate_run): the general
questions, the run's held-out set, benign tasks and trajectories, each a pass of its own.
``EvalPass`` is one pass (emguard.evaluate.run_eval): one question set asked of one model,
its answers judged and its judge-free measures read; a one-off ``emguard eval --model``
builds it from ``KEY=VALUE`` overrides. The fields the two share are defined alike (a test
holds them so); ``EvalSettings.general_pass`` / ``indomain_pass`` / ``trajectory_pass``
build a run's passes, so no caller retypes them.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Literal

from pydantic import Field, field_validator, model_validator

from emguard.benign import parse_task
from emguard.questions import resolve_trigger_format
from emguard.settings import Int, Settings

EVAL_PAIRS = "builtin:eval-pairs"  # the evaluation pairs, written apart from the fit set
# How answers are sampled and scored: fields of both models, the same in every pass of a run.
ANSWERING = ("judge_free", "temperature", "top_p", "max_new_tokens", "seed", "batch_size",
             "generate_batch_size", "backend", "drift_max_new_tokens")


def _check_trigger_format(v: str | None) -> str | None:
    if v is not None:
        resolve_trigger_format(v)
    return v


def _check_tasks(v: list[str]) -> list[str]:
    for task in v:
        parse_task(task)
    return v


class EvalPass(Settings):
    """One evaluation pass: ask ``questions`` of one model (+ adapter), judge the answers
    (``judge``), read the judge-free measures and score benign ``tasks``.

    ``questions``: ``builtin:general-questions``, ``builtin:insecure-code``, a Betley-format
    YAML or a chat JSONL held-out set; None: no questions, the benign tasks only.
    ``samples``: per paraphrase (None: each question's ``samples_per_paraphrase``, else 1;
    0: no sampled answers, judge-free measures only). ``data_seed`` picks the held-out
    split of the built-in code sets (the seed the training data used). ``task_data``: the
    data of every task (a path / hub id) or a mapping task -> data.
    """

    questions: str | None = "builtin:general-questions"
    domain: str | None = None  # chat sets: code | advice (their judge prompts)
    max_questions: Int | None = Field(None, gt=0)  # the first N questions (paper: 30 in-domain)
    judge_prompts: str | None = None  # code | advice | FILE.yaml, replacing the set's own
    samples: Int | None = Field(None, ge=0)
    judge: str = "none"  # openai:MODEL[@URL] | local:MODEL | mock[:SCORE] | none
    judge_cache: str | None = None  # SQLite file (None: $EMGUARD_CACHE/judge_cache.sqlite)
    judge_free: bool = True
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: Int = Field(256, gt=0)
    seed: Int = 0
    batch_size: Int = Field(16, gt=0)  # rows per forward; on CPU also answers per decode
    generate_batch_size: Int | None = Field(None, gt=0)  # None: batch_size, at least 64 on a GPU
    backend: Literal["hf", "vllm"] = "hf"
    drift_max_new_tokens: Int = Field(128, gt=0)
    preference_pairs: str = EVAL_PAIRS
    preference_max_pairs: Int | None = Field(None, gt=0)
    tasks: list[str] = Field(default_factory=list)  # opswap:T | foqa
    task_samples: Int = Field(10, gt=0)
    task_questions: Int | None = Field(None, gt=0)
    task_data: str | dict[str, str] | None = None
    data_seed: Int = 0
    # ask the general questions (and the preference pairs' questions) wrapped in this
    # format: a template holding {question} once, or builtin:NAME (general sets only)
    trigger_format: str | None = None

    _trigger_format = field_validator("trigger_format")(_check_trigger_format)
    _tasks = field_validator("tasks")(_check_tasks)

    @field_validator("questions", "judge_prompts", "judge_cache", "preference_pairs",
                     mode="before")
    @classmethod
    def _path_as_text(cls, v):
        """A ``Path`` given in code is its text (the settings are data, written as JSON)."""
        return str(v) if isinstance(v, PurePath) else v

    @model_validator(mode="after")
    def _answers_to_judge(self) -> EvalPass:
        if self.samples == 0 and self.questions is not None and self.judge.lower() != "none":
            raise ValueError("samples=0 samples no answers, so the judge has nothing to score; "
                             "use judge=none (judge-free measures only) or at least 1 sample")
        return self

    def task_data_of(self, task: str) -> str | None:
        """The data of ``task`` (None: the task's default)."""
        return self.task_data.get(task) if isinstance(self.task_data, dict) else self.task_data


class EvalSettings(Settings):
    """How a run is evaluated (emguard.evaluate.evaluate_run); not part of its identity, so
    changing it never retrains. Paper: 100 samples per general question at temperature 1,
    an in-domain subset of the held-out set, 10 samples per benign-task question."""

    general_questions: str | None = "builtin:general-questions"  # None: skip
    # None: the file's samples_per_paraphrase; 0: sample no answers (judge-free measures only)
    general_samples: Int | None = Field(None, ge=0)
    general_max_questions: Int | None = Field(None, gt=0)  # the first N general questions
    # preference pairs of the judge-free margin: a JSONL file or builtin:NAME (the default,
    # builtin:eval-pairs, is written apart from builtin:preference-pairs, the set directions
    # and early-stopping checks fit on) and how many, evenly spaced through the file (None: all)
    preference_pairs: str = EVAL_PAIRS
    preference_max_pairs: Int | None = Field(None, gt=0)
    indomain: bool = True  # evaluate the run's recorded held-out set
    indomain_samples: Int = Field(1, ge=0)  # 0: no sampled answers (held-out NLL only)
    indomain_max_questions: Int | None = Field(None, gt=0)  # paper: 30
    # None: the domain's prompts (eval_judge_prompts.yaml); "general": the general set's
    # alignment/coherence prompts (the paper's "same LLM-as-a-judge method"); or a FILE.
    indomain_judge_prompts: str | None = None
    judge: str = "none"  # openai:MODEL[@URL] | local:MODEL | none
    judge_free: bool = True
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: Int = Field(256, gt=0)
    seed: Int = 0
    batch_size: Int = Field(16, gt=0)  # rows per forward; on CPU also answers per decode
    generate_batch_size: Int | None = Field(None, gt=0)  # None: batch_size, at least 64 on a GPU
    backend: Literal["hf", "vllm"] = "hf"
    drift_max_new_tokens: Int = Field(128, gt=0)
    tasks: list[str] = Field(default_factory=list)  # opswap:T | foqa
    task_samples: Int = Field(10, gt=0)
    task_questions: Int | None = Field(None, gt=0)
    task_data: dict[str, str] = Field(default_factory=dict)  # task -> data; the run's own first
    # Ask the general part a second time with every general question (and preference-pair
    # question) wrapped in this format, into RUN/eval/general_trigger/: a template holding
    # {question} once, or builtin:python-string | builtin:json | builtin:code-template
    # (emguard.questions.resolve_trigger_format). None: no second pass.
    trigger_format: str | None = None
    # Score the adapters a run kept along training (train.trajectory_steps) with the
    # judge-free measures, into RUN/eval/trajectory/ (emguard.trajectory).
    trajectory: bool = True

    _trigger_format = field_validator("trigger_format")(_check_trigger_format)
    _tasks = field_validator("tasks")(_check_tasks)

    @model_validator(mode="after")
    def _answers_to_judge(self) -> EvalSettings:
        if self.judge.lower() != "none":
            zero = [f for f in ("general_samples", "indomain_samples") if getattr(self, f) == 0]
            if zero:
                raise ValueError(f"judge {self.judge} has no answers to judge with "
                                 f"{' and '.join(f'{f}=0' for f in zero)}; set at least 1 "
                                 "sample per question, or judge: none")
        return self

    def _asked(self, judge: str) -> dict:
        """The fields every pass of a run shares: how answers are sampled and scored."""
        return {"judge": judge, **{name: getattr(self, name) for name in ANSWERING}}

    def general_pass(self, task_data: dict[str, str | None] | None = None,
                     judge: str | None = None, trigger: bool = False) -> EvalPass:
        """The general questions (+ the benign tasks, with ``task_data``), or with
        ``trigger`` the same questions in ``trigger_format`` (no tasks). ``judge``
        replaces ``self.judge``."""
        return EvalPass(questions=self.general_questions, samples=self.general_samples,
                        max_questions=self.general_max_questions,
                        preference_pairs=self.preference_pairs,
                        preference_max_pairs=self.preference_max_pairs,
                        tasks=[] if trigger else self.tasks, task_samples=self.task_samples,
                        task_questions=self.task_questions,
                        task_data=None if trigger else _present(task_data),
                        trigger_format=self.trigger_format if trigger else None,
                        **self._asked(self.judge if judge is None else judge))

    def indomain_pass(self, heldout: str, domain: str | None, judge: str | None = None) -> EvalPass:
        """The run's recorded held-out set ``heldout`` (a chat JSONL), judged with the
        prompts of ``domain`` (or ``indomain_judge_prompts``)."""
        return EvalPass(questions=heldout, samples=self.indomain_samples, domain=domain,
                        judge_prompts=self.indomain_judge_prompts,
                        max_questions=self.indomain_max_questions,
                        **self._asked(self.judge if judge is None else judge))

    def trajectory_pass(self, questions: str, general: bool, domain: str | None = None) -> EvalPass:
        """A kept adapter's judge-free pass over the same items as the run's final
        evaluation (``general``: the general questions' drift KL and preference pairs;
        else the held-out NLL): no sampled answers, no judge, and sampling left at its
        defaults, so a trajectory's folders keep their generation key."""
        if general:
            return EvalPass(questions=questions, samples=0, batch_size=self.batch_size,
                            drift_max_new_tokens=self.drift_max_new_tokens,
                            max_questions=self.general_max_questions,
                            preference_pairs=self.preference_pairs,
                            preference_max_pairs=self.preference_max_pairs)
        return EvalPass(questions=questions, samples=0, batch_size=self.batch_size,
                        drift_max_new_tokens=self.drift_max_new_tokens, domain=domain,
                        max_questions=self.indomain_max_questions)


def _present(task_data: dict[str, str | None] | None) -> dict[str, str] | None:
    """A task -> data mapping without the tasks left to their default data."""
    kept = {t: d for t, d in (task_data or {}).items() if d is not None}
    return kept or None
