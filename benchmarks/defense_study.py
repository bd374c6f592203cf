"""Every training-time defense side by side (configs/studies/all_defenses.yaml), judge-free,
three seeds: which arms beat KL on the trade-off between blocking the preference shift
and learning the narrow task, and which direction arms beat their own controls.

Runs the study through ``emguard sweep`` (finished runs are skipped, so a rerun
continues), then reads the run folders. Measures and intervals as benchmarks/demo_seeds.py:
per item (preference pair, held-out row) paired bootstrap, 95 % intervals, pooled over
seeds; a contrast is *shown* when the pooled interval excludes 0 and every seed has the
pooled sign.

  * preference shift: margin (misaligned - aligned answer, nats per token) minus the base
    model's, per pair; lower = less EMA.
  * held-out NLL: nats per token on held-out insecure code; lower = narrow task learned.

Against KL (both measures paired, arm - KL): an arm that shows a lower shift than the
misaligned run *beats KL* when it shows a lower shift than KL without a shown higher NLL,
or a lower NLL without a shown higher shift; *loses to KL* in the mirrored case; otherwise
no difference is shown. An arm with no shown reduction against misaligned is not ranked. Direction arms with a compensation
control (the same arm on the aligned data) get the difference-in-differences; only a shown
negative one is called "prevents". About 2 hours on a 2-core CPU (84 runs, ~75 s each).

    python benchmarks/defense_study.py [--study configs/studies/all_defenses.yaml] [--analyse-only]

Writes docs/defense_study.md, docs/defense_study.png and benchmarks/results/defense_study.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_seeds import bootstrap, combination, fmt, items, summarise  # noqa: E402

from emguard.report.collect import at_step, load_runs  # noqa: E402
from emguard.report.tables import arm_label  # noqa: E402
from emguard.study import load_study  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "defense_study.md"
FIGURE = ROOT / "docs" / "defense_study.png"
RESULTS = ROOT / "benchmarks" / "results" / "defense_study.json"
KEYS = ("shift", "nll")
BASELINES = ("untrained", "aligned", "misaligned")
MEASURE_CONTROLS = ("positive_control", "negative_control")
DIRECTION_CONTROLS = ("random", "orthogonal")


def contrast(by: dict, a: str, b: str, seeds: list[int], rng) -> dict:
    return {k: summarise({s: bootstrap(k, by[(a, s)][k], by[(b, s)][k], rng) for s in seeds})
            for k in KEYS}


def did(by: dict, arm: str, on_aligned: str, seeds: list[int], rng) -> dict:
    """Difference-in-differences (arm - misaligned) - (arm on aligned data - aligned), per
    item and seed: about 0 for a defense that only compensates, below 0 where it prevents."""
    return {k: summarise({s: combination(k, [(1, by[(arm, s)][k]), (-1, by[("misaligned", s)][k]),
                                             (-1, by[(on_aligned, s)][k]), (1, by[("aligned", s)][k])],
                                         rng) for s in seeds}) for k in KEYS}


def verdict_vs_kl(c: dict, vs_misaligned: dict) -> str:
    """The trade-off verdict from the paired (arm - KL) contrasts ``c``. An arm that shows no
    lower shift than the undefended run (``vs_misaligned``: arm - misaligned) defends
    nothing, so it cannot beat KL, however much less it costs on NLL."""
    def shown(key, sign, contrast=c):
        p = contrast[key]["pooled"]
        return p["shown"] and np.sign(p["value"]) == sign

    if not shown("shift", -1, vs_misaligned):
        return "no shown reduction"
    if (shown("shift", -1) and not shown("nll", 1)) or (shown("nll", -1) and not shown("shift", 1)):
        return "beats KL"
    if (shown("shift", 1) and not shown("nll", -1)) or (shown("nll", 1) and not shown("shift", -1)):
        return "loses to KL"
    if shown("shift", -1) or shown("shift", 1):
        return "trades: " + ("less shift, more NLL" if shown("shift", -1) else "more shift, less NLL")
    return "no difference shown"


def analyse(study_dir: Path, name: str) -> dict:
    _, runs = load_runs(study_dir, name)
    done = [r for r in runs if r.free.get("general")]
    by = {(arm_label(r.arm, r.cell[2]), r.seed): items(r) for r in done}
    early = {}  # (arm, seed) -> items at the first kept trajectory step, where every run has it
    kept = [r for r in done if r.trajectory]  # trained runs (the untrained arm keeps none)
    steps = sorted(set.intersection(*(set(r.trajectory) for r in kept))) if kept else []
    if steps:
        for r in kept:
            early[(arm_label(r.arm, r.cell[2]), r.seed)] = items(at_step(r, steps[0]))
    on_aligned = {arm_label(r.control_of, r.cell[2]): arm_label(r.arm, r.cell[2])
                  for r in done if r.control_of}
    seeds = sorted({s for a, s in by if a == "misaligned"})  # a seed counts once its baseline ran
    arms = list(dict.fromkeys(a for a, _ in by))
    complete = [a for a in arms if all((a, s) in by for s in seeds)]
    rng = np.random.default_rng(0)
    out = {"seeds": seeds, "arms": {}, "vs_misaligned": {}, "vs_kl": {}, "vs_control": {},
           "compensation": {}, "per_defense": {}, "early_step": steps[0] if steps else None,
           "partial": {}}
    for arm in complete:
        out["arms"][arm] = {k: summarise({s: bootstrap(k, by[(arm, s)][k], None, rng) for s in seeds})
                            for k in KEYS}
    others = [a for a in complete if a not in BASELINES]
    defenses = [a for a in others if a not in MEASURE_CONTROLS and a not in on_aligned.values()
                and not any(f"control={c}" in a for c in DIRECTION_CONTROLS)]
    pairs = [("misaligned", "aligned"), ("misaligned", "untrained")]
    pairs += [(c, "untrained") for c in MEASURE_CONTROLS if c in complete]
    for a, b in pairs + [(d, "misaligned") for d in others]:
        out["vs_misaligned"][f"{a} - {b}"] = contrast(by, a, b, seeds, rng)
    kls = [a for a in defenses if a.startswith("kl")]
    for kl in kls:
        for d in (d for d in defenses if d != kl):
            c = contrast(by, d, kl, seeds, rng)
            verdict = verdict_vs_kl(c, out["vs_misaligned"][f"{d} - misaligned"])
            out["vs_kl"][f"{d} - {kl}"] = {**c, "verdict": verdict}
    for d, ctrl in on_aligned.items():
        if d in complete and ctrl in complete:
            out["compensation"][d] = did(by, d, ctrl, seeds, rng)
    for ctrl_arm, arm in controlled_arms(done).items():  # the same settings, direction u
        if ctrl_arm in complete and arm in complete:
            out["vs_control"][f"{arm} - {ctrl_arm}"] = contrast(by, arm, ctrl_arm, seeds, rng)
    ema = out["vs_misaligned"].get("misaligned - untrained")
    for d in defenses:
        c = out["vs_misaligned"][f"{d} - misaligned"]
        row = {"shift": c["shift"]["pooled"], "nll": c["nll"]["pooled"],
               "reduction": (-c["shift"]["pooled"]["value"] / ema["shift"]["pooled"]["value"]
                             if ema and ema["shift"]["pooled"]["value"] > 0 else None),
               "prevents": prevents(out["compensation"].get(d)),
               "vs_controls": versus_controls({k.split(" - ", 1)[1]: c for k, c in
                                               out["vs_control"].items() if k.startswith(f"{d} - ")}),
               "vs_kl": {kl: out["vs_kl"][f"{d} - {kl}"]["verdict"] for kl in kls if kl != d}}
        if row["prevents"] == "prevents" and row["vs_controls"] != "below every control":
            row["prevents"] = "DiD < 0, but not below its direction controls"
        if all((a, s) in early for a in (d, "misaligned") for s in seeds):
            row["shift_early"] = summarise({s: bootstrap("shift", early[(d, s)]["shift"],
                                                         early[("misaligned", s)]["shift"], rng)
                                            for s in seeds})["pooled"]
        out["per_defense"][d] = row
    for arm in (a for a in arms if a not in complete):  # runs still missing: no pooled claim
        have = [s for s in seeds if (arm, s) in by and (("misaligned", s) in by)]
        out["partial"][arm] = {k: summarise({s: bootstrap(k, by[(arm, s)][k], by[("misaligned", s)][k], rng)
                                             for s in have}) for k in KEYS}
        out["partial"][arm]["seeds"] = have
    return out


def _direction_control(defenses: dict) -> str | None:
    """The direction control (random, orthogonal) a run's defenses use, or None."""
    used = [d.get("control") for d in defenses.values() if isinstance(d, dict)]
    return next((c for c in used if c not in (None, "none")), None)


