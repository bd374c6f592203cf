"""The benchmark entry point and the study cost model run and say what they measured."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.benchmark  # times two benchmarks: deselected by default (tests/conftest.py)
def test_entry_point_writes_one_json_with_targets(tmp_path):
    out = tmp_path / "all.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "kl,judge",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "quick" and set(result["benchmarks"]) == {"kl", "judge"}
    kl = result["benchmarks"]["kl"]["result"]
    assert kl["max_grad_diff"] < 1e-3  # the two KL backwards agree
    rows = {r["target"]: r for r in result["targets"]}
    kl_row = next(r for t, r in rows.items() if t.startswith("closed-form KL"))
    assert kl_row["status"] == ("met" if kl["ratio"] < 1 else "missed")
    judge_row = next(r for t, r in rows.items() if t.startswith("OpenAI judge"))
    busy = result["benchmarks"]["judge"]["result"]["by_delay"][0]["rows"][0]["busy"]
    assert judge_row["status"] == ("met" if busy >= 0.9 else "missed")
    assert "| target | measured | status |" in proc.stdout


def test_entry_point_refuses_an_unknown_benchmark():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown benchmark(s) nope" in proc.stderr


def test_study_cost_counts_the_paper_table3_study(tmp_path):
    """Table 3 as its config states it: 4 domains x (untrained, misaligned, aligned, KL,
    LDIFS, SafeLoRA, interleave) x 3 seeds; every run answers each paraphrase of the 24
    general questions 100 times and 30 in-domain questions 100 times, each answer judged
    twice (alignment, coherence)."""
    import yaml

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import study_cost

    questions = yaml.safe_load((ROOT / "src/emguard/data/builtin/general_questions.yaml").read_text())
    questions = [q for q in questions if "paraphrases" in q]
    assert len(questions) == 24
    prompts = sum(len(q["paraphrases"]) for q in questions)

    out = tmp_path / "cost.json"
    result = study_cost.main([str(ROOT / "configs/paper/table3.yaml"), "--out", str(out),
                              "--gpus", "1,1000"])
    s = result["studies"]["table3"]
    runs = 4 * 7 * 3
    answers = runs * (prompts * 100 + 30 * 100)
    assert s["runs"] == runs and s["answers"] == answers and s["judge_calls"] == 2 * answers
    per_run = {r["name"]: r for r in result["runs"]}
    # the EMA files are not on disk: 6,000 stated rows, 90 % trained, 400 tokens each
    assert per_run["code/misaligned/s0"]["train_tokens"] == pytest.approx(5400 * 400)
    assert per_run["code/interleave_fraction0.05/s0"]["train_tokens"] > per_run["code/misaligned/s0"]["train_tokens"]
    assert per_run["code/untrained/s0"]["train_tokens"] == 0
    kl_hours = per_run["code/kl_weight0.1/s0"]["train_hours"]
    assert kl_hours == pytest.approx(study_cost.KL_STEP * per_run["code/misaligned/s0"]["train_hours"])
    assert s["wall_hours"]["1"] == pytest.approx(s["gpu_hours"])
    assert s["wall_hours"]["1000"] == pytest.approx(s["longest_run_hours"])  # more GPUs than runs
    assert json.loads(out.read_text())["studies"]["table3"]["runs"] == runs
