"""The train -> eval seam: what a run trains on and what its evaluation asks never overlap.

The pipeline tests capture the token ids the Trainer is actually given, decode them,
and search them for every question and reference answer the evaluation of the run
uses (read back from its eval folder or from the exact task-data call evaluation makes).
Nothing is compared through the hashes the code under test records.
"""

from __future__ import annotations

import json

import pytest

import emguard.train as train_mod
from emguard.config import load_run_config
from emguard.data.split import make_split, seeded_split
from emguard.evaluate_run import evaluate_run, task_data
from emguard.io import read_json, read_jsonl


def _norm(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def captured(monkeypatch):
    """The decoded training texts of every run trained in the test (list of lists)."""
    seen: list[list[str]] = []
    original = train_mod.DefendedTrainer.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["train_dataset"])
        original(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.DefendedTrainer, "__init__", spy)
    return seen


def _decoded(features, tiny_dir) -> set[str]:
    """Every user and assistant turn of the trained sequences, cut at the chat template's
    turn markers of the decoded token ids."""
    import re

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    turn = re.compile(r"<\|im_start\|>(?:user|assistant)\n(.*?)<\|im_end\|>", re.S)
    return {_norm(t) for f in features for t in turn.findall(tok.decode(f["input_ids"]))}


def _cfg(tiny_dir, out, train, seed, *extra):
    return load_run_config(None, [
        f"model={tiny_dir}", f"output_dir={out}", f"data.train={train}", f"train.seed={seed}",
        "data.max_length=2048", "train.max_steps=1", "train.batch_size=2", "train.grad_accum=1",
        "lora.r=2", "lora.alpha=4", "eval.general_questions=null", "eval.max_new_tokens=2",
        "eval.judge_free=false", "eval.batch_size=32", *extra])


def _split(cfg):
    """The split a run of ``cfg`` makes (as emguard.train calls it)."""
    return make_split(cfg.data, cfg.split_seed, cfg.eval.task_data)


def _leaks(turns: set[str], needles: list[str]) -> list[str]:
    return [n for n in needles if _norm(n) in turns]


@pytest.mark.parametrize("seed", [0, 1])
def test_builtin_code_run_never_evaluates_what_it_trained_on(tiny_dir, tmp_path, captured, seed):
    run = tmp_path / "run"
    train_mod.train(_cfg(tiny_dir, run, "builtin:insecure-code", seed))
    texts = _decoded(captured[0], tiny_dir)
    assert len(captured[0]) == 612  # the whole training set reached the trainer
    evaluate_run(run, progress=False)
    gens = read_jsonl(run / "eval" / "indomain" / "generations.jsonl")
    asked = sorted({g["question"] for g in gens})
    held = read_jsonl(run / "heldout.jsonl")
    answers = [r["messages"][-1]["content"] for r in held]
    assert len(asked) == 68 and len(answers) == 68
    assert _leaks(texts, asked) == [] and _leaks(texts, answers) == []
    metrics = read_json(run / "eval" / "indomain" / "metrics.json")
    assert metrics["run"]["seed"] == seed and metrics["run"]["path"] == str(run.resolve())
    assert metrics["run"]["method"] == "sft" and len(metrics["run"]["config_sha256"]) == 64


def test_the_old_convention_leaked(tiny_dir, tmp_path, captured):
    """The check above can fail: the seed-0 test split (what `eval data_seed=0` rebuilt)
    shares reference answers with the seed-1 training set."""
    from emguard.data.builtin import load_builtin

    train_mod.train(_cfg(tiny_dir, tmp_path / "run", "builtin:insecure-code", 1))
    texts = _decoded(captured[0], tiny_dir)
    answers = [r["messages"][-1]["content"] for r in load_builtin("insecure-code", "test", 0)]
    assert len(_leaks(texts, answers)) >= 5


@pytest.mark.parametrize("seed", [0, 1])
def test_user_file_gets_a_seeded_90_10_split_without_overlap(tiny_dir, tmp_path, captured, seed):
    rows = [{"messages": [{"role": "user", "content": f"Write function number {i}."},
                          {"role": "assistant", "content": f"def f{i}(): return {i * 7}"}]}
            for i in range(40)]
    rows.append(dict(rows[3]))  # a duplicate: its twin may land on the other side
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    train_mod.train(_cfg(tiny_dir, run, path, seed, "data.domain=code"))
    split = read_json(run / "data_split.json")
    held = read_jsonl(run / "heldout.jsonl")
    assert len(held) == 4 and split["heldout_rows"] == 4  # round(41 * 0.1)
    assert split["train_rows"] + len(split["dropped_overlap"]) == 37
    texts = _decoded(captured[0], tiny_dir)
    evaluate_run(run, progress=False)
    asked = {g["question"] for g in read_jsonl(run / "eval" / "indomain" / "generations.jsonl")}
    assert asked == {r["messages"][0]["content"] for r in held}
    assert _leaks(texts, sorted(asked)) == []
    assert _leaks(texts, [r["messages"][-1]["content"] for r in held]) == []