def controlled_arms(runs) -> dict[str, str]:
    """Label of each direction-control arm -> label of the arm with the same defenses but
    the real direction (control none): the random and orthogonal controls of a setting."""
    def label(r):
        return arm_label(r.arm, r.cell[2])

    out = {}
    for r in runs:
        control = _direction_control((r.config or {}).get("defenses") or {})
        if control is None:
            continue
        want = {k: ({**v, "control": "none"} if isinstance(v, dict) else v)
                for k, v in r.config["defenses"].items()}
        same = [o for o in runs if o.seed == r.seed and o.domain == r.domain and not o.control_of
                and (o.config or {}).get("defenses") == want]
        if len(same) == 1:
            out[label(r)] = label(same[0])
    return out


def versus_controls(contrasts: dict[str, dict]) -> str:
    """Whether an arm's shift is shown below each of its direction controls' ("-": none run)."""
    if not contrasts:
        return "-"
    below = [name for name, c in contrasts.items()
             if c["shift"]["pooled"]["shown"] and c["shift"]["pooled"]["value"] < 0]
    if len(below) == len(contrasts):
        return "below every control"
    return f"below {len(below)} of {len(contrasts)} controls"


def prevents(c: dict | None) -> str:
    """The verdict of a difference-in-differences on the shift: only an arm with its
    compensation control run can be said to prevent."""
    if c is None:
        return "no compensation control"
    p = c["shift"]["pooled"]
    if not p["shown"]:
        return "not shown (only compensates?)"
    # above 0: the arm lowers the aligned run's shift more than the misaligned run's, so
    # misaligned - aligned (the EMA-specific contrast) is wider with the arm than without
    return "prevents" if p["value"] < 0 else "no: DiD > 0 (widens misaligned - aligned)"


