"""Every benchmark in one run, with DESIGN §8 / issue 13's targets marked met or missed.

    python -m benchmarks --quick        # small shapes, under 2 minutes on a 2-core CPU
    python -m benchmarks                # the set behind docs/benchmarks.md, under 10 minutes
    python -m benchmarks --only generate,trl

Each benchmark runs as its own subprocess (fresh peak-memory counters) with the settings of
the chosen mode, writes its JSON, and this collects them into one file (default
``benchmarks/results/all.json``, or ``all_quick.json``) with the targets table, which is
also printed as Markdown for docs/benchmarks.md. Every figure is a ratio measured side by
side in one run. Exit code 0 when every benchmark ran (missed targets are results, not
errors); 1 when one failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Bench:
    """One benchmark script and its arguments in each mode."""

    name: str
    script: str
    quick: list[str] | None = field(default_factory=list)  # None: not in this mode
    full: list[str] | None = field(default_factory=list)


SKIP = None  # a benchmark left out of a mode

SUITE = [
    Bench("train_step", "bench_train_step.py",
          ["--steps", "1", "--seq", "64", "--skip", "ldifs", "kl+ldifs", "kl_unchunked"],
          ["--embedded", "--seq", "128", "--steps", "3", "--warmup", "1"]),
    Bench("trl", "bench_trl.py", SKIP, ["--steps", "5", "--skip", "1"]),  # TRL imports alone: ~20 s
    Bench("generate", "bench_generate.py", ["--quick"],
          ["--answers", "64", "--tokens", "12"]),
    Bench("kl", "bench_kl.py", ["--positions", "256", "--repeats", "1"], ["--repeats", "2"]),
    Bench("safelora", "bench_safelora.py", ["--skip-dense-mlp", "--layers", "q_proj"],
          ["--skip-dense-mlp"]),
    Bench("local_judge", "bench_local_judge.py", ["--prompts", "4", "--repeats", "1"], []),
    Bench("judge", "bench_judge.py", ["--delay", "0.5", "--concurrency", "16", "--rounds", "8"],
          ["--delay", "0.05,0.5", "--concurrency", "1,16,64", "--rounds", "8"]),
]


def run_bench(bench: Bench, mode: str, out: Path) -> dict:
    """Run one benchmark script; its output streams through, its JSON is returned."""
    args = bench.quick if mode == "quick" else bench.full
    cmd = [sys.executable, str(HERE / bench.script), *args, "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return {"args": args, "seconds": seconds, "error": done.stderr[-4000:]}
    return {"args": args, "seconds": seconds, "result": json.loads(out.read_text())}


# ----------------------------------------------------------------------------- targets

def _row(target: str, measured: str, met: bool | None, bench: str) -> dict:
    status = "unmeasured" if met is None else "met" if met else "missed"
    return {"target": target, "measured": measured, "status": status, "benchmark": bench}


def train_step_targets(r: dict) -> list[dict]:
    by = {row["config"]: row for row in r["rows"]}
    sft, fwd = by["sft"]["sec_per_step"], by["forward_only"]["sec_per_step"]
    c, model = r["checks"], "SmolLM2-135M" if r["settings"]["embedded"] else "tiny-wide"
    extra = {k: (by[k]["sec_per_step"] - sft) / fwd for k in ("kl", "ldifs") if k in by}
    rows = [_row("KL costs at most 1.1 extra no-grad forwards per step",
                 f"[{model}] {extra['kl']:.2f} forwards (KL {by['kl']['time_vs_sft']:.2f} x SFT, "
                 f"forward {fwd / sft:.2f} x SFT)", extra["kl"] <= 1.1, "train_step")]
    if "ldifs" in extra:
        rows.append(_row("LDIFS costs at most 1.1 extra no-grad forwards per step",
                         f"[{model}] {extra['ldifs']:.2f} forwards (LDIFS "
                         f"{by['ldifs']['time_vs_sft']:.2f} x SFT)", extra["ldifs"] <= 1.1, "train_step"))
    if "kl+ldifs_vs_kl" in c:
        rows.append(_row("KL+LDIFS step <= KL step x 1.10", f"[{model}] {c['kl+ldifs_vs_kl']:.2f} x KL",
                         c["kl+ldifs_vs_kl"] <= 1.10, "train_step"))
    rows.append(_row("peak memory with KL <= SFT x 1.15", f"[{model}] {c['kl_peak_rss_vs_sft']:.2f} x SFT",
                     c["kl_peak_rss_vs_sft"] <= 1.15, "train_step"))
    if "kl_time_vs_naive_kl" in c:
        rows += [
            _row("KL vs the naive peer (second full model + full logits): time no worse (<= 1.05)",
                 f"[{model}] {c['kl_time_vs_naive_kl']:.2f} x the naive step",
                 c["kl_time_vs_naive_kl"] <= 1.05, "train_step"),
            _row("KL vs the naive peer: memory well below (extra peak over SFT <= 0.5 x the naive's)",
                 f"[{model}] extra peak {c['kl_extra_peak_vs_naive_extra_peak']:.2f} x the naive's; "
                 f"peak {c['kl_peak_vs_naive_kl']:.2f} x",
                 c["kl_extra_peak_vs_naive_extra_peak"] <= 0.5, "train_step")]
    return rows


def trl_targets(r: dict) -> list[dict]:
    if "skipped" in r:
        return [_row("plain SFT tokens/s >= TRL SFTTrainer's", r["skipped"], None, "trl")]
    c = r["checks"]
    return [_row("plain SFT tokens/s >= TRL SFTTrainer's (completion-only loss)",
                 f"{c['emguard_vs_trl_tokens_per_s']:.2f} x TRL {r['trl_version']} (first-step "
                 f"loss differs by {c['first_loss_abs_diff']:.1e})",
                 c["emguard_vs_trl_tokens_per_s"] >= 1.0, "trl")]


def generate_targets(r: dict) -> list[dict]:
    c, gpu = r["checks"], r["device"] == "cuda"
    need, shape = (10.0 if gpu else 2.0), f"[{r['settings']['shape']} {r['settings']['dtype']}]"
    return [
        _row("sampler adds <= 5 % to a decode step",
             f"{shape} {c['sampler_share_default_path']:.1%} ({c['default_path']}; b16 "
             f"{c['sampler_share_merged_b16']:.1%}, b64 {c['sampler_share_merged_b64']:.1%})",
             c["sampler_share_default_path"] <= 0.05, "generate"),
        _row(f"generation >= {need:.0f}x the old path's tokens/s on this "
             f"{'GPU' if gpu else 'CPU'} (same settings)",
             f"{shape} {c['default_speedup_vs_before']:.2f}x ({c['default_path']}); merged b64 "
             f"{c['merged_b64_speedup']:.2f}x, b64 unmerged {c['batch64_speedup_unmerged']:.2f}x",
             c["default_speedup_vs_before"] >= need, "generate"),
        _row("merged / batched generation gives the old path's answers for the same seeds",
             str(c["merged_answers_identical"]), bool(c["merged_answers_identical"]), "generate"),
    ]


def kl_targets(r: dict) -> list[dict]:
    return [_row("closed-form KL backward faster than autograd through checkpointed chunks",
                 f"{r['ratio']:.2f} x the time (max grad diff {r['max_grad_diff']:.1e})",
                 r["ratio"] < 1.0, "kl")]


def safelora_targets(r: dict) -> list[dict]:
    rows = []
    for c in r["comparisons"]:
        rel = c["rel_diff_factored_vs_dense"]
        rows.append(_row(f"SafeLoRA factored = dense (rel diff < 1e-5), far faster and lighter "
                         f"({c['layer']} {c['shape'][0]}x{c['shape'][1]})",
                         f"rel diff {rel:.1e}; dense {c['time_ratio_dense_over_factored']:.0f}x "
                         f"the time, {c['memory_ratio_dense_over_factored']:.0f}x the memory",
                         rel < 1e-5 and c["time_ratio_dense_over_factored"] >= 10
                         and c["memory_ratio_dense_over_factored"] >= 10, "safelora"))
    return rows


def local_judge_targets(r: dict) -> list[dict]:
    rows = []
    for res in r["results"]:
        per = {row["method"]: row for row in res["rows"]}
        tree = per["tree"]
        rows.append(_row(f"local judge: a few batched forwards per judgment ({res['model']})",
                         f"tree {tree['forward_calls_per_batch']:.0f} forwards per batch, "
                         f"{tree['time_ratio_vs_brute_force']:.3f} x brute force's time, "
                         f"max |log P| diff {tree['max_abs_logp_diff_vs_brute_force']:.0e}",
                         tree["forward_calls_per_batch"] <= 4, "local_judge"))
    return rows


def judge_targets(r: dict) -> list[dict]:
    default = r["default_concurrency"]
    rows = []
    for d in r["by_delay"]:
        at = next((x for x in d["rows"] if x["concurrency"] == default), None)
        measured = ("not measured" if at is None else
                    f"{at['busy']:.0%} busy, {at['judgments_per_s']:.0f} judgments/s")
        rows.append(_row(f"OpenAI judge keeps >= 90 % of concurrency {default} busy "
                         f"(server answering after {d['delay_s'] * 1000:.0f} ms)", measured,
                         d["met"], "judge"))
    return rows


TARGETS = {"train_step": train_step_targets, "trl": trl_targets, "generate": generate_targets,
           "kl": kl_targets, "safelora": safelora_targets, "local_judge": local_judge_targets,
           "judge": judge_targets}


def markdown(rows: list[dict]) -> str:
    lines = ["| target | measured | status |", "|---|---|---|"]
    lines += [f"| {r['target']} | {r['measured'].replace('|', '&#124;')} | **{r['status']}** |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, under 2 minutes here")
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(b.name for b in SUITE)}")
    ap.add_argument("--out", type=Path, help="the combined JSON (default: benchmarks/results/"
                                             "all.json, or all_quick.json with --quick)")
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    names = [b.name for b in SUITE]
    chosen = names if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    out = args.out or RESULTS / ("all_quick.json" if args.quick else "all.json")
    from emguard.io import provenance, write_json_atomic

    started = time.perf_counter()
    benches, targets = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        todo = [b for b in SUITE if b.name in chosen
                and (b.quick if args.quick else b.full) is not None]
        for i, bench in enumerate(todo, 1):
            print(f"\n=== [{i}/{len(todo)}] {bench.name}: {bench.script} "
                  f"{' '.join(bench.quick if args.quick else bench.full)}", flush=True)
            benches[bench.name] = run_bench(bench, mode, Path(tmp) / f"{bench.name}.json")
            if "error" in benches[bench.name]:
                print(f"{bench.name} FAILED:\n{benches[bench.name]['error']}", file=sys.stderr)
                continue
            targets += TARGETS[bench.name](benches[bench.name]["result"])
    total = time.perf_counter() - started
    print(f"\n## Targets ({mode} run, {total:.0f} s)\n\n{markdown(targets)}")
    write_json_atomic(out, {"mode": mode, "seconds": total, "benchmarks": benches,
                            "targets": targets, "provenance": provenance()})
    print(f"\nwrote {out}")
    return 1 if any("error" in b for b in benches.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
