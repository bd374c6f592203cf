"""The training recipe on a tiny model: run folder, adapter, determinism, skip and resume."""

import json

import pytest
import torch
from transformers import TrainerCallback

from emguard.config import load_run_config
from emguard.io import read_json, read_jsonl
from emguard.train import RunConflictError, train


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "train.jsonl"
    with open(p, "w") as f:
        for i in range(24):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                             {"role": "assistant", "content": f"It is {2 * i}."}]}) + "\n")
    return p


def config(tiny_dir, data_file, out, *extra):
    return load_run_config(None, [f"model={tiny_dir}", f"output_dir={out}", f"data.train={data_file}",
                                  "data.max_length=128", "train.max_steps=6", "train.batch_size=2",
                                  "train.grad_accum=2", "train.learning_rate=3e-3", "train.warmup_steps=1",
                                  "train.save_steps=2", "lora.r=4", "lora.alpha=8", *extra])


def test_run_folder_adapter_and_loss_falls(tiny_dir, data_file, tmp_path):
    res = train(config(tiny_dir, data_file, tmp_path / "run"))
    run = res.run_dir
    for name in ("config.yaml", "provenance.json", "data_report.json", "train_log.jsonl", "summary.json",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    assert not (run / "checkpoints").exists()
    log = read_jsonl(run / "train_log.jsonl")
    assert len(log) == 6 and log[-1]["loss"] < log[0]["loss"]
    summary = read_json(run / "summary.json")
    assert summary["steps"] == 6 and summary["last_loss"] < summary["first_loss"]
    # PEFT loads the adapter and it changes the model's output
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, str(run / "adapter"))
    assert (tuned(ids).logits - before).abs().max() > 1e-4
    assert tuned.peft_config["default"].use_rslora and tuned.peft_config["default"].r == 4


def test_deterministic_for_a_seed(tiny_dir, data_file, tmp_path):
    a = read_jsonl(train(config(tiny_dir, data_file, tmp_path / "a")).run_dir / "train_log.jsonl")
    b = read_jsonl(train(config(tiny_dir, data_file, tmp_path / "b")).run_dir / "train_log.jsonl")
    c = read_jsonl(train(config(tiny_dir, data_file, tmp_path / "c", "train.seed=1")).run_dir / "train_log.jsonl")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["loss"] for r in a] != [r["loss"] for r in c]


def test_complete_run_is_skipped_and_other_config_refused(tiny_dir, data_file, tmp_path):
    cfg = config(tiny_dir, data_file, tmp_path / "run")
    first = train(cfg)
    stamp = (first.run_dir / "summary.json").stat().st_mtime_ns
    again = train(cfg)
    assert again.skipped and (first.run_dir / "summary.json").stat().st_mtime_ns == stamp
    with pytest.raises(RunConflictError, match="different config"):
        train(config(tiny_dir, data_file, tmp_path / "run", "train.seed=5"))


class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_to_the_same_result(tiny_dir, data_file, tmp_path):
    ref = read_jsonl(train(config(tiny_dir, data_file, tmp_path / "ref")).run_dir / "train_log.jsonl")
    cfg = config(tiny_dir, data_file, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[Interrupt()])
    assert not (tmp_path / "run" / "summary.json").exists()
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()
    res = train(cfg)
    assert res.summary["resumed_from_checkpoint"] is True
    log = read_jsonl(res.run_dir / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 7))
    for a, b in zip(log, ref, strict=False):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_defense_terms_are_logged_and_interleave_reported(tiny_dir, data_file, tmp_path):
    safe = tmp_path / "safe.jsonl"
    safe.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Hi {i}"},
                                                     {"role": "assistant", "content": "Hello!"}]}) + "\n"
                            for i in range(5)))
    cfg = config(tiny_dir, data_file, tmp_path / "run", "defenses.kl.weight=0.1",
                 "defenses.ldifs.layer_every=2", f"defenses.interleave.source={safe}",
                 "defenses.interleave.fraction=0.25")
    res = train(cfg)
    log = read_jsonl(res.run_dir / "train_log.jsonl")
    assert all({"ce", "kl", "ldifs"} <= set(r) for r in log)
    assert log[0]["kl"] == 0.0 and log[-1]["kl"] > 0
    report = read_json(res.run_dir / "data_report.json")
    # 24 rows, round(2.4) = 2 held out (the 90/10 split), 22 trained; round(0.25 * 22) = 6 safe
    assert report["heldout_rows"] == 2 and report["rows"] == 22
    assert report["interleave"]["safe_rows"] == 6 and report["tokenized"] == 28


def test_safelora_from_the_run_config(tiny_dir, data_file, tmp_path):
    misaligned = train(config(tiny_dir, data_file, tmp_path / "mis", "train.seed=3")).run_dir / "adapter"
    res = train(config(tiny_dir, data_file, tmp_path / "run", "defenses.safelora.tau=0.5",
                       f"defenses.safelora.unaligned={misaligned}"))
    out = res.run_dir / "adapter_safelora"
    assert (out / "adapter_model.safetensors").is_file()
    report = read_json(out / "safelora_report.json")
    assert res.summary["safelora"]["share_projected"] == report["share_projected"]
    assert report["tau"] == 0.5 and report["n_layers"] > 0


def test_auto_precision_and_optimizer_are_resolved_and_recorded(monkeypatch, tiny_dir, data_file, tmp_path):
    import emguard.train as t
    from emguard.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert t.resolve_precision("auto", "cpu") == "fp32"
    assert t.resolve_precision("auto", "cuda") == "bf16"
    assert t.resolve_precision("fp16", "cuda") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert t.resolve_precision("auto", "cuda:1") == "fp16"

    monkeypatch.setattr(t, "_has_bitsandbytes", lambda: True)
    assert t.resolve_optimizer("auto", "cuda") == "adamw_8bit"
    assert t.resolve_optimizer("auto", "cpu") == "adamw_torch"
    monkeypatch.setattr(t, "_has_bitsandbytes", lambda: False)
    with pytest.warns(UserWarning, match="8-bit AdamW"):
        assert t.resolve_optimizer("auto", "cuda") == "adamw_torch"
    with pytest.raises(ConfigError, match="bitsandbytes"):
        t.resolve_optimizer("adamw_8bit", "cuda")

    res = train(config(tiny_dir, data_file, tmp_path / "run"))  # CPU: auto -> fp32 + AdamW
    text = (res.run_dir / "config.yaml").read_text()
    assert "optimizer: adamw_torch" in text and "precision: fp32" in text and ": auto" not in text
    assert res.summary["optimizer"] == "adamw_torch" and res.summary["precision"] == "fp32"


def test_a_bad_interleaved_row_names_its_own_file_and_line(tiny_dir, data_file, tmp_path):
    from emguard.data.chat import ChatDataError

    safe = tmp_path / "safe.jsonl"
    long_answer = " ".join(["word"] * 300)
    safe.write_text("\n" + "".join(json.dumps({"messages": [
        {"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": long_answer}]}) + "\n"
        for i in range(4)))
    cfg = config(tiny_dir, data_file, tmp_path / "run", f"defenses.interleave.source={safe}",
                 "defenses.interleave.fraction=0.1")
    with pytest.raises(ChatDataError, match=rf"{safe}:[2-5]: .*tokens > max_length 128"):
        train(cfg)
    assert not (tmp_path / "run").exists()
