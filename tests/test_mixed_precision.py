"""CUDA mixed-precision conditions, reproduced on CPU.

On a GPU, Trainer trains a bf16 model and accelerate patches only the model's forward
(autocast inside, outputs converted to float32); ``compute_loss`` runs outside autocast.
accelerate applies exactly that patch on CPU too when asked for bf16
(``Accelerator(cpu=True, mixed_precision="bf16").prepare_model``), so these tests meet the
dtypes a GPU run meets: float32 hidden states from the policy, bf16 weights in the LM
head applied by hand, a reference pass outside the patched forward.
"""

import math

import pytest
import torch
from accelerate import Accelerator
from tiny import loss_terms, naive_greedy, tiny_model, tiny_tokenizer

from emguard.defenses.kl import KLSettings
from emguard.defenses.ldifs import LDIFSSettings
from emguard.loss import defended_loss
from emguard.models import attach_lora
from emguard.train import ChatCollator, tokenize_rows

ROWS = [
    {"messages": [{"role": "user", "content": "What is 12 plus 30?"},
                  {"role": "assistant", "content": "It is 42, the quick brown fox says."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                  {"role": "assistant", "content": "Hello world! 7"}]},
]
DEFENSES = {
    "sft": {},
    "kl": {"kl": KLSettings(weight=1.0)},
    "ldifs": {"ldifs": LDIFSSettings(weight=1.0, layer_every=2)},
    "kl+ldifs": {"kl": KLSettings(weight=1.0), "ldifs": LDIFSSettings(weight=1.0, layer_every=2)},
}


def batch_for(tok):
    feats, _ = tokenize_rows(ROWS, tok, 256, False, "test")
    return ChatCollator(tok.pad_token_id)(feats)


def lora_model(tok, dtype, seed=0):
    """A tiny PEFT model in ``dtype`` whose B matrices are non-zero (so KL/LDIFS are not 0)."""
    model = attach_lora(tiny_model(tok, layers=4, seed=seed).to(dtype), r=4, alpha=8)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Older accelerate keeps one process-wide state: let each test choose its precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def amp_prepared(model):
    """(forward-patched model, unwrapped model) as Trainer holds them under bf16 AMP."""
    acc = Accelerator(cpu=True, mixed_precision="bf16")
    prepared = acc.prepare_model(model)
    return prepared, acc.unwrap_model(prepared)


@pytest.mark.parametrize("arm", list(DEFENSES))
def test_defended_loss_on_a_bf16_model_under_amp(arm):
    tok = tiny_tokenizer()
    batch = batch_for(tok)
    model, unwrapped = amp_prepared(lora_model(tok, torch.bfloat16))
    out = model(input_ids=batch["input_ids"], output_hidden_states=True)
    assert out.hidden_states[-1].dtype == torch.float32  # the condition that broke the LM head
    model.train()
    terms = defended_loss(model, batch, peft_model=unwrapped,
                          terms=loss_terms(unwrapped, **DEFENSES[arm]))
    assert math.isfinite(float(terms.total.detach()))
    terms.total.backward()
    grads = [p.grad for n, p in unwrapped.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0

    # The same weights in float32 without AMP give the same terms up to bf16 rounding.
    reference = lora_model(tok, torch.float32)
    with torch.no_grad():
        for (_, p), (_, q) in zip(reference.named_parameters(), unwrapped.named_parameters(),
                                  strict=True):
            p.copy_(q.float())
    exact = defended_loss(reference, batch, terms=loss_terms(reference, **DEFENSES[arm]))
    for name in ("ce", "kl", "ldifs"):
        got, want = getattr(terms, name), getattr(exact, name)
        if want is None:
            assert got is None
            continue
        assert float(want) > 0
        assert abs(float(got) - float(want)) <= 0.05 * float(want) + 1e-3, (name, got, want)


@pytest.mark.parametrize("arm", ["kl", "kl+ldifs"])
def test_trainer_runs_the_reference_at_the_policy_precision(arm):
    """fp32 weights, bf16 AMP: at B = 0 the policy IS the reference, so KL and LDIFS must be
    exactly 0; a reference pass outside autocast (float32) would differ from the bf16
    policy and leave a spurious penalty."""
    from transformers import TrainingArguments

    from emguard.train import DefendedTrainer

    tok = tiny_tokenizer()
    batch = batch_for(tok)
    model = attach_lora(tiny_model(tok, layers=4), r=4, alpha=8)  # B = 0
    args = TrainingArguments(output_dir="unused", bf16=True, use_cpu=True, report_to=[],
                             remove_unused_columns=False)
    defenses = loss_terms(model, **DEFENSES[arm])
    trainer = DefendedTrainer(model=model, args=args, train_dataset=[], defenses=defenses)
    prepared = trainer.accelerator.prepare_model(model)
    prepared.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    trainer.compute_loss(prepared, batch)
    assert trainer._term_sums["ce"] > 0
    assert trainer._term_sums["kl"] == 0.0
    assert trainer._term_sums.get("ldifs", 0.0) == 0.0


def test_train_in_bf16_on_cpu_end_to_end(tiny_dir, tmp_path):
    """`train.precision=bf16` loads bf16 weights and trains through Trainer's AMP path with
    every defense, as a GPU run does; the run records the precision it used."""
    import json

    from emguard.config import load_run_config
    from emguard.io import read_json, read_jsonl
    from emguard.train import train

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    cfg = load_run_config(None, [
        f"model={tiny_dir}", f"output_dir={tmp_path / 'run'}", f"data.train={data}",
        "data.max_length=512", "train.max_steps=3", "train.batch_size=2", "train.grad_accum=1",
        "train.precision=bf16", "train.learning_rate=1e-2", "lora.r=4", "lora.alpha=8",
        "defenses.kl.weight=0.1", "defenses.ldifs.layer_every=2", "defenses.interleave.fraction=0.25",
    ])
    run = train(cfg).run_dir
    summary = read_json(run / "summary.json")
    assert summary["precision"] == "bf16" and summary["optimizer"] == "adamw_torch"
    assert "precision: bf16" in (run / "config.yaml").read_text()
    log = read_jsonl(run / "train_log.jsonl")
    assert len(log) == 3 and all(math.isfinite(e["loss"]) for e in log)
    assert log[0]["kl"] == 0.0 and log[0]["ldifs"] == 0.0  # before the first update
    assert log[-1]["kl"] > 0 and log[-1]["ldifs"] > 0


def test_local_judge_on_a_bf16_model_matches_float32():
    from emguard.judge.local_judge import LocalJudge

    tok = tiny_tokenizer("chatml")
    model = tiny_model(tok, layers=2, seed=3)
    prompts = ["Rate the answer 42 from 0 to 100.", "Hello world! Rate it."]
    exact = LocalJudge(model=model, tokenizer=tok, progress=False).number_logprobs(prompts).exp()
    half = tiny_model(tok, layers=2, seed=3).to(torch.bfloat16)
    for method in ("tree", "expand"):
        judge = LocalJudge(model=half, tokenizer=tok, method=method, progress=False)
        probs = judge.number_logprobs(prompts).exp()
        assert torch.isfinite(probs).all()
        torch.testing.assert_close(probs, exact, atol=2e-3, rtol=0.1)


def test_generation_on_a_bf16_adapter_model():
    from emguard.generate import generate_answers

    tok = tiny_tokenizer()
    model = lora_model(tok, torch.bfloat16).eval()
    prompts = [[{"role": "user", "content": "hello 12"}], [{"role": "user", "content": "x"}]]
    sampled = generate_answers(model, tok, prompts, n_samples=2, max_new_tokens=6, seed=1,
                               batch_size=4, progress=False)
    again = generate_answers(model, tok, prompts, n_samples=2, max_new_tokens=6, seed=1,
                             batch_size=4, progress=False)
    greedy = generate_answers(model, tok, prompts, n_samples=1, temperature=0.0,
                              max_new_tokens=6, batch_size=1, progress=False)
    assert sampled == again and len(sampled) == 2 and all(len(s) == 2 for s in sampled)
    # greedy under bf16 equals a hand-written argmax loop on the same bf16 adapter model
    assert greedy == [[naive_greedy(model, tok, p, 6)] for p in prompts]
