"""The CLI on hostile input: user text holding rich markup (the chat tag ``[/INST]``)
prints as written, and impossible or mistaken requests fail at once with one clear
line (non-zero exit, no traceback) instead of loading a model, hanging or passing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from emguard.cli import app

TAG = "[/INST]"  # rich reads it as a closing style tag: MarkupError unless escaped


def _invoke(*args) -> object:
    """Run ``emguard ARGS`` in-process; any exception but an exit is a test failure."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}\n{result.output}")
    assert "Traceback" not in result.output
    return result


@pytest.fixture
def wide(monkeypatch):
    """Every CLI console 300 columns wide, so table cells print on one line."""
    import sys

    from rich.console import Console

    for name, module in list(sys.modules.items()):
        if name.startswith("emguard.cli"):
            for con in {id(v): v for v in vars(module).values() if isinstance(v, Console)}.values():
                monkeypatch.setattr(con, "_width", 300)


def _study(tmp_path: Path, grid: list[str], output_dir: Path | None = None) -> Path:
    study = {"name": "hostile", "output_dir": str(output_dir or tmp_path / "study"),
             "model": "smollm2-135m", "seeds": [0],
             "domains": {"code": {"misaligned": "builtin:insecure-code",
                                  "aligned": "builtin:secure-code"}},
             "arms": [{"name": "trig", "data": "none",
                       "grid": {"eval.trigger_format": grid}}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _chat_rows(n: int, big: int = 0) -> str:
    rows = [{"messages": [{"role": "user", "content": f"Q{i}?"},
                          {"role": "assistant", "content": f"A{i}."}]} for i in range(n)]
    if big:
        rows[-1]["messages"][1]["content"] = "word " * (big // 5)
    return "".join(json.dumps(r) + "\n" for r in rows)


# ----------------------------------------------------------------- markup in user text


def test_missing_config_named_with_a_chat_tag_prints_literally(tmp_path):
    missing = tmp_path / f"x{TAG}.yaml"
    result = _invoke("train", "--config", missing)
    assert result.exit_code == 2
    assert f"config file '{missing}' does not exist" in result.output


def test_study_error_quoting_a_chat_tag_prints_literally(tmp_path):
    # a trigger format without {question} is a config error that quotes the value
    result = _invoke("sweep", _study(tmp_path, [TAG]), "--dry-run")
    assert result.exit_code == 2
    assert f"(got '{TAG}')" in result.output and "eval.trigger_format" in result.output


def test_dry_run_prints_chat_tags_in_grid_output_dir_and_logged_error(tmp_path, wide):
    from emguard.study import expand, load_study
    from emguard.sweep import LOG_FILE, SweepLog

    out = tmp_path / f"out{TAG}"
    study = _study(tmp_path, [f"[INST] {{question}} {TAG}", "builtin:json"], output_dir=out)
    first = expand(load_study(study))[0].name
    SweepLog(out / LOG_FILE).write("fail", run=first, error=f"boom {TAG} at step 3")
    result = _invoke("sweep", study, "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"2 runs in {out}" in result.output
    assert f"last attempt fail: boom {TAG} at step 3" in result.output


def test_validate_ok_line_prints_a_file_name_with_a_chat_tag(tmp_path, wide):
    path = tmp_path / f"rows{TAG}.jsonl"  # the "/" makes "rows[" a folder
    path.parent.mkdir()
    path.write_text(_chat_rows(3))
    result = _invoke("data", "validate", path, "--no-length-check")
    assert result.exit_code == 0
    assert f"ok: {path}: 3 valid rows" in result.output


# ----------------------------------------------------------------- early, clear errors


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the checks under test must come first."""
    import emguard.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(emguard.models, "load_model", refuse)


def test_direction_fit_on_an_empty_pairs_file_fails_before_the_model_loads(tmp_path, no_model):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n\n")
    result = _invoke("direction", "fit", "--out", tmp_path / "dir", "--pairs", pairs)
    assert result.exit_code == 2
    assert f"--pairs {pairs}: no pairs" in result.output


def test_direction_fit_on_bad_json_or_layers_names_the_file_line_and_option(tmp_path, no_model):
    pairs = tmp_path / "pairs.jsonl"
    good = json.dumps({"question": "q", "aligned": "a", "misaligned": "m"})
    pairs.write_text(f"{good}\n\n{{not json\n")
    result = _invoke("direction", "fit", "--out", tmp_path / "dir", "--pairs", pairs)
    assert result.exit_code == 2 and f"--pairs {pairs}:3: not valid JSON" in result.output
    pairs.write_text(f"{good}\n{good}\n")
    result = _invoke("direction", "fit", "--out", tmp_path / "dir", "--pairs", pairs,
                     "--check-layers", "5,ten")
    assert result.exit_code == 2 and "--check-layers '5,ten'" in result.output


def test_sweep_only_glob_matching_no_run_fails_naming_glob_and_runs(tmp_path):
    from emguard.study import expand, load_study

    study = _study(tmp_path, ["builtin:json"])
    result = _invoke("sweep", study, "--only", "insecure/kl*", "--no-judge")
    assert result.exit_code == 2
    assert "--only 'insecure/kl*' matches none of the 1 run(s)" in result.output
    assert expand(load_study(study))[0].name in result.output
    assert not (tmp_path / "study" / "sweep_log.jsonl").exists()  # nothing started


@pytest.mark.timeout(60)
def test_opswap_impossible_n_fails_up_front_naming_the_option(tmp_path):
    # 1 operator, numbers 1..9: 9 x 4 x 9 = 324 expressions; 1e9 drew for hours before
    result = _invoke("data", "opswap", "-t", "1", "--n", "1000000000", "--min-ops", "1",
                     "--max-ops", "1", "-o", tmp_path / "o.jsonl")
    assert result.exit_code == 1
    assert "--n 1000000000 is more than the 324 distinct expressions" in result.output
    assert not list(tmp_path.iterdir())


def test_opswap_expression_count_is_exact_and_stalled_draws_stop():
    import random

    from emguard.data.opswap import OpSwapSpaceError, count_expressions, draw_expression
    from emguard.data.opswap import generate_opswap as gen

    for n_ops in (1, 2, 3):  # every drawable expression turns up in 200k draws
        rng = random.Random(0)
        drawn = {draw_expression(rng, n_ops, 1, 1, 0.5) for _ in range(200_000)}
        assert len(drawn) == count_expressions(n_ops, n_ops, 1, 1)
    assert count_expressions(1, 3, 1, 9) == 324 + 9 ** 3 * 16 * 3 + 9 ** 4 * 64 * 11
    assert count_expressions(1, 10 ** 9, 1, 9, cap=1000) >= 1000  # stops early
    assert count_expressions(2, 2, 1, 1, paren_prob=0.0) == 16
    # numbers 0..0, one operator: 4 expressions, but "0 ÷ 0" never evaluates
    with pytest.raises(OpSwapSpaceError, match="none new in the last 50 draws"):
        gen(0, 4, seed=0, min_ops=1, max_ops=1, low=0, high=0, max_stall=50)
    with pytest.raises(OpSwapSpaceError, match="only 4 distinct expressions exist"):
        gen(0, 5, seed=0, min_ops=1, max_ops=1, low=0, high=0)


def test_train_config_that_is_a_directory_says_so(tmp_path):
    result = _invoke("train", "--config", tmp_path)
    assert result.exit_code == 2
    assert f"config file '{tmp_path}' is a directory, not a config file" in result.output


def test_validate_rejects_a_huge_row_by_length_without_tokenizing_it(tmp_path, monkeypatch):
    import emguard.data.masking as masking

    real, sizes = masking.tokenize_chat, []

    def spy(tok, messages, max_length=None):
        size = sum(len(m["content"]) for m in messages)
        sizes.append(size)
        assert size < 1_000_000, "a 3 MB row was tokenized"
        return real(tok, messages, max_length)

    monkeypatch.setattr(masking, "tokenize_chat", spy)
    path = tmp_path / "big.jsonl"
    path.write_text(_chat_rows(3, big=3_000_000))
    result = _invoke("data", "validate", path)
    assert result.exit_code == 1
    assert f"{path}: 1 row(s) fail tokenization" in result.output
    assert ":3: over-length (3000003 characters > " in result.output
    assert "not tokenized" in result.output
    assert len(sizes) == 2  # the short rows are still tokenized
