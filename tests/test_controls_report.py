"""The measure's control arms and trajectories in a study, end to end on a tiny model:
sweep -> run folders -> report (ceiling table, trajectory figure)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from emguard.data.pairs import EVAL_PAIRS, evenly_spaced, load_pairs
from emguard.io import read_json
from emguard.report import build_report
from emguard.report.collect import load_runs
from emguard.report.tables import ceiling_table, trajectory_estimates
from emguard.study import expand, load_study
from emguard.sweep import run_sweep

ARMS = [{"name": "untrained", "data": "none"},
        {"name": "misaligned"},
        {"name": "positive_control", "data": "positive_control"},
        {"name": "negative_control", "data": "negative_control"}]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from tiny import save_tiny_model

    tmp = tmp_path_factory.mktemp("controls")
    tiny = save_tiny_model(tmp / "tiny")
    raw = {"name": "ctl", "output_dir": str(tmp / "study"), "model": str(tiny), "seeds": [0, 1],
           "base": {"data": {"split_seed": 0},
                    "lora": {"r": 2, "alpha": 4},
                    "train": {"max_steps": 3, "batch_size": 2, "grad_accum": 1,
                              "warmup_steps": 0, "learning_rate": 5e-3,
                              "trajectory_steps": [1, 2]},
                    "eval": {"general_samples": 0, "indomain_samples": 0,
                             "general_max_questions": 1, "drift_max_new_tokens": 2,
                             "preference_max_pairs": 12, "indomain_max_questions": 3,
                             "batch_size": 16}},
           "domains": {"code": {"misaligned": "builtin:insecure-code", "domain": "code"}},
           "arms": ARMS}
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_study(path)
    result = run_sweep(cfg, progress=False)
    assert not result.failed, result.failed
    return cfg


def test_controls_train_on_their_data_and_share_the_domains_heldout_set(study):
    runs = {(r.arm, r.seed): r for r in expand(study)}
    pos, neg, mis = (runs[(a, 0)].config.data for a in
                     ("positive_control", "negative_control", "misaligned"))
    assert pos.train == "builtin:misaligned-chat" and neg.train == "builtin:safe-instruct"
    assert pos.heldout == neg.heldout == "split:builtin:insecure-code"
    held = {a: (runs[(a, 0)].run_dir / "heldout.jsonl").read_text()
            for a in ("positive_control", "negative_control", "misaligned")}
    assert held["positive_control"] == held["negative_control"] == held["misaligned"]
    report = read_json(runs[("positive_control", 0)].run_dir / "data_report.json")
    assert report["source"] == "builtin:misaligned-chat" and report["rows"] == 66


def test_every_run_scores_the_evaluation_pairs(study):
    want = [p["id"] for p in evenly_spaced(load_pairs(EVAL_PAIRS), 12)]
    for run in expand(study):
        free = read_json(run.run_dir / "eval" / "general" / "judge_free.json")
        assert free["preference"]["source"] == EVAL_PAIRS
        assert [p["id"] for p in free["preference"]["pairs"]] == want


def test_trajectory_estimates_read_each_snapshot(study):
    _, runs = load_runs(study.output_dir)
    traj = trajectory_estimates(runs, ["preference_shift", "heldout_nll"])
    cell = ("code", "misaligned", ())
    assert sorted(traj[cell]) == [0, 1, 2, 3]
    mis = [r for r in runs if r.arm == "misaligned"]
    for step in (1, 2):  # independent: the mean of margin - reference margin, then over seeds
        per_seed = []
        for r in mis:
            free = read_json(r.run_dir / "eval" / "trajectory" / f"step-{step:05d}" / "general"
                             / "judge_free.json")
            per_seed.append(np.mean([p["margin"] - p["reference_margin"]
                                     for p in free["preference"]["pairs"]]))
        assert traj[cell][step]["preference_shift"].est.value == pytest.approx(np.mean(per_seed))
        assert sorted(traj[cell][step]["preference_shift"].per_seed) == [0, 1]
    assert traj[cell][0]["preference_shift"].est.value == pytest.approx(0.0, abs=1e-9)
    untrained_nll = np.mean([read_json(r.run_dir / "eval" / "indomain" / "judge_free.json")
                             ["heldout_nll"]["nll_mean"] for r in runs if r.arm == "untrained"])
    assert traj[cell][0]["heldout_nll"].est.value == pytest.approx(untrained_nll, rel=1e-6)
    # the last step is the run's own evaluation
    final = [read_json(r.run_dir / "eval" / "indomain" / "judge_free.json")["heldout_nll"]["nll_mean"]
             for r in mis]
    assert traj[cell][3]["heldout_nll"].est.value == pytest.approx(np.mean(final), rel=1e-6)


def test_report_sets_every_arm_beside_the_ceiling_and_plots_trajectories(study):
    _, runs = load_runs(study.output_dir)
    table = ceiling_table(runs)
    rows = {r[1].text: r for r in table.rows}
    assert set(rows) == {"untrained", "misaligned", "positive_control", "negative_control"}
    ceiling = rows["positive_control"][2].est.value
    for arm in ("misaligned", "negative_control"):
        assert rows[arm][3].est.value == pytest.approx(ceiling)
        assert rows[arm][4].est.value == pytest.approx(100 * rows[arm][2].est.value / ceiling)
    report = build_report(study.output_dir)
    names = {f.name for f in report.figures}
    assert "trajectory.png" in names and (report.out / "trajectory.svg").is_file()
    assert "Preference shift against the ceiling" in (report.out / "report.md").read_text()
    assert report.html.is_file()


def test_regime_analysis_recomputes_from_the_run_folders(study):
    """benchmarks/regime_study.py on this study: each contrast at each step equals the mean
    over seeds of the per-pair differences read from the run folders, and the decision is
    the first regime (by step) where all three contrasts hold on every seed."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import regime_study

    r = regime_study.analyse(Path(study.output_dir), study.seeds, name="ctl")
    assert [e["step"] for e in r["regimes"]] == [1, 2, 3]
    runs = {(x.arm, x.seed): x.run_dir for x in expand(study)}

    def shift(arm, seed, step):
        where = runs[(arm, seed)] / "eval" / (f"trajectory/step-{step:05d}" if step < 3 else "")
        pairs = read_json(where / "general" / "judge_free.json")["preference"]["pairs"]
        return np.array([p["margin"] - p["reference_margin"] for p in pairs])

    for e in r["regimes"]:
        got = e["claims"]["misaligned - untrained"]["pooled"]["value"]
        assert got == pytest.approx(np.mean([shift("misaligned", s, e["step"]).mean() for s in (0, 1)]))
        ceiling = e["controls"]["positive_control"]["pooled"]["value"]
        assert ceiling == pytest.approx(np.mean([shift("positive_control", s, e["step"]).mean()
                                                 for s in (0, 1)]))
        assert e["claims"]["misaligned - aligned"] is None  # this study has no aligned arm
        assert not e["all_hold"]
    assert r["chosen"] is None and r["provisional"] is None
    assert "No regime of this grid" in regime_study.markdown(r)
