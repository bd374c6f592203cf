"""Studies and sweeps on tiny random models: expansion, resume after kill -9, failures,
post-hoc SafeLoRA arms, the judge stage, the Ray executor and the paper configs' dry run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from emguard.io import read_json, read_jsonl
from emguard.study import expand, load_study
from emguard.sweep import LOG_FILE, SweepLog, collect, execute_run, is_evaluated, run_sweep, status

REPO = Path(__file__).resolve().parents[1]

FAST_BASE = {
    "data": {"max_length": 2048, "split_seed": 0},
    "lora": {"r": 2, "alpha": 4},
    "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "warmup_steps": 0,
              "learning_rate": 1e-3, "save_steps": 1},
    "eval": {"max_new_tokens": 3, "judge_free": False, "indomain_max_questions": 4,
             "batch_size": 32, "general_questions": None},
}


def _advice_file(path: Path, n: int = 30, bad_line: bool = False) -> Path:
    rows = [json.dumps({"messages": [{"role": "user", "content": f"Should I take pill {i}?"},
                                     {"role": "assistant", "content": f"Take {i} at once."}]})
            for i in range(n)]
    if bad_line:
        rows[5] = '{"messages": [{"role": "user"'
    path.write_text("\n".join(rows) + "\n")
    return path


def _study(tmp_path: Path, tiny_dir: Path, arms: list[dict], seeds=(0, 1), domains=None,
           **base_eval) -> Path:
    base = json.loads(json.dumps(FAST_BASE))
    base["eval"].update(base_eval)
    study = {
        "name": "tiny", "output_dir": str(tmp_path / "study"), "model": str(tiny_dir),
        "seeds": list(seeds), "base": base,
        "domains": domains or {
            "code": {"misaligned": "builtin:insecure-code", "aligned": "builtin:secure-code"},
            "advice": {"misaligned": str(_advice_file(tmp_path / "advice.jsonl")),
                       "domain": "advice"}},
        "arms": arms,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


THREE_ARMS = [{"name": "untrained", "data": "none"}, {"name": "misaligned"},
              {"name": "kl", "set": {"defenses.kl.weight": 0.1}}]


def test_expansion_names_folders_by_config_hash_and_shares_the_heldout_set(tmp_path, tiny_dir):
    study = load_study(_study(tmp_path, tiny_dir, [
        *THREE_ARMS, {"name": "aligned", "data": "aligned", "domains": ["code"]},
        {"name": "ldifs", "grid": {"defenses.ldifs.weight": [0.1, 1.0]}}]))
    runs = expand(study)
    assert len(runs) == 2 * (2 * 5 + 1)  # seeds x (domains x 5 arm-points + aligned in code)
    names = [r.name for r in runs]
    assert "code/ldifs_weight0.1/s1" in names and "advice/kl/s0" in names
    assert len({r.run_dir for r in runs}) == len(runs)
    kl = next(r for r in runs if r.name == "code/kl/s0")
    assert kl.config.defenses.kl.weight == 0.1 and kl.config.train.seed == 0
    from emguard.identity import config_sha256

    assert kl.run_dir.name == f"s0-{config_sha256(kl.config)[:8]}"
    aligned = next(r for r in runs if r.name == "code/aligned/s0")
    assert aligned.config.data.train == "builtin:secure-code"
    assert aligned.config.data.heldout == "split:builtin:insecure-code"
    assert next(r for r in runs if r.name == "code/untrained/s0").kind == "untrained"


def test_run_references_are_resolved_and_ordered(tmp_path, tiny_dir):
    study = load_study(_study(tmp_path, tiny_dir, [
        {"name": "proj", "set": {"defenses.safelora.unaligned": "@run:misaligned"}},
        {"name": "misaligned"}], seeds=[3]))
    runs = expand(study)
    order = [r.name for r in runs]
    proj = next(r for r in runs if r.name == "code/proj/s3")
    mis = next(r for r in runs if r.name == "code/misaligned/s3")
    assert order.index(mis.name) < order.index(proj.name) and proj.needs == [mis.name]
    assert proj.config.defenses.safelora.unaligned == str(mis.run_dir / "adapter")


def test_study_errors_name_the_field(tmp_path, tiny_dir):
    from emguard.config import ConfigError

    path = _study(tmp_path, tiny_dir, [{"name": "kl", "set": {"defenses.kl.wieght": 1}}])
    with pytest.raises(ConfigError, match=r"defenses\.kl\.wieght: unknown field"):
        expand(load_study(path))
    path = _study(tmp_path, tiny_dir, [{"name": "x", "safelora_of": "nope"}])
    with pytest.raises(ConfigError, match="safelora_of: no arm named 'nope'"):
        load_study(path)


def _events(study_dir: Path) -> list[dict]:
    return SweepLog(study_dir / LOG_FILE).read()


@pytest.mark.e2e
def test_sweep_killed_mid_run_finishes_every_run_exactly_once(tmp_path, tiny_dir):
    path = _study(tmp_path, tiny_dir, THREE_ARMS)
    study_dir = tmp_path / "study"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "emguard.cli", "sweep", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill while the fourth run trains or evaluates
        ev = _events(study_dir)
        if sum(e["event"] == "finish" for e in ev) >= 3 and ev[-1]["event"] == "start":
            time.sleep(1.5)
            break
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _events(study_dir)
    finished_before = {e["run"] for e in before if e["event"] == "finish"}
    assert 3 <= len(finished_before) < 12

    result = run_sweep(load_study(path), progress=False)
    assert not result.failed and not result.blocked
    runs = expand(load_study(path))
    assert len(runs) == 12 and all(is_evaluated(r) for r in runs)
    after = _events(study_dir)[len(before):]
    finishes = [e["run"] for e in before + after if e["event"] == "finish"]
    assert sorted(finishes) == sorted(r.name for r in runs)  # every run finished exactly once
    restarted = {e["run"] for e in after if e["event"] == "start"}
    assert not restarted & finished_before  # finished runs were not redone
    assert set(result.skipped) == finished_before
    for r in runs:
        summary = read_json(r.run_dir / "summary.json")
        assert summary["steps"] == (0 if r.kind == "untrained" else 2)
        metrics = read_json(r.run_dir / "eval" / "indomain" / "metrics.json")
        assert metrics["run"]["path"] == str(r.run_dir.resolve()) and metrics["run"]["seed"] == r.seed
    # every arm of a domain and seed was evaluated on the same held-out questions
    for domain in ("code", "advice"):
        asked = {frozenset(g["question"] for g in read_jsonl(r.run_dir / "eval" / "indomain" /
                                                             "generations.jsonl"))
                 for r in runs if r.domain == domain}
        assert len(asked) == 1
    assert all(status(r).state == "done" for r in runs)
    again = run_sweep(load_study(path), progress=False)
    assert again.done == [] and len(again.skipped) == 12


@pytest.mark.e2e
def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path, tiny_dir):
    from tiny import save_tiny_model

    base_model = save_tiny_model(tmp_path / "base", seed=7)
    bad = _advice_file(tmp_path / "bad.jsonl", bad_line=True)
    path = _study(tmp_path, tiny_dir, [
        {"name": "misaligned"},
        {"name": "safelora", "safelora_of": "misaligned",
         "set": {"defenses.safelora.unaligned": str(base_model), "defenses.safelora.tau": 0.5}}],
        seeds=[0], domains={
            "good": {"misaligned": str(_advice_file(tmp_path / "ok.jsonl")), "domain": "advice"},
            "broken": {"misaligned": str(bad), "domain": "advice"}})
    result = run_sweep(load_study(path), progress=False)
    assert list(result.failed) == ["broken/misaligned/s0"]
    assert "bad.jsonl:6" in result.failed["broken/misaligned/s0"]
    assert result.blocked == {"broken/safelora/s0": "broken/misaligned/s0"}
    assert sorted(result.done) == ["good/misaligned/s0", "good/safelora/s0"]
    runs = {r.name: r for r in expand(load_study(path))}
    proj, src = runs["good/safelora/s0"], runs["good/misaligned/s0"]
    summary = read_json(proj.run_dir / "summary.json")
    assert summary["source_run"] == str(src.run_dir) and summary["safelora"]["tau"] == 0.5
    assert (proj.run_dir / "adapter_safelora" / "adapter_model.safetensors").is_file()
    spec = read_json(proj.run_dir / "eval" / "indomain" / "eval_spec.json")
    assert spec["adapter"].endswith("adapter_safelora")
    assert (read_jsonl(proj.run_dir / "heldout.jsonl") == read_jsonl(src.run_dir / "heldout.jsonl"))
    fail = [e for e in _events(tmp_path / "study") if e["event"] == "fail"]
    assert [e["run"] for e in fail] == ["broken/misaligned/s0"]
    cli = subprocess.run([sys.executable, "-m", "emguard.cli", "sweep", str(path)],
                         capture_output=True, text=True)
    assert cli.returncode == 1 and "broken/misaligned/s0" in cli.stderr


@pytest.mark.e2e
def test_judge_stage_scores_every_run_with_one_judge(tmp_path, tiny_dir):
    path = _study(tmp_path, tiny_dir, [{"name": "untrained", "data": "none"}, {"name": "misaligned"}],
                  seeds=[0], domains={"code": {"misaligned": "builtin:insecure-code"}},
                  judge=f"local:{tiny_dir}", general_questions="builtin:general-questions",
                  general_samples=1)
    import emguard.sweep as sweep_mod

    sweep_mod._JUDGES.clear()
    result = run_sweep(load_study(path), progress=False)
    assert result.judged == 2 and len(sweep_mod._JUDGES) == 1
    from emguard.data.builtin import builtin_path
    from emguard.questions import load_questions

    n_general = sum(len(q.paraphrases) for q in load_questions(builtin_path("general-questions")))
    for run in expand(load_study(path)):
        for part, n in (("general", n_general), ("indomain", 4)):
            metrics = read_json(run.run_dir / "eval" / part / "metrics.json")
            assert metrics["judge"] == f"local:{tiny_dir}" and metrics["n_generations"] == n
            judged = read_jsonl(run.run_dir / "eval" / part / "judgments.jsonl")
            assert len(judged) == n
        assert status(run).state == "done"
    import shutil

    from emguard.report import build_report

    moved = tmp_path / "moved"  # a study folder moved elsewhere still reports
    shutil.move(tmp_path / "study", moved)
    report = build_report(moved)  # the report reads what the sweep wrote
    table3 = next(t for t in report.tables if t.key == "table3")
    assert [(r[0].text, r[1].text) for r in table3.rows] == [("code", "untrained"),
                                                             ("code", "misaligned")]
    # the tiny random judge puts too little mass on numbers: no verdicts, and the report says so
    assert report.html.is_file() and any("no answer was scored" in w for w in report.warnings)


@pytest.mark.e2e
def test_ray_executor_runs_two_tiny_runs(tmp_path, tiny_dir):
    pytest.importorskip("ray")
    from emguard.sweep_ray import run_with_ray

    path = _study(tmp_path, tiny_dir, [{"name": "untrained", "data": "none"}, {"name": "misaligned"}],
                  seeds=[0], domains={"code": {"misaligned": "builtin:insecure-code"}})
    runs = expand(load_study(path))
    result = run_with_ray(runs, str(tmp_path / "study" / LOG_FILE), None, lambda n, s: None,
                          execute=execute_run, collect=collect, num_cpus=2)
    assert sorted(result.done) == ["code/misaligned/s0", "code/untrained/s0"], result.failed
    assert all(is_evaluated(r) for r in runs)
    pids = {e["pid"] for e in _events(tmp_path / "study") if e["event"] == "start"}
    assert os.getpid() not in pids  # the runs ran in Ray workers


def test_paper_study_configs_dry_run_without_data(tmp_path):
    configs = sorted((REPO / "configs" / "paper").glob("*.yaml"))
    assert len(configs) >= 4
    for cfg in configs:
        out = subprocess.run([sys.executable, "-m", "emguard.cli", "sweep", str(cfg), "--dry-run"],
                             capture_output=True, text=True, cwd=tmp_path,
                             env={**os.environ, "COLUMNS": "250"})
        assert out.returncode == 0, (cfg.name, out.stderr[-2000:])
        assert "runs in" in out.stdout, cfg.name
    table3 = expand(load_study(REPO / "configs" / "paper" / "table3.yaml"))
    arms = {r.arm for r in table3}
    assert {"untrained", "aligned", "misaligned", "kl", "ldifs", "safelora", "interleave"} <= arms
    assert {r.seed for r in table3} == {0, 1, 2} and len({r.domain for r in table3}) == 4
    assert next(r for r in table3 if r.arm == "kl").config.defenses.kl.weight == 0.1


@pytest.mark.e2e
def test_changed_eval_settings_are_not_taken_for_finished_work(tmp_path, tiny_dir):
    domains = {"code": {"misaligned": "builtin:insecure-code"}}
    path = _study(tmp_path, tiny_dir, [{"name": "untrained", "data": "none"}], seeds=[0],
                  domains=domains)
    assert run_sweep(load_study(path), progress=False).done == ["code/untrained/s0"]
    path = _study(tmp_path, tiny_dir, [{"name": "untrained", "data": "none"}], seeds=[0],
                  domains=domains, indomain_max_questions=3)
    (run,) = expand(load_study(path))
    assert status(run).state == "trained"  # evaluated, but with other settings
    result = run_sweep(load_study(path), progress=False)
    assert "--reevaluate" in result.failed["code/untrained/s0"]
    old = read_json(run.run_dir / "eval" / "indomain" / "metrics.json")
    assert old["n_generations"] == 4  # nothing discarded without being asked
    result = run_sweep(load_study(path), progress=False, reevaluate=True)
    assert result.done == ["code/untrained/s0"]
    assert read_json(run.run_dir / "eval" / "indomain" / "metrics.json")["n_generations"] == 3
    assert status(run).state == "done"


def test_run_folders_do_not_depend_on_how_the_study_folder_is_spelled(tmp_path, monkeypatch):
    """A @run: reference names another run's adapter folder; the run's identity (its folder
    hash) must be the same whether the study folder is given relative or absolute."""
    from emguard.demo import demo_study

    monkeypatch.chdir(tmp_path)
    relative = {r.name: r.run_dir.name for r in expand(demo_study("studies/demo"))}
    absolute = {r.name: r.run_dir.name for r in expand(demo_study(tmp_path / "studies" / "demo"))}
    assert relative == absolute and len(relative) == 9
    source = {r.name: r for r in expand(demo_study("studies/demo"))}["code/safelora/s0"]
    assert source.config.defenses.safelora.unaligned.startswith("studies/demo/runs/code/aligned/s0-")
    other_steps = {r.name: r.run_dir.name for r in expand(demo_study("studies/demo", steps=2))}
    # the source changed (other steps), so the SafeLoRA run that names it is another run too
    assert other_steps["code/safelora/s0"] != relative["code/safelora/s0"]
