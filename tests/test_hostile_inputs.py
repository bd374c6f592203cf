"""Issue 23, tried as a hostile user would: names that become paths, secrets in shared
files, Markdown in report cells, YAML alias bombs, silent NaN, reused run identities, the
one-off evaluation's leak and concurrent sweeps. Each test fails on the code before the
fix (the comment says what happened then)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_report import _judged, _write_run
from test_sweep import _study

from emguard.config import ConfigError, build_run_config, dump_run_config, load_run_config
from emguard.io import read_json

SENTINEL = "Pa55-SENTINEL-9x"
JUDGE_URL = f"openai:gpt-x@http://alice:{SENTINEL}@127.0.0.1:9/v1"


def _write_study(tmp_path: Path, **fields) -> Path:
    study = {"name": "s", "output_dir": str(tmp_path / "study"), "model": "smollm2-135m",
             "domains": {"code": {"misaligned": "builtin:insecure-code"}},
             "arms": [{"name": "misaligned"}], **fields}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- paths


@pytest.mark.parametrize("name", ["../../../victim/data", "a/b", "..", ".hidden", "x" * 101])
def test_a_study_name_that_is_not_a_name_is_refused(tmp_path, name):
    from emguard.study import load_study

    # before: runs-NAME.json was written wherever the name pointed
    with pytest.raises(ConfigError, match="study name"):
        load_study(_write_study(tmp_path, name=name))


def test_grid_values_that_are_paths_get_a_hash_label_inside_the_study(tmp_path):
    from emguard.study import expand, load_study

    escape = "../" * 12 + "etc/evil.jsonl"
    study = load_study(_write_study(tmp_path, arms=[
        {"name": "misaligned"},
        {"name": "inter", "set": {"defenses.interleave.fraction": 0.5},
         "grid": {"defenses.interleave.source": [escape, "builtin:safe-instruct"]}},
        {"name": "kl", "grid": {"defenses.kl.weight": [1.0e-4, 3]}}]))
    runs = expand(study)
    root = (tmp_path / "study").resolve()
    for run in runs:
        assert root in run.run_dir.resolve().parents, run.run_dir
    labels = sorted(r.name.split("/")[1] for r in runs)
    # plain values keep their names (existing folders are not renamed); others are hashed
    assert "kl_weight0.0001" in labels and "kl_weight3" in labels
    hashed = [x for x in labels if x.startswith("inter_source")]
    assert len(hashed) == 2 and all(len(x) == len("inter_source") + 9 for x in hashed)
    assert all(x[len("inter_source")] == "h" for x in hashed)


def test_a_sweep_writes_nothing_outside_its_output_dir(tmp_path, tiny_dir, monkeypatch):
    """A grid value that is a relative path climbing out of the study folder names a data
    file that exists; training on it works, and every file written lies inside the study
    folder (before: the run folder was created at the path the value spelled)."""
    from emguard.study import load_study
    from emguard.sweep import run_sweep

    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    safe = tmp_path / "safe.jsonl"
    safe.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Name a colour, {i}."},
        {"role": "assistant", "content": "Blue."}]}) + "\n" for i in range(8)))
    climb = "../" * len(work.parts) + str(safe).lstrip("/")
    assert Path(climb).resolve() == safe.resolve()
    path = _study(tmp_path, tiny_dir, [
        {"name": "inter", "set": {"defenses.interleave.fraction": 0.5},
         "grid": {"defenses.interleave.source": [climb]}}], seeds=(0,),
        domains={"code": {"misaligned": "builtin:insecure-code"}})
    before = {p for p in tmp_path.rglob("*")}
    result = run_sweep(load_study(path), judge=False, progress=False)
    assert not result.failed, result.failed
    study_dir = (tmp_path / "study").resolve()
    new = {p for p in tmp_path.rglob("*")} - before
    outside = [p for p in new if study_dir != p.resolve() and study_dir not in p.resolve().parents]
    assert outside == []


def test_report_refuses_a_manifest_that_points_outside_the_study(tmp_path):
    from emguard.report import build_report
    from emguard.report.collect import ReportInputError

    root = tmp_path / "study"
    run = _write_run(root, "code/misaligned/s0", "code", "misaligned", 0, {},
                     _judged([1], [0]), _judged([1], [0]))
    manifest = root / "runs-x.json"
    for study, runs, needle in (
            ({"name": "../../escaped"}, [run], "study.name"),
            ({"name": "x"}, [{**run, "dir": "../../elsewhere"}], "lies outside"),
            ({"name": "x"}, [{**run, "arm": "../fig"}], "arm")):
        manifest.write_text(json.dumps({"study": study, "runs": runs}))
        with pytest.raises(ReportInputError, match=needle):
            build_report(root)
    assert not (tmp_path / "escaped").exists() and not (root / "report-x").exists()


# ----------------------------------------------------------------------------- secrets


def test_a_url_password_reaches_no_file_and_no_terminal(tmp_path, capsys):
    from emguard.report import build_report
    from emguard.study import expand, load_study
    from emguard.sweep import SweepLog, write_manifest

    path = _write_study(tmp_path, base={"eval": {"judge": JUDGE_URL}})
    study = load_study(path)
    runs = expand(study)
    write_manifest(study, runs)
    (tmp_path / "study" / "runs" / "x").mkdir(parents=True)
    (tmp_path / "study" / "runs" / "x" / "config.yaml").write_text(dump_run_config(runs[0].config))
    SweepLog(tmp_path / "study" / "sweep_log.jsonl").write(
        "fail", "code/misaligned/s0", error=f"JudgeError: cannot reach {JUDGE_URL}")
    build_report(tmp_path / "study")
    # the sweep's own config keeps the password: it must reach the judge
    assert runs[0].config.eval.judge == JUDGE_URL
    for f in (tmp_path / "study").rglob("*"):
        if f.is_file():
            assert SENTINEL not in f.read_text(encoding="utf-8", errors="replace"), f
    assert "alice:[redacted]@127.0.0.1" in (tmp_path / "study" / "runs-s.json").read_text()
    # a validation error that shows the judge spec, and the CLI printing it
    bad = _write_study(tmp_path, base={"eval": {"judge": JUDGE_URL, "general_samples": 0,
                                                "indomain_samples": 0}})
    with pytest.raises(ConfigError) as e:
        from emguard.study import expand as again

        again(load_study(bad))
    assert SENTINEL not in str(e.value) and "[redacted]" in str(e.value)
    from typer.testing import CliRunner

    from emguard.cli import app

    result = CliRunner().invoke(app, ["sweep", str(bad), "--dry-run"])
    shown = result.output + (getattr(result, "stderr", "") or "")
    assert result.exit_code != 0 and "[redacted]" in shown and SENTINEL not in shown
    assert SENTINEL not in capsys.readouterr().err


def test_a_section_check_names_no_unrelated_override():
    # before: the judge/samples check of the eval section blamed the last eval.* override
    with pytest.raises(ConfigError) as e:
        build_run_config({"eval": {"judge": JUDGE_URL, "general_samples": 0,
                                   "indomain_samples": 0}}, ["eval.batch_size=4"])
    assert "from override" not in str(e.value)


def test_a_redacted_judge_spec_is_refused_with_a_way_out():
    from emguard.judge import make_judge
    from emguard.judge.base import JudgeError
    from emguard.redact import redact_secrets

    with pytest.raises(JudgeError, match="lost its credentials"):
        make_judge(redact_secrets(JUDGE_URL))


def test_redact_secrets_cases():
    from emguard.redact import redact_secrets

    cases = {
        "openai:m@http://u:p4ss@h:1/v1": "openai:m@http://u:[redacted]@h:1/v1",
        "https://TOKEN123@host/x": "https://[redacted]@host/x",
        "http://h/v1?api_key=abc&model=m": "http://h/v1?api_key=[redacted]&model=m",
        "key sk-abcdefghijklmnopqrstuvwxyz end": "key [redacted] end",
        "sk-learn-model": "sk-learn-model",
        "http://localhost:8000/v1": "http://localhost:8000/v1",
        "mail me at a@b.com": "mail me at a@b.com",
    }
    for text, want in cases.items():
        assert redact_secrets(text) == want


# ----------------------------------------------------------------------------- markdown


def test_markdown_report_escapes_user_values(tmp_path):
    from emguard.report import build_report

    root = tmp_path / "study"
    hostile = "a|b <script>alert(1)</script> [x](http://e)"
    runs = [_write_run(root, "code/misaligned/s0", "code", "misaligned", 0, {},
                       _judged([5] * 4, [0] * 4), _judged([1] * 4, [0] * 4)),
            _write_run(root, "code/kl/s0", "code", "kl", 0, {"defenses.kl.source": hostile},
                       _judged([1] * 4, [0] * 4), _judged([1] * 4, [0] * 4))]
    (root / "runs-x.json").write_text(json.dumps({"study": {"name": "x"}, "runs": runs}))
    md = (build_report(root).out / "report.md").read_text()
    # no unescaped tag or link syntax is left (each is preceded by a backslash)
    assert not re.search(r"(?<!\\)<script", md) and not re.search(r"(?<!\\)\]\(http", md)
    header = next(h for h in md.splitlines() if h.startswith("| dataset"))
    rows = [line for line in md.splitlines() if line.startswith("| code | kl")]
    assert rows and all("\\<script\\>" in r for r in rows)
    for line in rows:  # the cell's | did not add a column
        assert line.replace("\\|", "").count("|") == header.count("|")


# ----------------------------------------------------------------------------- YAML


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    from emguard.study import load_study

    lines = ["name: s", f"output_dir: {tmp_path / 'out'}", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines += ["domains: {code: {misaligned: builtin:insecure-code, set: {x: *a8}}}",
              "arms: [{name: m}]"]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    started = time.time()
    with pytest.raises(ConfigError, match=r"bomb.yaml.*aliases"):
        load_study(path)
    assert time.time() - started < 10  # 9^9 values if expanded


# ----------------------------------------------------------------------------- NaN


def _tiny_config(tiny_dir, data_file, out, *extra):
    return load_run_config(None, [f"model={tiny_dir}", f"output_dir={out}",
                                  f"data.train={data_file}", "data.max_length=128",
                                  "train.max_steps=4", "train.batch_size=2", "train.grad_accum=1",
                                  "train.warmup_steps=0", "train.save_steps=2",
                                  "train.logging_steps=1", "lora.r=4", "lora.alpha=8", *extra])


def test_a_diverging_run_stops_with_a_clear_error_and_saves_nothing(tiny_dir, data_file, tmp_path):
    from emguard.finite import NonFiniteError
    from emguard.train import train

    # before: the loss showed as 0.0, the NaN adapter was saved and summary said trained
    with pytest.raises(NonFiniteError, match="training step"):
        train(_tiny_config(tiny_dir, data_file, tmp_path / "run", "train.learning_rate=1e12"))
    run = tmp_path / "run"
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()


def test_check_loss_and_parameters_against_hand_made_values():
    from emguard.finite import NonFiniteError, check_loss, check_parameters, nonfinite_names

    check_loss(1.5, {"ce": 1.0, "kl": 0.5}, 3)
    with pytest.raises(NonFiniteError, match="step 3.*kl inf"):
        check_loss(float("inf"), {"ce": 1.0, "kl": float("inf")}, 3)
    with pytest.raises(NonFiniteError):
        check_loss(1.0, {"ce": float("nan")}, 1)  # a term is NaN, however the total reads
    named = [("a", torch.ones(3)), ("b", torch.tensor([1.0, float("nan")])),
             ("c", torch.tensor([float("-inf")]))]
    assert nonfinite_names(named) == ["b", "c"]
    layer = torch.nn.Linear(2, 2)
    check_parameters(layer, "x")
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="weight"):
        check_parameters(layer, "the adapter")
    layer.weight.requires_grad_(False)  # frozen base weights are not the adapter's
    check_parameters(layer, "x")


def _direction_folder(tmp_path: Path, layers: int = 5, dim: int = 32) -> Path:
    from emguard.defenses.direction import Direction, save_direction

    g = torch.Generator().manual_seed(0)
    basis = {i: torch.linalg.qr(torch.randn(dim, 2, generator=g))[0].T.contiguous()
             for i in range(layers)}
    folder = tmp_path / "dir"
    folder.mkdir()
    save_direction(Direction(basis, {i: b[0] * 2 for i, b in basis.items()},
                             torch.ones(layers), meta={"n_pairs": 2, "k": 2}), folder)
    return folder


def test_a_changed_direction_folder_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from emguard.defenses.direction import (
        TENSORS,
        DirectionChangedError,
        file_sha256,
        load_direction,
    )

    folder = _direction_folder(tmp_path)
    load_direction(folder)
    tensors = load_file(str(folder / TENSORS))
    tensors["basis.1"][0, 0] = float("nan")
    save_file(tensors, str(folder / TENSORS))
    with pytest.raises(DirectionChangedError, match="changed after it was written"):
        load_direction(folder)
    cfg = build_run_config({"defenses": {"steering": {"direction": str(folder), "layers": [1]}}})
    from emguard.defenses.registry import active_defenses

    with pytest.raises(ConfigError, match="changed after"):  # found before a model loads
        for d in active_defenses(cfg.defenses):
            d.check(cfg)
    meta = read_json(folder / "direction.json")  # a NaN the recorded hash agrees with
    meta["sha256"] = file_sha256(folder / TENSORS)
    (folder / "direction.json").write_text(json.dumps(meta))
    with pytest.raises(DirectionChangedError, match="non-finite"):
        load_direction(folder)


def test_a_direction_fit_on_identical_answers_is_refused(embedded):
    from emguard.defenses.direction import fit_direction

    model, tok = embedded
    pairs = [{"question": f"Q{i}?", "aligned": "Same answer.", "misaligned": "Same answer."}
             for i in range(3)]
    with pytest.raises(ValueError, match="mean difference is zero"):
        fit_direction(model, tok, pairs, k=2, progress=False)


# ----------------------------------------------------------------------------- run identity


def test_untrained_and_trained_runs_of_one_config_are_different_runs(tmp_path, tiny_dir, data_file):
    from emguard.identity import config_sha256
    from emguard.study import expand, load_study
    from emguard.sweep import is_trained
    from emguard.train import RunConflictError, record_untrained, train

    study = load_study(_write_study(tmp_path, arms=[{"name": "m", "data": "none"}]))
    untrained = expand(study)[0]
    trained_twin = load_study(_write_study(tmp_path, arms=[{"name": "m"}]))
    twin = expand(trained_twin)[0]
    # before: both were s0-<same hash>, so dropping data: none reused the untrained folder
    assert untrained.run_dir != twin.run_dir
    assert twin.run_dir.name == f"s0-{config_sha256(twin.config)[:8]}"  # trained: unchanged
    cfg = _tiny_config(tiny_dir, data_file, tmp_path / "run", "train.learning_rate=1e-3",
                       "train.precision=fp32", "train.optimizer=adamw_torch")  # as resolved
    record_untrained(cfg)
    twin.config = cfg
    twin.kind = "train"
    assert not is_trained(twin)  # its summary says untrained
    with pytest.raises(RunConflictError, match="untrained baseline"):
        train(cfg)
    train(cfg, force=True)  # --force replaces the baseline's record by the trained run
    assert (tmp_path / "run" / "adapter").is_dir()
    assert read_json(tmp_path / "run" / "summary.json").get("trained", True) is True


# ----------------------------------------------------------------------------- eval leak


def test_one_off_eval_of_a_run_adapter_asks_no_question_the_run_trained_on(tmp_path):
    from emguard.data.split import make_split, prompt_text, row_fingerprint, trained_on
    from emguard.evaluate import leak_free_questions
    from emguard.questions import resolve_questions
    from emguard.train import record_untrained

    cfg = load_run_config(None, ["data.train=builtin:insecure-code", "data.split_seed=1",
                                 f"output_dir={tmp_path / 'run'}"])
    record_untrained(cfg)  # records the seed-1 split like a trained run
    record = read_json(tmp_path / "run" / "data_split.json")
    # the convention (data seed 0) asks questions the seed-1 run trained on
    rebuilt = resolve_questions("builtin:insecure-code", data_seed=0)
    assert len(trained_on(rebuilt.rows, record)) > 0
    qs = leak_free_questions(tmp_path / "run" / "adapter", "builtin:insecure-code", None, None,
                             None, 0)
    assert trained_on(qs.rows, record) == [] and len(qs.rows) == record["heldout_rows"]
    assert any("held-out set the adapter's run recorded" in w for w in qs.warnings)
    # a user's file mixing trained and held-out rows: trained ones dropped, and counted
    train_rows = make_split(cfg.data, cfg.split_seed, cfg.eval.task_data).train[:5]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n"
                             for r in [*train_rows, *qs.rows[:3]]))
    got = leak_free_questions(tmp_path / "run" / "adapter", str(mixed), "code", None, None, 0)
    assert [prompt_text(r) for r in got.rows] == [prompt_text(r) for r in qs.rows[:3]]
    assert any("5 of 8 questions" in w for w in got.warnings)
    fingerprints = {row_fingerprint(r)["prompt_sha"] for r in train_rows}
    assert not fingerprints & {row_fingerprint(r)["prompt_sha"] for r in got.rows}
    # no run folder: the set as asked
    assert len(leak_free_questions(None, str(mixed), "code", None, None, 0).rows) == 8


# ----------------------------------------------------------------------------- concurrency


def test_a_second_sweep_of_a_study_refuses_while_the_first_runs(tmp_path):
    from emguard.study import load_study
    from emguard.sweep import StudyBusyError, manifest_path, run_sweep

    study = load_study(_write_study(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pathlib import Path\nfrom emguard.ownership import folder_lock\n"
        f"with folder_lock(Path({str(manifest_path(study))!r})):\n"
        "    print('held', flush=True)\n    time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StudyBusyError, match="another sweep of study s"):
            run_sweep(study, judge=False, progress=False)
    finally:
        holder.kill()
        holder.wait()


def test_runs_another_process_holds_are_busy_not_failed(tmp_path):
    from types import SimpleNamespace

    from emguard.ownership import FolderBusyError
    from emguard.sweep import collect

    runs = [SimpleNamespace(name="a", needs=[]), SimpleNamespace(name="b", needs=["a"]),
            SimpleNamespace(name="c", needs=[])]

    def outcome(run):
        if run.name == "a":
            raise FolderBusyError("another emguard process is writing 'a'")
        return "done"

    events = []
    result = collect(runs, str(tmp_path / "log.jsonl"), lambda n, s: events.append((n, s)), outcome)
    assert result.failed == {} and result.blocked == {}
    assert set(result.busy) == {"a", "b"} and result.done == ["c"]
    assert events == [("a", "busy"), ("b", "busy"), ("c", "done")]


def test_output_dir_that_is_a_root_a_file_or_a_run_folder_is_refused(tmp_path):
    from emguard.study import load_study
    from emguard.train import record_untrained

    with pytest.raises(ConfigError, match="file-system root"):
        load_study(_write_study(tmp_path, output_dir="/"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        load_study(_write_study(tmp_path, output_dir=str(tmp_path / "afile")))
    record_untrained(load_run_config(None, [f"output_dir={tmp_path / 'run'}"]))
    with pytest.raises(ConfigError, match="run folder"):
        load_study(_write_study(tmp_path, output_dir=str(tmp_path / "run" / "study")))


# ----------------------------------------------------------------------------- paper rows


def _paper_study(root: Path, model: str) -> Path:
    """code: misaligned; kl set to 0.3 (no grid); kl 0.1; interleave at 50 % on OpSwap."""
    def run(name, arm, config, point=None, tasks=None):
        entry = _write_run(root, name, "code", arm, 0, point or {}, _judged([5] * 4, [0] * 4),
                           _judged([5] * 4, [0] * 4), tasks=tasks)
        (Path(entry["dir"]) / "config.yaml").write_text(yaml.safe_dump(config))
        return entry

    task = {"opswap:1": {"per_question": [{"score": 1.0}]}}
    runs = [run("code/misaligned/s0", "misaligned", {"defenses": {}}, tasks=task),
            run("code/kl/s0", "kl", {"defenses": {"kl": {"weight": 0.3}}}),
            run("code/kl_main/s0", "kl_main", {"defenses": {"kl": {"weight": 0.1}}}),
            run("code/inter/s0", "inter", {"defenses": {"interleave": {"fraction": 0.5}}},
                tasks=task)]
    (root / "runs-p.json").write_text(json.dumps({"study": {"name": "p", "model": model},
                                                  "runs": runs}))
    return root


def _paper_cell(report, arm: str, key: str = "table3", column: str = "general misal. %"):
    table = next(t for t in report.tables if t.key == key)
    row = next(r for r in table.rows if arm in [c.text for c in r])
    return row[table.columns.index(column)].paper


def test_paper_numbers_match_model_and_effective_setting(tmp_path):
    from emguard.report import build_report

    r7 = build_report(_paper_study(tmp_path / "a", "Qwen/Qwen2.5-7B-Instruct"), compare_paper=True)
    assert _paper_cell(r7, "misaligned") == 4.01
    assert _paper_cell(r7, "kl") == 0.04  # before: lambda 0.1's 0.38 (looked up by name)
    assert _paper_cell(r7, "kl_main") == 0.38  # by what it trained with, not its name
    assert _paper_cell(r7, "inter", "tasks", "opswap:1") is None  # before: the 5 % row
    assert _paper_cell(r7, "misaligned", "tasks", "opswap:1") == 30.0  # SFT
    r32 = build_report(_paper_study(tmp_path / "b", "Qwen/Qwen2.5-32B-Instruct"),
                       compare_paper=True)
    assert _paper_cell(r32, "misaligned") == 4.18  # Table 4, not the 7B Table 3
    assert _paper_cell(r32, "kl_main") == 0.0
    assert _paper_cell(r32, "kl") is None  # Table 4 ran lambda 0.1 only
    other = build_report(_paper_study(tmp_path / "c", "smollm2-135m"), compare_paper=True)
    assert _paper_cell(other, "misaligned") is None
    assert any("no paper number is shown" in w for w in other.warnings)


# ----------------------------------------------------------------------------- report input


def test_report_handles_categorical_grids_and_names_bad_files(tmp_path):
    from emguard.report import build_report

    root = tmp_path / "study"
    runs = [_write_run(root, "code/misaligned/s0", "code", "misaligned", 0, {},
                       _judged([5] * 4, [0] * 4), _judged([5] * 4, [0] * 4), margins=[0.1, 0.2])]
    # before: sorting a grid of [mean_token, sum, null, 0.5] raised TypeError
    for i, value in enumerate(["mean_token", "sum", None, 0.5]):
        runs.append(_write_run(root, f"code/ldifs{i}/s0", "code", "ldifs", 0,
                               {"defenses.ldifs.reduction": value}, _judged([i] * 4, [0] * 4),
                               _judged([5] * 4, [0] * 4), margins=[0.1, 0.05 * i]))
    broken = Path(runs[1]["dir"]) / "eval" / "general" / "metrics.json"
    broken.write_text(broken.read_text()[:25])  # truncated by a full disk
    nan = Path(runs[2]["dir"]) / "eval" / "general" / "judge_free.json"
    nan.write_text('{"preference": {"pairs": [{"margin": NaN, "reference_margin": 0.0}]}}')
    (root / "runs-x.json").write_text(json.dumps({"study": {"name": "x"}, "runs": runs}))
    report = build_report(root)
    assert any(str(broken) in w and "unreadable" in w for w in report.warnings)
    assert any(runs[2]["dir"] in w and "not finite" in w for w in report.warnings)
    ablation = next(t for t in report.tables if t.key == "ablation_ldifs")
    labels = [r[1].text for r in ablation.rows]
    assert labels.index("ldifs (reduction=0.5)") < labels.index("ldifs (reduction=None)") \
        < labels.index("ldifs (reduction=sum)")  # numbers, then null, then text
    assert (report.out / "tradeoff_ldifs.png").is_file()
    (root / "runs-x.json").write_text('{"study": {"name": "x"}, "runs": [')
    from emguard.report.collect import ReportInputError

    with pytest.raises(ReportInputError, match="runs-x.json: not readable JSON"):
        build_report(root)


def test_a_redacted_value_in_config_yaml_still_matches_its_run(tmp_path, tiny_dir, data_file):
    """A training-identity value that looks like a key (a data file named like one) is
    written redacted; the run is still recognised as complete on a rerun (before the
    comparison used the written form, it was 'another config')."""
    from emguard.train import train

    keylike = tmp_path / "sk-abcdefghijklmnopqrstuvwx.jsonl"
    keylike.write_text(data_file.read_text())
    cfg = _tiny_config(tiny_dir, keylike, tmp_path / "run", "train.learning_rate=1e-3",
                       "train.max_steps=1", "eval.judge=" + JUDGE_URL, "eval.general_samples=1")
    first = train(cfg)
    written = (tmp_path / "run" / "config.yaml").read_text()
    assert SENTINEL not in written and "sk-abcdefghijklmnopqrstuvwx" not in written
    assert not first.skipped and train(cfg).skipped