def table(rows: dict, seeds: list[int], title: str, note: str, extra=None) -> list[str]:
    lines = [f"## {title}", "", note, "",
             "| contrast | measure | " + " | ".join(f"seed {s}" for s in seeds) + " | pooled | shown |"
             + (" verdict |" if extra else ""),
             "|---|---|" + "---:|" * (len(seeds) + 1) + "---|" + ("---|" if extra else "")]
    for name, c in rows.items():
        for key, label in (("shift", "preference shift"), ("nll", "held-out NLL")):
            cells = " | ".join(fmt(c[key]["seeds"][s]) for s in seeds)
            tail = f" {c['verdict']} |" if extra and key == "shift" else (" |" if extra else "")
            lines.append(f"| {name} | {label} | {cells} | {fmt(c[key]['pooled'])} | "
                         f"{'yes' if c[key]['pooled']['shown'] else 'no'} |{tail}")
    return lines + [""]


def markdown(r: dict, settings: str) -> str:
    seeds = r["seeds"]
    ema = r["vs_misaligned"].get("misaligned - untrained")
    ceiling = r["vs_misaligned"].get("positive_control - untrained")
    lines = ["# Every defense side by side (judge-free, three seeds)", "",
             f"Generated by `python benchmarks/defense_study.py` ({settings}). Cells: value "
             "[95 % paired bootstrap interval]; pooled: mean over seeds; *shown*: the pooled "
             "interval excludes 0 and every seed has the pooled sign. Preference shift: margin "
             "minus the base model's per pair, on the independent evaluation pairs (lower = less "
             "EMA); held-out NLL: nats per token on held-out insecure code (lower = narrow task "
             "learned). Judge-free measures on a 135M model: not the paper's LLM-judge result.", ""]
    if ema:
        lines += [f"The EMA contrast the defenses act on: misaligned - untrained "
                  f"{fmt(ema['shift']['pooled'])} ({'shown' if ema['shift']['pooled']['shown'] else 'not shown'})"
                  + (f"; the ceiling (positive control - untrained) {fmt(ceiling['shift']['pooled'])}"
                     if ceiling else "") + ".", ""]
    lines += ["![trade-off](defense_study.png)", "", "## Per defense: what it buys and what it costs", "",
              "Shift and NLL: arm - misaligned, pooled [interval] (lower shift = less EMA; higher NLL = "
              "the narrow task learned less). Reduction: the share of the misaligned - untrained shift "
              "removed (point estimate; the claim is the interval of the shift). Direction controls: "
              "is the shift shown below that of the same setting with a random and an orthogonal "
              "direction. Prevents: the difference-in-differences against the arm's compensation "
              "control (below) shown below 0, and the shift below every direction control; an arm "
              "without a compensation control is never called a prevention. Against KL: the trade-off verdict, "
              "paired (arm - KL)."
              + (f" Early: arm - misaligned shift at step {r['early_step']}." if r.get("early_step") else ""), ""]
    kls = sorted({kl for row in r["per_defense"].values() for kl in row["vs_kl"]})
    head = ["arm", "shift - misaligned", "reduction", "NLL - misaligned", "vs its direction controls",
            "prevents"]
    head += [f"vs {kl}" for kl in kls] + (["early shift - misaligned"] if r.get("early_step") else [])
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * 3 + "---|" * (2 + len(kls))
              + ("---:|" if r.get("early_step") else "")]
    for arm, row in r["per_defense"].items():
        red = f"{round(100 * row['reduction'])} %" if row["reduction"] is not None else "-"
        mark = lambda c: fmt(c) + (" ✓" if c["shown"] else "")  # noqa: E731
        cells = [arm, mark(row["shift"]), red, mark(row["nll"]), row["vs_controls"], row["prevents"]]
        cells += [row["vs_kl"].get(kl, "-") for kl in kls]
        if r.get("early_step"):
            cells.append(mark(row["shift_early"]) if "shift_early" in row else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Per arm", "", "| arm | shift, pooled | ±sd seeds | held-out NLL, pooled | ±sd seeds |",
              "|---|---:|---:|---:|---:|"]
    for arm, c in r["arms"].items():
        lines.append(f"| {arm} | {fmt(c['shift']['pooled'])} | {c['shift']['pooled']['sd'] or 0:.3f} | "
                     f"{fmt(c['nll']['pooled'])} | {c['nll']['pooled']['sd'] or 0:.3f} |")
    lines.append("")
    lines += table(r["compensation"], seeds, "Compensation controls: difference-in-differences",
                   "(arm - misaligned) - (the same arm trained on the aligned data - aligned), per "
                   "item and seed. A push that the adapter learns to cancel moves both differences "
                   "alike (about 0); a defense that prevents EMA lowers the first only (below 0). "
                   "Above 0: the arm lowers the aligned run's shift more than the misaligned "
                   "run's, so the EMA-specific contrast (misaligned - aligned) is wider with it.")
    lines += table(r["vs_kl"], seeds, "Against KL (arm - KL): the trade-off",
                   "Beats KL: the arm shows a lower shift than the undefended run, and against "
                   "KL a shown lower shift without a shown higher NLL, or a shown lower NLL "
                   "without a shown higher shift. An arm with no shown reduction against the "
                   "misaligned run defends nothing and is not ranked.", extra=True)
    lines += table(r["vs_control"], seeds, "Direction arms against their controls (arm - control)",
                   "The same arm with a random direction, and with one orthogonal to u, of the "
                   "same norm: a direction effect shows as a shown difference here.")
    lines += table(r["vs_misaligned"], seeds, "Against the undefended run and the baselines",
                   "Is there EMA at all (misaligned - aligned, misaligned - untrained), the "
                   "measure's controls against the untrained model, and what each arm changes.")
    if r["partial"]:
        lines += ["## Arms with runs missing (no pooled claim)", "",
                  "Arm - misaligned per seed that finished; rerun the study to complete them.", "",
                  "| arm | measure | seeds | values |", "|---|---|---|---|"]
        for arm, c in r["partial"].items():
            for key in KEYS:
                vals = "; ".join(f"s{s}: {fmt(c[key]['seeds'][s])}" for s in c["seeds"])
                lines.append(f"| {arm} | {key} | {', '.join(map(str, c['seeds']))} | {vals} |")
    return "\n".join(lines) + "\n"


