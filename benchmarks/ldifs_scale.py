"""Why LDIFS at lambda 1 left the demo's model worse at the narrow task than untrained.

Trains short insecure-code runs of the embedded SmolLM2-135M-Instruct with and without
LDIFS at a few (learning rate, lambda, reduction) settings and reads, per run:

  * the size of the defense term against the task loss (lambda * LDIFS / CE, from
    train_log.jsonl), and the gradient norm;
  * the held-out NLL of insecure code after training, against the untrained model's.

The hypotheses it separates: the term's scale (mean_token sums over 6 layers x 576 dims
of a residual stream with large norms; mean_element divides that by 3,456), the learning
rate (AdamW's step is about lr per coordinate whatever the gradient's size, so a
dominant restoring gradient makes the adapter jitter around the reference with that
amplitude), or LDIFS itself. Runs are folders under --out (a rerun skips finished ones).
Not part of the test run (about 10 minutes on a 2-core CPU alone).

    python benchmarks/ldifs_scale.py [--out runs/ldifs_scale] [--steps 12]

Prints a table and writes benchmarks/results/ldifs_scale.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from record import write_result

from emguard.config import EvalSettings, build_run_config
from emguard.evaluate_run import evaluate_run
from emguard.io import read_json, read_jsonl
from emguard.train import record_untrained, train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ldifs_scale.json"

# judge-free, as the regime study: all evaluation pairs, 8 general questions, 24 held-out rows
EVAL = {"general_samples": 0, "general_max_questions": 8, "drift_max_new_tokens": 32,
        "indomain_samples": 0, "indomain_max_questions": 24, "batch_size": 8}
# name -> (learning rate, LDIFS settings or None)
SETTINGS = {
    "sft lr1e-3": (1e-3, None),
    "ldifs 1 mean_token lr1e-3": (1e-3, {"weight": 1.0}),  # the old demo's setting
    "ldifs 1 mean_element lr1e-3": (1e-3, {"weight": 1.0, "reduction": "mean_element"}),
    "ldifs 1 mean_token lr1e-4": (1e-4, {"weight": 1.0}),  # same term, 10x smaller steps
    "sft lr5e-4": (5e-4, None),
    "ldifs 1 mean_token lr5e-4": (5e-4, {"weight": 1.0}),
    "ldifs 1e-4 mean_token lr5e-4": (5e-4, {"weight": 1e-4}),
    "ldifs 1e-5 mean_token lr5e-4": (5e-4, {"weight": 1e-5}),
}


def run_config(out: Path, name: str, lr: float, ldifs: dict | None, steps: int):
    raw = {"output_dir": str(out / name.replace(" ", "_")),
           "data": {"split_seed": 0, "max_length": 512},
           "train": {"max_steps": steps, "batch_size": 4, "grad_accum": 1, "warmup_steps": 2,
                     "scheduler": "constant_with_warmup", "learning_rate": lr,
                     "logging_steps": 1},
           "defenses": {"ldifs": ldifs} if ldifs else {},
           "eval": EVAL}
    return build_run_config(raw)


def measures(run_dir: Path) -> dict:
    """Held-out NLL, preference shift on the evaluation pairs and drift KL of a run."""
    evaluate_run(run_dir, settings=EvalSettings(**EVAL), progress=False)
    general = read_json(run_dir / "eval" / "general" / "judge_free.json")
    pairs = general["preference"]["pairs"]
    return {"heldout_nll": read_json(run_dir / "eval" / "indomain" / "judge_free.json")
            ["heldout_nll"]["nll_mean"],
            "shift": float(np.mean([p["margin"] - p["reference_margin"] for p in pairs])),
            "drift_kl": general["drift"]["kl_mean"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/ldifs_scale"))
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    started = time.time()
    base = run_config(args.out, "untrained", 1e-4, None, args.steps)
    record_untrained(base)
    untrained = measures(Path(base.output_dir))["heldout_nll"]
    rows = {}
    for name, (lr, ldifs) in SETTINGS.items():
        cfg = run_config(args.out, name, lr, ldifs, args.steps)
        train(cfg)
        log = read_jsonl(Path(cfg.output_dir) / "train_log.jsonl")
        late = log[len(log) // 2:]  # after warm-up: what the term weighs once the adapter moved
        ce = float(np.mean([e["ce"] for e in late]))
        # train_log holds the unweighted term; what the loss adds is lambda times it
        term = (ldifs or {}).get("weight", 0.0) * float(np.mean([e.get("ldifs", 0.0) for e in late]))
        rows[name] = {"lr": lr, "ldifs": ldifs, "ce_late": ce, "weighted_term_late": term,
                      "term_over_ce": term / ce if ce else None,
                      "grad_norm_late": float(np.mean([e["grad_norm"] for e in late])),
                      **measures(Path(cfg.output_dir))}
        rows[name]["vs_untrained"] = rows[name]["heldout_nll"] - untrained
        print(f"{name}: {rows[name]} ({time.time() - started:.0f} s)", flush=True)
    header = (f"{'setting':32} {'CE':>7} {'lam*LDIFS':>10} {'ratio':>10} {'|g|':>10} "
              f"{'NLL':>7} {'vs untrained':>12} {'shift':>7} {'drift':>7}")
    print(f"\nheld-out NLL untrained: {untrained:.3f} ({args.steps} steps x batch 4)\n{header}")
    for name, r in rows.items():
        print(f"{name:32} {r['ce_late']:7.3f} {r['weighted_term_late']:10.4g} "
              f"{(r['term_over_ce'] or 0):10.4g} {r['grad_norm_late']:10.4g} "
              f"{r['heldout_nll']:7.3f} {r['vs_untrained']:+12.3f} {r['shift']:+7.3f} "
              f"{r['drift_kl']:7.3f}")
    write_result(RESULTS, "ldifs_scale", args,
                 {"untrained_heldout_nll": untrained, "runs": rows,
                  "seconds": round(time.time() - started, 1)})


if __name__ == "__main__":
    main()
