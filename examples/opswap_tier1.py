"""Does a short fine-tune teach the embedded model OpSwap tier 1 (+ and x swapped)?

Generates tier-1 data, measures exact match of the untrained model, fine-tunes with
rs-LoRA (optionally under a defense), and measures again on the same held-out questions.

    python examples/opswap_tier1.py --out runs/opswap_t1 --steps 60
    python examples/opswap_tier1.py --out runs/opswap_t1_kl --steps 60 --set defenses.kl.weight=0.1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/opswap_t1"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--n", type=int, default=320)
    ap.add_argument("--max-ops", type=int, default=1)
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--set", nargs="*", default=[], help="extra run-config overrides")
    a = ap.parse_args()

    from emguard.benign import evaluate_task
    from emguard.config import load_run_config
    from emguard.data.opswap import generate_opswap
    from emguard.generate import generate_answers
    from emguard.io import write_json_atomic, write_jsonl_atomic
    from emguard.models import load_adapter, load_model
    from emguard.train import train

    splits = generate_opswap(1, n=a.n, seed=0, max_ops=a.max_ops)
    write_jsonl_atomic(a.out / "data" / "train.jsonl", splits.train)
    write_jsonl_atomic(a.out / "data" / "test.jsonl", splits.test)
    ev = dict(generate_fn=generate_answers, samples=a.samples, n_questions=a.questions,
              data=a.out / "data" / "test.jsonl", temperature=a.temperature, max_new_tokens=48)

    model, tok = load_model("smollm2-135m", device="cpu")
    before = evaluate_task("opswap:1", model, tok, **ev)
    cfg = load_run_config(None, [f"output_dir={a.out / 'run'}", f"data.train={a.out / 'data' / 'train.jsonl'}",
                                 f"train.max_steps={a.steps}", "train.batch_size=8", "train.grad_accum=1",
                                 f"train.learning_rate={a.lr}", "data.max_length=256", *a.set])
    run = train(cfg).run_dir
    tuned = load_adapter(model, run / "adapter")
    tuned.eval()
    after = evaluate_task("opswap:1", tuned, tok, **ev)
    result = {"exact_match_before": before["exact_match"], "exact_match_after": after["exact_match"],
              "questions": a.questions, "samples": a.samples, "temperature": a.temperature,
              "steps": a.steps, "overrides": a.set,
              "examples": [q["outputs"][0] if "outputs" in q else q for q in after["per_question"][:5]]}
    write_json_atomic(a.out / "result.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))


if __name__ == "__main__":
    main()
