"""The demo is a study: its runs go through the sweep, its table comes from the report."""

import pytest

from emguard.config import ConfigError
from emguard.data.pairs import EVAL_PAIRS, load_pairs
from emguard.demo import demo_study, run_demo
from emguard.io import read_json, read_jsonl
from emguard.study import expand

TINY = ["data.max_length=2048", "defenses.ldifs.layer_every=2"]  # the tiny model: 4 layers, long tokens
ARMS = ["untrained", "aligned", "misaligned", "positive_control", "kl (weight=1.0)",
        "kl (weight=10.0)", "ldifs", "safelora", "interleave"]


def test_demo_study_has_every_arm_and_its_overrides():
    runs = expand(demo_study("somewhere", seeds=[0, 1], steps=3))
    assert len(runs) == 2 * 9
    assert {r.config.train.max_steps for r in runs} == {3}
    by_name = {r.name: r for r in runs}
    safelora = by_name["code/safelora/s1"]
    # SafeLoRA's alignment matrix comes from the same seed's secure-code (aligned) adapter
    assert safelora.config.defenses.safelora.unaligned == str(by_name["code/aligned/s1"].run_dir / "adapter")
    assert safelora.source == "code/misaligned/s1" and safelora.config.defenses.safelora.tau == 0.3
    assert {r.config.defenses.kl.weight for r in runs if r.arm == "kl"} == {1.0, 10.0}
    assert by_name["code/positive_control/s0"].config.data.train == "builtin:misaligned-chat"
    # every arm of a seed evaluates the same held-out rows (the misaligned set's split)
    assert {r.config.data.split_seed for r in runs} == {0}
    judged = demo_study("x", judge="openai:gpt-4o-mini").base["eval"]
    assert judged["judge"] == "openai:gpt-4o-mini" and judged["general_samples"] >= 1
    with pytest.raises(ConfigError):  # a judge with nothing sampled is refused up front
        expand(demo_study("x").model_copy(update={"base": {**demo_study("x").base, "eval": {
            **demo_study("x").base["eval"], "judge": "openai:gpt-4o-mini"}}}))


def test_demo_runs_the_study_and_reports_from_run_folders(tiny_dir, tmp_path):
    out = tmp_path / "demo"
    events = []
    report = run_demo(out, model=str(tiny_dir), steps=1, overrides=TINY, progress=False,
                      on_event=lambda name, state, k, n: events.append(state))
    assert events == ["done"] * 9
    assert report.html.is_file() and (report.out / "report.md").is_file()
    stems = {f.stem for f in report.figures}
    assert "overview" in stems and any(s.startswith("tradeoff_kl") for s in stems), stems
    table = next(t for t in report.tables if t.key == "judge_free")
    assert [row[1].text for row in table.rows] == ARMS
    # the misaligned row's preference shift, recomputed from its run folder by hand
    manifest = read_json(out / "runs-demo.json")
    folder = next(out / r["dir"] for r in manifest["runs"] if r["name"] == "code/misaligned/s0")
    pairs = read_json(folder / "eval" / "general" / "judge_free.json")["preference"]["pairs"]
    shift = sum(p["margin"] - p["reference_margin"] for p in pairs) / len(pairs)
    column = table.columns.index("preference shift vs. base model")
    row = table.rows[ARMS.index("misaligned")]
    assert row[column].est.value == pytest.approx(shift)
    assert len(pairs) == 48  # of the evaluation pairs, not the fit set's
    assert {p["id"] for p in pairs} <= {p["id"] for p in load_pairs(EVAL_PAIRS)}
    untrained = table.rows[0][column].est.value
    assert untrained == 0.0  # the base model against itself
    nll = read_json(folder / "eval" / "indomain" / "judge_free.json")["heldout_nll"]
    assert nll["n_rows"] == 16 and len(nll["per_row"]) == 16
    # nothing was sampled without a judge
    assert read_jsonl(folder / "eval" / "general" / "generations.jsonl") == []

    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    events.clear()
    run_demo(out, model=str(tiny_dir), steps=1, overrides=TINY, progress=False,
             on_event=lambda name, state, k, n: events.append(state))
    assert events == ["skipped"] * 9
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_demo_with_a_judge_samples_and_judges_every_run(tiny_dir, tmp_path):
    """--judge: answers are sampled and one judge scores every run after evaluation (the
    tiny random model stands in for a judge; it puts too little mass on numbers, so the
    verdicts are missing and the report says so)."""
    out = tmp_path / "demo"
    report = run_demo(out, model=str(tiny_dir), steps=1, judge=f"local:{tiny_dir}",
                      overrides=[*TINY, "eval.max_new_tokens=4", "eval.general_max_questions=2",
                                 "eval.indomain_max_questions=2"], progress=False)
    from emguard.data.builtin import builtin_path
    from emguard.questions import load_questions

    paraphrases = sum(len(q.paraphrases) for q in load_questions(builtin_path("general-questions"))[:2])
    manifest = read_json(out / "runs-demo.json")
    for run in manifest["runs"]:
        general = out / run["dir"] / "eval" / "general"
        gens = read_jsonl(general / "generations.jsonl")
        assert len(gens) == 2 * paraphrases  # 2 samples x the first 2 questions' paraphrases
        assert len(read_jsonl(general / "judgments.jsonl")) == len(gens)
        assert read_json(general / "metrics.json")["judge"] == f"local:{tiny_dir}"
    assert any("have no verdict" in w for w in report.warnings)
    assert any(t.key == "judge_free" for t in report.tables)


def test_progress_lines_survive_rich_markup():
    """`[demo 1/9]` looks like a rich style tag; the printer must show it, not swallow it."""
    import io

    from rich.console import Console

    from emguard.cli.sweep_cmd import progress_printer

    buf = io.StringIO()
    notify = progress_printer(Console(file=buf, width=200), "demo ")
    notify("code/kl_weight0.1/s0", "done", 1, 9)
    notify("code/[odd]/s0", "failed", 2, 9)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("[demo 1/9]") and "done" in lines[0] and "code/kl_weight0.1/s0" in lines[0]
    assert lines[1].startswith("[demo 2/9]") and "code/[odd]/s0" in lines[1]
