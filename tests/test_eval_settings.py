"""One settings object per evaluation pass (issue 22 item 2): ``run_eval(model, adapter,
EvalPass, out)``, a run's passes built from its ``eval:`` block, and the one-off CLI's
``KEY=VALUE`` settings validated before anything loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emguard.cli import app
from emguard.eval_settings import ANSWERING, EvalPass, EvalSettings
from emguard.evaluate import run_eval
from emguard.io import read_json
from emguard.settings import ConfigError

# Fields of a pass that a run's eval block names differently (or not at all), with the
# block's field each comes from.
RENAMED = {"questions": "general_questions", "samples": "general_samples",
           "max_questions": "general_max_questions"}


def test_shared_fields_are_defined_alike():
    """A field both models have means the same thing: type, default and bounds."""
    shared = set(EvalPass.model_fields) & set(EvalSettings.model_fields)
    assert {"judge", "temperature", "top_p", "max_new_tokens", "seed", "batch_size",
            "preference_pairs", "tasks", "trigger_format"} <= shared
    assert set(ANSWERING) <= shared  # what a run's passes copy from its eval block
    for name in shared - {"task_data"}:  # a pass takes one data for every task, or a mapping
        a, b = EvalPass.model_fields[name], EvalSettings.model_fields[name]
        assert (a.annotation, a.metadata) == (b.annotation, b.metadata), name
        assert a.get_default(call_default_factory=True) == b.get_default(call_default_factory=True), name
    for ours, theirs in RENAMED.items():
        a, b = EvalPass.model_fields[ours], EvalSettings.model_fields[theirs]
        assert (a.annotation, a.metadata) == (b.annotation, b.metadata), ours


def test_a_runs_passes_carry_its_eval_block():
    s = EvalSettings(general_questions="q.yaml", general_samples=3, general_max_questions=2,
                     preference_pairs="p.jsonl", preference_max_pairs=5, indomain_samples=2,
                     indomain_max_questions=7, indomain_judge_prompts="advice", judge="mock:80",
                     temperature=0.5, top_p=0.9, max_new_tokens=20, seed=4, batch_size=6,
                     generate_batch_size=12, drift_max_new_tokens=9, tasks=["opswap:2"],
                     task_samples=4, task_questions=8, trigger_format="builtin:json")
    asked = dict(judge="mock:80", temperature=0.5, top_p=0.9, max_new_tokens=20, seed=4,
                 batch_size=6, generate_batch_size=12, drift_max_new_tokens=9)
    general = s.general_pass({"opswap:2": "test.jsonl"})
    assert general == EvalPass(questions="q.yaml", samples=3, max_questions=2,
                               preference_pairs="p.jsonl", preference_max_pairs=5,
                               tasks=["opswap:2"], task_samples=4, task_questions=8,
                               task_data={"opswap:2": "test.jsonl"}, **asked)
    assert s.general_pass({"opswap:2": None}).task_data is None  # the task's own default data
    trigger = s.general_pass({"opswap:2": "test.jsonl"}, trigger=True)
    assert (trigger.trigger_format, trigger.tasks, trigger.task_data) == ("builtin:json", [], None)
    assert s.general_pass(judge="none").judge == "none"
    held = s.indomain_pass("RUN/heldout.jsonl", "code")
    assert held == EvalPass(questions="RUN/heldout.jsonl", samples=2, max_questions=7,
                            domain="code", judge_prompts="advice", **asked)
    # a trajectory's pass: the same items, no answers, no judge, sampling at the defaults
    point = s.trajectory_pass("q.yaml", general=True)
    assert point == EvalPass(questions="q.yaml", samples=0, max_questions=2, batch_size=6,
                             drift_max_new_tokens=9, preference_pairs="p.jsonl",
                             preference_max_pairs=5)
    assert s.trajectory_pass("h.jsonl", general=False, domain="code") == EvalPass(
        questions="h.jsonl", samples=0, max_questions=7, batch_size=6, drift_max_new_tokens=9,
        domain="code")


def test_a_pass_refuses_bad_values_by_field():
    for fields, field in (({"samples": -2}, "samples"), ({"task_samples": 0}, "task_samples"),
                          ({"backend": "tgi"}, "backend"), ({"temprature": 0.5}, "temprature"),
                          ({"tasks": ["opswap:x"]}, "tasks")):
        with pytest.raises(ValueError, match=field):
            EvalPass(**fields)
    with pytest.raises(ValueError, match="nothing to score"):
        EvalPass(samples=0, judge="openai:gpt-4o-mini")
    EvalPass(samples=0, judge="openai:gpt-4o-mini", questions=None)  # benign tasks only
    given = EvalPass(questions=Path("q.yaml"), preference_pairs=Path("dir/p.jsonl"))
    assert (given.questions, given.preference_pairs) == ("q.yaml", str(Path("dir/p.jsonl")))


def test_run_eval_refuses_a_judge_object_without_answers(tmp_path):
    from emguard.judge.mock import MockJudge

    with pytest.raises(ValueError, match="nothing to score"):
        run_eval("unused-model", None, EvalPass(samples=0), tmp_path / "e", judge=MockJudge())
    assert not (tmp_path / "e").exists()


# Generation keys the evaluation before this redesign wrote (commit 7918c25, run_eval's
# keyword arguments), for the same model and settings: a folder evaluated then is continued,
# not refused as another evaluation. Neither call loads a model (no answers, no measures).
PINNED_GEN_KEYS = {
    "general_default": ({"samples": 0, "judge_free": False}, "9f629bd16ebe305e"),
    "general_sampling": ({"samples": 0, "judge_free": False, "temperature": 0.7, "top_p": 0.9,
                          "max_new_tokens": 64, "seed": 3, "max_questions": 2}, "03f4825eba545a19"),
    "code_heldout": ({"questions": "builtin:insecure-code", "samples": 0, "judge_free": False,
                      "domain": "code", "max_questions": 4, "data_seed": 1}, "f76036e7bce0d405"),
}


@pytest.mark.parametrize("case", sorted(PINNED_GEN_KEYS))
def test_generation_keys_are_unchanged(case, tmp_path):
    fields, key = PINNED_GEN_KEYS[case]
    run_eval("smollm2-135m", None, EvalPass(**fields), tmp_path / "e", progress=False)
    assert read_json(tmp_path / "e" / "eval_spec.json")["gen_key"] == key


def test_one_off_cli_takes_key_value_settings(tmp_path):
    out = tmp_path / "e"
    ok = CliRunner().invoke(app, ["eval", "--model", "smollm2-135m", "--out", str(out),
                                  "--samples", "0", "judge_free=false", "max_questions=2",
                                  "temperature=0.7", "top_p=0.9", "max_new_tokens=64", "seed=3"])
    assert ok.exit_code == 0, ok.output
    spec = read_json(out / "eval_spec.json")
    assert spec["gen_key"] == PINNED_GEN_KEYS["general_sampling"][1]
    assert spec["generation"] == {"samples": 0, "temperature": 0.7, "top_p": 0.9,
                                  "max_new_tokens": 64, "seed": 3, "backend": "hf"}


@pytest.mark.parametrize("args, message", [
    (["temperature=hot"], "temperature: .*hot.*from override 'temperature=hot'"),
    (["max_question=2"], "max_question: unknown field"),
    (["--samples", "0", "--judge", "mock"], "nothing to score"),
    (["eval.temperature=0"], "eval.temperature=0: eval.\\* keys set a run's evaluation"),
    (["backend=tgi"], "backend: "),
])
def test_one_off_cli_names_the_bad_setting(args, message, tmp_path):
    out = tmp_path / "e"
    result = CliRunner().invoke(app, ["eval", "--model", "smollm2-135m", "--out", str(out), *args])
    assert result.exit_code == 1, result.output
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not out.exists()  # refused before anything was written


def test_eval_settings_live_in_one_module():
    """config re-exports the run's eval block; it is the same class, not a copy."""
    from emguard import config

    assert config.EvalSettings is EvalSettings
    assert config.RunConfig.model_fields["eval"].annotation is EvalSettings
    with pytest.raises(ConfigError, match="eval.general_samples"):
        config.build_run_config({"eval": {"general_samples": -1}})
    assert json.loads(EvalPass().model_dump_json())["preference_pairs"] == "builtin:eval-pairs"