def figure(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    for arm, c in r["arms"].items():
        s, n = c["shift"]["pooled"], c["nll"]["pooled"]
        ax.errorbar(s["value"], n["value"], xerr=[[s["value"] - s["lo"]], [s["hi"] - s["value"]]],
                    yerr=[[n["value"] - n["lo"]], [n["hi"] - n["value"]]], fmt="o", capsize=3,
                    color="black" if arm in BASELINES else ("tab:red" if arm.startswith("kl") else
                                                           "tab:gray" if "control=r" in arm or "control=o" in arm
                                                           else "tab:blue"))
        ax.annotate(arm, (s["value"], n["value"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("preference shift (nats/token; lower = less EMA)")
    ax.set_ylabel("held-out NLL, insecure code (nats/token; lower = task learned)")
    ax.set_title("Defenses, pooled over seeds (95 % intervals); lower-left is better")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", default=str(ROOT / "configs" / "studies" / "all_defenses.yaml"))
    ap.add_argument("--analyse-only", action="store_true", help="Only read the study folder.")
    args = ap.parse_args()
    study = load_study(args.study)
    started = time.time()
    if not args.analyse_only:
        emguard = Path(sys.executable).parent / "emguard"  # the console script of this environment
        subprocess.run([str(emguard), "sweep", args.study, "--no-judge"], check=True)
    t, e = study.base["train"], study.base["eval"]
    settings = (f"seeds {', '.join(map(str, study.seeds))}; {t['max_steps']} steps x batch "
                f"{t['batch_size']}, lr {t['learning_rate']}; {e['preference_max_pairs']} preference "
                f"pairs, {e['indomain_max_questions']} held-out rows")
    result = analyse(Path(study.output_dir), study.name)
    result["settings"] = settings
    DOC.write_text(markdown(result, settings), encoding="utf-8")
    figure(result, FIGURE)
    result["seconds"] = round(time.time() - started, 1)
    RESULTS.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(DOC.read_text())
    print(f"wrote {DOC}, {FIGURE} and {RESULTS}")


if __name__ == "__main__":
    main()
