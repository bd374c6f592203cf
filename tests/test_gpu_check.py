"""The device-check script runs its whole path on CPU with a tiny shape."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.e2e
def test_gpu_check_runs_every_stage_on_cpu(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--bench-shape", "tiny",
                           "--bench-seq", "32", "--bench-steps", "1", "--bench-batch", "2",
                           "--train-steps", "2", "--gen-shape", "tiny", "--gen-answers", "16",
                           "--gen-tokens", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    stages = result["stages"]
    assert result["ok"] and set(stages) == {"build_model", "train_sft", "train_all_defenses",
                                            "safelora", "eval", "bench_seq32", "bench_generate"}
    defended = stages["train_all_defenses"]["summary"]
    assert defended["defenses"] == ["kl", "ldifs", "interleave", "safelora"]
    assert defended["precision"] == "fp32" and defended["optimizer"] == "adamw_torch"
    assert all({"kl", "ldifs"} <= set(e) for e in stages["train_all_defenses"]["log"])
    assert 0.0 <= stages["safelora"]["share_projected"] <= 1.0
    metrics = stages["eval"]["metrics"]
    assert metrics["n_generations"] == 10 and metrics["judge"].startswith("local:")
    assert metrics["llm_judge"]["overall"]["n_answers"] == 10
    assert "drift" in metrics["judge_free"] and "opswap:1" in metrics["tasks"]
    bench = result["bench"]["32"]
    assert {r["config"] for r in bench["rows"]} >= {"sft", "kl", "ldifs", "kl+ldifs", "forward_only"}
    assert bench["checks"]["kl_peak_rss_vs_sft"] > 0
    generate = result["generate"]
    assert generate["checks"]["merged_answers_identical"] is True
    assert {"sampled unmerged b16", "sampled merged b64"} <= set(generate["rows"])