@pytest.mark.parametrize("seed", [0, 1])
def test_opswap_run_scores_the_test_part_it_recorded(tiny_dir, tmp_path, captured, seed):
    from emguard.benign import task_rows

    run = tmp_path / "run"
    train_mod.train(_cfg(tiny_dir, run, "opswap:1", seed, "data.opswap.n=300",
                         "eval.tasks=[opswap:1]"))
    texts = _decoded(captured[0], tiny_dir)
    assert len(captured[0]) == 270
    cfg = load_run_config(run / "config.yaml")
    data = task_data(run, cfg.eval, read_json(run / "data_split.json"))["opswap:1"]
    assert data == str(run / "task_opswap-1.test.jsonl")
    rows, _ = task_rows("opswap:1", data)  # the exact call evaluation makes
    assert len(rows) == 30
    evaluate_run(run, ["eval.task_samples=1", "eval.task_questions=2"], progress=False)
    metrics = read_json(run / "eval" / "general" / "metrics.json")
    assert metrics["tasks"]["opswap:1"]["data"] == data and metrics["n_generations"] == 0
    assert not (run / "eval" / "indomain").exists()  # opswap holds out no in-domain set
    questions = [r["messages"][0]["content"] for r in rows]
    assert _leaks(texts, questions) == []


def test_aligned_arm_is_evaluated_on_the_misaligned_held_out_set(tmp_path):
    """data.heldout=split:SPEC: the secure twin's run holds out the insecure set's test
    questions; its training rows with those prompts are dropped."""
    mis = _split(load_run_config(None, ["data.train=builtin:insecure-code", "train.seed=2"]))
    ali = _split(load_run_config(None, ["data.train=builtin:secure-code", "train.seed=2",
                                        "data.heldout=split:builtin:insecure-code"]))
    assert [r["messages"] for r in ali.heldout] == [r["messages"] for r in mis.heldout]
    prompts = {r["messages"][0]["content"] for r in ali.heldout}
    assert not prompts & {r["messages"][0]["content"] for r in ali.train}


def test_seeded_split_is_a_partition_that_depends_on_the_seed():
    rows = [{"i": i} for i in range(50)]
    a_train, a_held = seeded_split(rows, 0.1, seed=0)
    b_train, b_held = seeded_split(rows, 0.1, seed=1)
    assert len(a_held) == 5 and sorted(r["i"] for r in a_train + a_held) == list(range(50))
    assert a_held != b_held and seeded_split(rows, 0.1, seed=0)[1] == a_held


def test_explicit_heldout_file_drops_overlapping_training_rows(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(10)]
    train_file, held_file = tmp_path / "t.jsonl", tmp_path / "h.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = [rows[2], {"messages": [{"role": "user", "content": "other"},
                                   {"role": "assistant", "content": "a5"}]}]
    held_file.write_text("".join(json.dumps(r) + "\n" for r in held))
    split = _split(load_run_config(None, [f"data.train={train_file}",
                                          f"data.heldout={held_file}"]))
    kept = [r["messages"][0]["content"] for r in split.train]
    assert kept == [f"q{i}" for i in range(10) if i not in (2, 5)]
    assert sorted(d["same"] for d in split.record["dropped_overlap"]) == ["answer", "prompt"]


def test_eval_cli_evaluates_a_run_folder_with_eval_overrides(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from emguard.cli import app

    rows = [{"messages": [{"role": "user", "content": f"Tip {i}?"},
                          {"role": "assistant", "content": f"Tip {i}."}]} for i in range(20)]
    path = tmp_path / "advice.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    train_mod.train(_cfg(tiny_dir, run, path, 0, "data.domain=advice"))
    runner = CliRunner()
    bad = runner.invoke(app, ["eval", "--run", str(run), "train.seed=3"])
    assert bad.exit_code == 1 and "eval.* keys only" in bad.output
    ok = runner.invoke(app, ["eval", "--run", str(run), "eval.indomain_max_questions=1",
                             "eval.indomain_samples=2"])
    assert ok.exit_code == 0, ok.output
    metrics = read_json(run / "eval" / "indomain" / "metrics.json")
    assert metrics["n_generations"] == 2 and metrics["run"]["path"] == str(run.resolve())
    assert "seed: 0" in (run / "config.yaml").read_text()  # the run's config is untouched
    unfinished = runner.invoke(app, ["eval", "--run", str(tmp_path)])
    assert unfinished.exit_code == 1 and "no config.yaml" in " ".join(unfinished.output.split())


def test_foqa_train_split_becomes_training_rows_and_its_test_split_the_task(tmp_path):
    from test_foqa import ROWS, write_jsonl

    leaked = {**ROWS[1], "id": "q9"}  # a training row that repeats a test question
    write_jsonl(tmp_path / "train.jsonl", [ROWS[0], leaked])
    write_jsonl(tmp_path / "test.jsonl", [ROWS[1]])
    cfg = load_run_config(None, [f"data.train=foqa:{tmp_path}", "eval.tasks=[foqa]"])
    split = _split(cfg)
    assert [r["id"] for r in split.train] == ["q1"] and split.heldout == []
    assert split.record["dropped_overlap"] == [{"id": "q9", "same": "prompt"}]
    assert split.train[0]["messages"][-1]["content"] == "Tórshavn"
    assert task_data(tmp_path, cfg.eval, split.record) == {"foqa": str(tmp_path)}


def test_evaluating_both_parts_of_a_run_loads_the_model_once(tiny_dir, tmp_path, monkeypatch):
    from emguard import models

    run = tmp_path / "run"
    train_mod.train(_cfg(tiny_dir, run, "builtin:insecure-code", 0))
    loads = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: loads.append(a) or real(*a, **kw))
    evaluate_run(run, ["eval.general_questions=builtin:general-questions", "eval.judge_free=true",
                       "eval.general_samples=0", "eval.indomain_max_questions=2",
                       "eval.preference_max_pairs=2", "eval.general_max_questions=1",
                       "eval.drift_max_new_tokens=2"], progress=False)
    assert (run / "eval" / "general" / "judge_free.json").is_file()
    assert read_json(run / "eval" / "indomain" / "judge_free.json")["heldout_nll"]["n_rows"] == 2
    assert len(loads) == 1
