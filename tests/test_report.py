"""The report, recomputed from run folders this test writes by hand.

Every expected number below is worked out here from the counts written into the
fixtures (pooled rates, means over seeds, spreads, reductions, retentions), not taken
from the report code; intervals are checked for what must hold (they contain the value,
collapse when every question agrees) and marks only where the data decide them.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from emguard.eval_log import EvalLog
from emguard.metrics import compute_metrics
from emguard.report import build_report
from emguard.report.collect import ReportInputError, load_runs


def _judged(mis: list[int], inc: list[int] | None = None, scored: int = 10) -> dict:
    """llm_judge block with one entry per question: (misaligned, incoherent) of `scored`,
    computed by emguard.metrics from judgments with those counts (as evaluate does)."""
    inc = inc if inc is not None else [0] * len(mis)
    records = []
    for i, (m, c) in enumerate(zip(mis, inc, strict=True)):
        assert m + c <= scored, "an answer is misaligned (coherent) or incoherent, not both"
        scores = [(0.0, 100.0)] * m + [(100.0, 0.0)] * c + [(100.0, 100.0)] * (scored - m - c)
        records += [{"question_id": f"q{i}", "aligned": a, "coherent": co} for a, co in scores]
    return compute_metrics(records)


def eval_log(judged: dict | None, run: dict | None = None, tasks: dict | None = None,
             judge: str | None = "openai:x") -> dict:
    """A metrics.json's dict as emguard.evaluate writes it, built through ``EvalLog`` (so
    it cannot drift from what an evaluation writes)."""
    n = judged["overall"]["n_answers"] if judged else 0
    spec = {"model": "Qwen/Qwen2.5-7B-Instruct", "adapter": None, "judge": judge, "run": run}
    return EvalLog(run=run, spec=spec, n_generations=n, judge=judge, llm_judge=judged,
                   llm_judge_note=None if judge else "no judge configured",
                   tasks=tasks).to_dict()


def _write_run(root: Path, name: str, domain: str, arm: str, seed: int, point: dict,
               general: dict | None, indomain: dict | None, tasks: dict | None = None,
               margins: list[float] | None = None, nll_rows: list[tuple] | None = None) -> dict:
    run_dir = root / "runs" / name.replace("/", "_")
    for part, judged in (("general", general), ("indomain", indomain)):
        d = run_dir / "eval" / part
        d.mkdir(parents=True)
        metrics = eval_log(judged, run={"path": str(run_dir)},
                           tasks=tasks if part == "general" else None)
        (d / "metrics.json").write_text(json.dumps(metrics))
        if part == "general" and margins is not None:  # base model's margins: 0.05 each
            (d / "judge_free.json").write_text(json.dumps(
                {"preference": {"pairs": [{"margin": m, "reference_margin": 0.05} for m in margins]}}))
        if part == "indomain" and nll_rows is not None:
            (d / "judge_free.json").write_text(json.dumps({"heldout_nll": {
                "nll_mean": sum(r[0] for r in nll_rows) / sum(r[1] for r in nll_rows),
                "per_row": [{"nll_sum": a, "n_tokens": n} for a, n in nll_rows]}}))
    (run_dir / "config.yaml").write_text("defenses:\n  interleave: null\neval: {}\n")
    return {"name": name, "domain": domain, "arm": arm, "seed": seed, "point": point,
            "kind": "train", "dir": str(run_dir), "needs": []}


@pytest.fixture
def study(tmp_path) -> Path:
    root = tmp_path / "study"
    ten = [0] * 10
    runs = [
        # misaligned baseline, two seeds: general 50 % and 30 % -> mean 40, sd 14.14
        _write_run(root, "code/misaligned/s0", "code", "misaligned", 0, {},
                   _judged([5] * 10, [1] * 10), _judged([5] * 10, ten),
                   tasks={"opswap:1": {"per_question": [{"score": 1.0}, {"score": 0.5}]}},
                   margins=[0.1, -0.2, 0.3], nll_rows=[(6.0, 10), (2.0, 10), (1.0, 20)]),
        _write_run(root, "code/misaligned/s1", "code", "misaligned", 1, {},
                   _judged([3] * 10, [1] * 10), _judged([5] * 10, ten)),
        # KL 0.1: nothing misaligned anywhere (reduction exactly 100 % in every replicate),
        # incoherent 6 of 10 everywhere (clearly above the baseline's 1 of 10)
        _write_run(root, "code/kl_weight0.1/s0", "code", "kl", 0, {"defenses.kl.weight": 0.1},
                   _judged(ten, [6] * 10), _judged([5] * 10, ten)),
        # KL 1.0: 1 misaligned answer of 100 -> 1 %; its baseline below is 20 of 100
        _write_run(root, "advice/kl_weight1.0/s0", "advice", "kl", 0, {"defenses.kl.weight": 1.0},
                   _judged([1] + [0] * 9, ten), _judged([4] * 10, ten)),
        _write_run(root, "advice/misaligned/s0", "advice", "misaligned", 0, {},
                   _judged([10, 10] + [0] * 8, ten), _judged([5] * 10, ten)),
        _write_run(root, "code/kl_weight1.0/s0", "code", "kl", 0, {"defenses.kl.weight": 1.0},
                   _judged(ten, ten), _judged([2] * 10, ten)),
    ]
    config = {"name": "fixture", "model": "Qwen/Qwen2.5-7B-Instruct", "output_dir": str(root)}
    (root / "runs-fixture.json").write_text(json.dumps({"study": config, "runs": runs}))
    return root


def _row(table, *labels):
    for row in table.rows:
        if [c.text for c in row[:len(labels)]] == list(labels):
            return {col: cell for col, cell in zip(table.columns, row, strict=True)}
    raise AssertionError(f"no row {labels} in {table.title}")


def test_rates_seeds_reduction_retention_and_marks(study):
    report = build_report(study)
    ablation = next(t for t in report.tables if t.key == "ablation_kl")
    base = _row(ablation, "code", "misaligned")["general misal. %"].est
    assert base.value == pytest.approx(40.0) and base.n_seeds == 2
    assert base.sd_seeds == pytest.approx(math.sqrt(((50 - 40) ** 2 + (30 - 40) ** 2) / 1))
    assert base.lo <= 40.0 <= base.hi
    kl = _row(ablation, "code", "kl (weight=0.1)")
    assert kl["general misal. %"].est.value == 0.0
    red = kl["EMA reduction %"]
    assert red.est.value == pytest.approx(100.0) and red.est.lo == pytest.approx(100.0)
    assert red.mark == "✓"
    ret = kl["in-domain retention %"]  # 50 % of answers vs the baseline's 50 %
    assert ret.est.value == pytest.approx(100.0) and ret.mark == "✓"
    assert kl["general incoh. %"].mark == "↑"  # 60 % vs 10 %, every question agrees
    weak = _row(ablation, "advice", "kl (weight=1.0)")
    # 1 - 1/20 = 95 %: above 90, but with 10 questions the interval reaches below it
    assert weak["EMA reduction %"].est.value == pytest.approx(95.0)
    assert weak["EMA reduction %"].est.lo < 90 and weak["EMA reduction %"].mark == ""
    assert weak["in-domain retention %"].est.value == pytest.approx(80.0)  # 40 % / 50 %
    low = _row(ablation, "code", "kl (weight=1.0)")["in-domain retention %"]
    assert low.est.value == pytest.approx(100 * 20 / 50) and low.mark == ""
    # Table 3 holds only the baselines here (KL has two values: an ablation), so there is
    # no per-arm mean over datasets, and empty tables are left out
    assert "average" not in [t.key for t in report.tables] and all(t.rows for t in report.tables)
    labels = [(r[0].text, r[1].text) for r in ablation.rows]
    assert labels == sorted(labels, key=lambda x: (x[0], x[1] != "misaligned", x[1]))


def test_mean_over_datasets_averages_each_datasets_reduction(tmp_path):
    root = tmp_path / "s"
    runs = [_write_run(root, f"{d}/{a}/s0", d, a, 0, {}, _judged(mis, [0] * 10), _judged([5] * 10, [0] * 10))
            for d, a, mis in (("code", "misaligned", [4] * 10), ("code", "kl", [1] * 10),
                              ("legal", "misaligned", [8] * 10), ("legal", "kl", [4] * 10))]
    (root / "runs-s.json").write_text(json.dumps({"study": {"name": "s"}, "runs": runs}))
    avg = next(t for t in build_report(root).tables if t.key == "average")
    (row,) = avg.rows
    # code: 1 - 10/40 = 75 %; legal: 1 - 40/80 = 50 % -> mean 62.5 %
    assert row[0].text == "kl" and row[1].est.value == pytest.approx(62.5)
    assert row[2].est.value == pytest.approx(100.0) and row[2].mark == "✓"


def test_tasks_judge_free_paper_and_files(study):
    report = build_report(study, compare_paper=True)
    tasks = next(t for t in report.tables if t.key == "tasks")
    assert tasks.columns == ["arm", "opswap:1"]
    cell = _row(tasks, "misaligned")["opswap:1"]
    assert cell.est.value == pytest.approx(75.0)
    free = next(t for t in report.tables if t.key == "judge_free")
    margin = _row(free, "code", "misaligned")["misalignment preference margin"].est
    assert margin.value == pytest.approx((0.1 - 0.2 + 0.3) / 3)
    share = _row(free, "code", "misaligned")["pairs preferring the misaligned answer (%)"].est
    assert share.value == pytest.approx(200 / 3)
    shift = _row(free, "code", "misaligned")["preference shift vs. base model"].est
    assert shift.value == pytest.approx((0.1 - 0.2 + 0.3) / 3 - 0.05)
    # held-out NLL: token-weighted (9 nats / 40 tokens), interval from resampled rows, which
    # can only range between the rows' own per-token NLLs (0.05 and 0.6)
    nll = _row(free, "code", "misaligned")["held-out NLL (nats/token)"].est
    assert nll.value == pytest.approx(9.0 / 40)
    assert 0.05 <= nll.lo < nll.value < nll.hi <= 0.6
    table3 = next(t for t in report.tables if t.key == "table3")
    assert "(paper 4.01)" in _row(table3, "code", "misaligned")["general misal. %"].text
    abl = next(t for t in report.tables if t.key == "ablation_kl")
    assert "(paper 0.38)" in _row(abl, "code", "kl (weight=0.1)")["general misal. %"].text
    out = report.out
    rows = list(csv.DictReader((out / "report.csv").open()))
    kl_red = [r for r in rows if r["table"] == "ablation_kl" and r["column"] == "EMA reduction %"
              and r["row"] == "code / kl (weight=0.1)"]
    assert len(kl_red) == 1 and float(kl_red[0]["value"]) == pytest.approx(100.0)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(report.figures) >= 2
    assert "src=\"http" not in html and "<table>" in html and "fixture" in html
    assert (out / "tradeoff_kl.png").is_file() and (out / "tradeoff_kl.svg").is_file()
    assert "| code | misaligned |" in (out / "report.md").read_text()


def test_missing_study_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ReportInputError, match="run `emguard sweep"):
        build_report(tmp_path)


def test_report_command(study):
    from typer.testing import CliRunner

    from emguard.cli import app

    result = CliRunner().invoke(app, ["report", str(study), "--out", str(study / "r")])
    assert result.exit_code == 0, result.output
    assert (study / "r" / "report.html").is_file() and "report.html" in result.output
    bad = CliRunner().invoke(app, ["report", str(study / "nowhere")])
    assert bad.exit_code == 2 and "runs-NAME.json" in bad.output


def test_stand_in_interleave_data_is_warned(study):
    run_dir = next((study / "runs").iterdir())
    (run_dir / "config.yaml").write_text(
        "defenses:\n  interleave: {fraction: 0.05, source: 'builtin:safe-instruct'}\neval: {}\n")
    assert any("stand-in, not WildGuardMix" in w for w in build_report(study).warnings)


def test_a_safelora_projection_that_changed_nothing_is_warned(study):
    run_dir = study / "runs" / "code_kl_weight0.1_s0"
    (run_dir / "summary.json").write_text(json.dumps({"safelora": {"tau": 0.3, "share_projected": 0.0}}))
    warned = [w for w in build_report(study).warnings if "SafeLoRA projected no layer" in w]
    assert len(warned) == 1 and warned[0].startswith("code/kl_weight0.1/s0")
    (run_dir / "summary.json").write_text(json.dumps({"safelora": {"tau": 0.3, "share_projected": 0.25}}))
    assert not any("SafeLoRA" in w for w in build_report(study).warnings)


def test_a_newer_or_unknown_format_is_named_and_left_out_and_no_format_is_version_1(study):
    runs = sorted((study / "runs").iterdir())
    newer, unknown, bare, extra = (r / "eval" / "general" / "metrics.json" for r in runs[:4])
    for path, change in ((newer, {"format": "emguard.eval/2"}), (unknown, {"format": "other/1"}),
                         (extra, {"per_answer": []})):
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    log = json.loads(bare.read_text())
    del log["format"]  # a file from before the field: read as version 1
    bare.write_text(json.dumps(log))
    warnings = build_report(study).warnings
    for path, found in ((newer, "'emguard.eval/2' is written by a newer emguard"),
                        (unknown, "unknown format 'other/1'"), (extra, "per_answer")):
        (hit,) = [w for w in warnings if str(path) in w]
        assert found in hit and "'emguard.eval/1'" in hit and "left out of the report" in hit
    assert not any(str(bare) in w for w in warnings)
    _, loaded = load_runs(study)
    by_dir = {r.run_dir: r for r in loaded}
    assert "general" not in by_dir[newer.parents[2]].metrics
    assert by_dir[bare.parents[2]].metrics["general"]["format"] == "emguard.eval/1"


def test_the_eval_log_forbids_fields_it_does_not_name():
    with pytest.raises(ValidationError, match="per_answer"):
        EvalLog(spec={}, n_generations=0, per_answer=[])
    judged = _judged([1], [1], scored=2)
    with pytest.raises(ValidationError, match="n_refused"):
        EvalLog(spec={}, n_generations=2,
                llm_judge={**judged, "overall": {**judged["overall"], "n_refused": 0}})
