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

Against KL (both measures paired, arm - KL): an arm *beats KL* when it shows a lower shift
without a shown higher NLL, or a lower NLL without a shown higher shift; *loses to KL* in
the mirrored case; otherwise no difference is shown. About 50 minutes on a 2-core CPU.

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
from demo_seeds import bootstrap, fmt, items, summarise  # noqa: E402

from emguard.report.collect import load_runs  # noqa: E402
from emguard.report.tables import arm_label  # noqa: E402
from emguard.study import load_study  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "defense_study.md"
FIGURE = ROOT / "docs" / "defense_study.png"
RESULTS = ROOT / "benchmarks" / "results" / "defense_study.json"
KEYS = ("shift", "nll")
BASELINES = ("untrained", "aligned", "misaligned")


def contrast(by: dict, a: str, b: str, seeds: list[int], rng) -> dict:
    return {k: summarise({s: bootstrap(k, by[(a, s)][k], by[(b, s)][k], rng) for s in seeds})
            for k in KEYS}


def verdict_vs_kl(c: dict) -> str:
    """The trade-off verdict from the paired (arm - KL) contrasts."""
    def shown(key, sign):
        p = c[key]["pooled"]
        return p["shown"] and np.sign(p["value"]) == sign

    if (shown("shift", -1) and not shown("nll", 1)) or (shown("nll", -1) and not shown("shift", 1)):
        return "beats KL"
    if (shown("shift", 1) and not shown("nll", -1)) or (shown("nll", 1) and not shown("shift", -1)):
        return "loses to KL"
    if shown("shift", -1) or shown("shift", 1):
        return "trades: " + ("less shift, more NLL" if shown("shift", -1) else "more shift, less NLL")
    return "no difference shown"


def analyse(study_dir: Path, name: str) -> dict:
    _, runs = load_runs(study_dir, name)
    by = {(arm_label(r.arm, r.cell[2]), r.seed): items(r) for r in runs if r.free.get("general")}
    seeds = sorted({s for _, s in by})
    arms = list(dict.fromkeys(a for a, _ in by))
    complete = [a for a in arms if all((a, s) in by for s in seeds)]
    rng = np.random.default_rng(0)
    out = {"seeds": seeds, "arms": {}, "vs_misaligned": {}, "vs_kl": {}, "vs_control": {},
           "partial": {}}
    for arm in complete:
        out["arms"][arm] = {k: summarise({s: bootstrap(k, by[(arm, s)][k], None, rng) for s in seeds})
                            for k in KEYS}
    defended = [a for a in complete if a not in BASELINES]
    for a, b in [("misaligned", "aligned"), ("misaligned", "untrained")] + [(d, "misaligned") for d in defended]:
        out["vs_misaligned"][f"{a} - {b}"] = contrast(by, a, b, seeds, rng)
    kl = next((a for a in complete if a.startswith("kl")), None)
    for d in defended:
        if kl and d != kl:
            c = contrast(by, d, kl, seeds, rng)
            out["vs_kl"][d] = {**c, "verdict": verdict_vs_kl(c)}
    for arm in (a for a in arms if a not in complete):  # runs still missing: no pooled claim
        have = [s for s in seeds if (arm, s) in by and (("misaligned", s) in by)]
        out["partial"][arm] = {k: summarise({s: bootstrap(k, by[(arm, s)][k], by[("misaligned", s)][k], rng)
                                             for s in have}) for k in KEYS}
        out["partial"][arm]["seeds"] = have
    for d in defended:
        if "control=none" not in d:
            continue
        for ctrl in ("random", "orthogonal"):
            other = d.replace("control=none", f"control={ctrl}")
            if other in complete:
                out["vs_control"][f"{d} - {ctrl}"] = contrast(by, d, other, seeds, rng)
    return out


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
    lines = ["# Every defense side by side (judge-free, three seeds)", "",
             f"Generated by `python benchmarks/defense_study.py` ({settings}). Cells: value "
             "[95 % paired bootstrap interval]; pooled: mean over seeds. Preference shift: "
             "margin minus the base model's per pair (lower = less EMA); held-out NLL: nats "
             "per token on held-out insecure code (lower = narrow task learned). A 135M model "
             "after 6 steps: a smoke-sized study, not the paper's LLM-judge result.", "",
             "![trade-off](defense_study.png)", "",
             "## Per arm", "", "| arm | shift, pooled | ±sd seeds | held-out NLL, pooled | ±sd seeds |",
             "|---|---:|---:|---:|---:|"]
    for arm, c in r["arms"].items():
        lines.append(f"| {arm} | {fmt(c['shift']['pooled'])} | {c['shift']['pooled']['sd'] or 0:.3f} | "
                     f"{fmt(c['nll']['pooled'])} | {c['nll']['pooled']['sd'] or 0:.3f} |")
    lines.append("")
    lines += table(r["vs_kl"], seeds, "Against KL (arm - KL): the trade-off",
                   "Beats KL: a shown lower shift without a shown higher NLL, or a shown lower "
                   "NLL without a shown higher shift.", extra=True)
    lines += table(r["vs_control"], seeds, "Direction arms against their controls (arm - control)",
                   "The same arm with a random direction, and with one orthogonal to u, of the "
                   "same norm: a direction effect shows as a shown difference here.")
    lines += table(r["vs_misaligned"], seeds, "Against the undefended run (arm - misaligned)",
                   "Is there EMA at all (misaligned - aligned), and what each defense changes.")
    if r["partial"]:
        lines += ["## Arms with runs missing (no pooled claim)", "",
                  "Arm - misaligned per seed that finished; rerun the study to complete them.", "",
                  "| arm | measure | seeds | values |", "|---|---|---|---|"]
        for arm, c in r["partial"].items():
            for key in KEYS:
                vals = "; ".join(f"s{s}: {fmt(c[key]['seeds'][s])}" for s in c["seeds"])
                lines.append(f"| {arm} | {key} | {', '.join(map(str, c['seeds']))} | {vals} |")
    return "\n".join(lines)


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
