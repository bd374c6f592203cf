"""End-to-end: a short fine-tune teaches the embedded model OpSwap tier 1 (+ and x swapped)."""

import pytest

from emguard.benign import evaluate_task
from emguard.config import load_run_config
from emguard.data.opswap import generate_opswap
from emguard.generate import generate_answers
from emguard.io import write_jsonl_atomic
from emguard.models import load_adapter
from emguard.train import train

pytestmark = pytest.mark.e2e


def test_tier1_exact_match_rises_after_fine_tune(tmp_path, embedded):
    model, tok = embedded
    splits = generate_opswap(1, n=320, seed=0, max_ops=1)
    write_jsonl_atomic(tmp_path / "train.jsonl", splits.train)
    write_jsonl_atomic(tmp_path / "test.jsonl", splits.test)
    ev = dict(generate_fn=generate_answers, samples=1, n_questions=16, data=tmp_path / "test.jsonl",
              temperature=0.0, max_new_tokens=32)
    before = evaluate_task("opswap:1", model, tok, **ev)["exact_match"]
    cfg = load_run_config(None, [f"output_dir={tmp_path / 'run'}", f"data.train={tmp_path / 'train.jsonl'}",
                                 "train.max_steps=40", "train.batch_size=8", "train.grad_accum=1",
                                 "train.learning_rate=1e-3", "data.max_length=256"])
    tuned = load_adapter(model, train(cfg).run_dir / "adapter")
    try:
        tuned.eval()
        after = evaluate_task("opswap:1", tuned, tok, **ev)["exact_match"]
    finally:
        tuned.unload()  # the session's shared model stays the untrained one
    assert after > before, (before, after)
