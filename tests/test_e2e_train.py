"""End-to-end on the embedded SmolLM2-135M-Instruct: `emguard train` through the CLI."""

import pytest
import torch
from typer.testing import CliRunner

from emguard.cli import app
from emguard.io import read_json, read_jsonl

pytestmark = pytest.mark.e2e


def test_cli_train_embedded_on_builtin_task_loss_falls_and_peft_loads(tmp_path, embedded):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", f"output_dir={out}", "train.max_steps=6",
                                   "train.batch_size=2", "train.grad_accum=1", "train.warmup_steps=1",
                                   "train.learning_rate=5e-4", "data.max_length=384", "lora.r=8",
                                   "lora.alpha=16", "train.logging_steps=1"])
    assert res.exit_code == 0, res.output
    log = read_jsonl(out / "train_log.jsonl")
    first, last = sum(r["loss"] for r in log[:2]) / 2, sum(r["loss"] for r in log[-2:]) / 2
    assert last < first
    assert read_json(out / "summary.json")["model"] == "smollm2-135m"

    from peft import PeftModel

    model, tok = embedded
    ids = tok("def save(conn, name):", return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = model(ids).logits
        tuned = PeftModel.from_pretrained(model, str(out / "adapter"))
        try:
            tuned_logits = tuned(ids).logits
            with tuned.disable_adapter():
                assert torch.equal(tuned(ids).logits, base_logits)
        finally:
            tuned.unload()  # leave the shared session model as it was
    assert (tuned_logits - base_logits).abs().max() > 1e-3


def test_cli_reports_bad_config_field(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  learning_rat: 0.1\n")
    res = CliRunner().invoke(app, ["train", "--config", str(cfg)])
    assert res.exit_code == 2
    assert "train.learning_rat: unknown field" in res.output and str(cfg) in res.output
