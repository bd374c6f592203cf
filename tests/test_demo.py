"""The demo's plumbing on a tiny model: runs, measures, table, plot, and a free rerun."""

from emguard.demo import MEASURES, VARIANTS, DemoSettings, run_demo
from emguard.io import read_json


def test_demo_writes_results_and_rerun_skips_everything(tiny_dir, tmp_path):
    s = DemoSettings(model=str(tiny_dir), steps=2, batch_size=2, max_length=2048, n_code_prompts=2,
                     max_new_tokens=8, code_max_new_tokens=8)
    out = tmp_path / "demo"
    result = run_demo(out, s)
    for name in ("demo_results.md", "demo_results.png", "demo_metrics.json"):
        assert (out / name).is_file()
    metrics = read_json(out / "demo_metrics.json")
    assert set(metrics["measures"]) == set(VARIANTS)
    assert metrics["measures"]["untrained"]["drift_kl"] == 0.0  # the reference itself
    for v in ("aligned", "misaligned", "kl"):
        assert metrics["measures"][v]["drift_kl"] > 0
        assert (out / "runs" / v / "summary.json").is_file()
    assert all(label in result["table"] for _, label, _ in MEASURES)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    run_demo(out, s)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if "demo_metrics" not in p.name)
