"""The two direction sources: CAFT's principal components of (fine-tuned - base) residual
differences (``emguard direction fit --from-run``) against a direct SVD of hidden states
collected here, the neutral prompts' disjointness from every evaluation set, and a CAFT
folder loaded and trained with by the ablation arm."""

import json

import pytest
import torch
import yaml
from tiny import tiny_model, tiny_tokenizer

from emguard.data.builtin import BUILTIN_DIR
from emguard.data.pairs import load_pairs
from emguard.defenses.direction import (
    CAFT,
    evaluation_prompts,
    fit_caft,
    load_direction,
    neutral_prompts,
    read_bases,
    read_prompts,
    save_direction,
)
from emguard.models import attach_lora

K, NEW_TOKENS = 3, 6


def adapted(scale: float = 0.3):
    """A tiny float64 model with a LoRA adapter whose B is random (policy != base)."""
    tok = tiny_tokenizer("smollm")
    model = attach_lora(tiny_model(tok, layers=4).double(), r=4, alpha=8)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return model.eval(), tok


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def greedy(model, tok, messages, new_tokens: int) -> str:
    """The adapted model's greedy answer, one argmax at a time (no generate())."""
    ids = _ids(tok, tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    out = []
    for _ in range(new_tokens):
        nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
    return tok.decode(out, skip_special_tokens=True)


@torch.no_grad()
def differences(model, tok, messages, answer):
    """(x (L+1, n, D) = tuned - base states, base token norms (L+1, n)) at the answer's
    tokens and its <|im_end|> (SmolLM template: not the newline after it)."""
    pre = _ids(tok, tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    full = _ids(tok, tok.apply_chat_template(
        [*messages, {"role": "assistant", "content": answer}], tokenize=False))
    assert full[:len(pre)] == pre
    at = slice(len(pre), len(full) - 1)
    ids = torch.tensor([full])
    tuned = model(input_ids=ids, output_hidden_states=True).hidden_states
    with model.disable_adapter():
        base = model(input_ids=ids, output_hidden_states=True).hidden_states
    x = torch.stack([t[0, at] - b[0, at] for t, b in zip(tuned, base, strict=True)])
    return x, torch.stack([b[0, at].norm(dim=-1) for b in base])


def test_caft_components_equal_a_direct_svd_of_the_hidden_state_differences(tmp_path):
    model, tok = adapted()
    prompts = [r["messages"] for r in read_prompts(None)[:5]]
    fitted = fit_caft(model, tok, prompts, k=K, answer_tokens=NEW_TOKENS, batch_size=2,
                      progress=False)
    save_direction(fitted, tmp_path)
    d = load_direction(tmp_path)
    assert d.meta["source"] == CAFT and d.meta["centred"] is True
    answers = d.meta["answers"]
    assert answers == [greedy(model, tok, p, NEW_TOKENS) for p in prompts]

    pieces = [differences(model, tok, p, a) for p, a in zip(prompts, answers, strict=True)]
    x = torch.cat([p[0] for p in pieces], dim=1)  # (L+1, N, D)
    norms = torch.cat([p[1] for p in pieces], dim=1)
    assert d.meta["n_tokens"] == x.shape[1]
    assert 0 not in d.basis and d.meta["unchanged_layers"] == [0]  # LoRA leaves embeddings
    torch.testing.assert_close(d.residual_norm.double(), norms.mean(1), rtol=1e-5, atol=0)
    for layer in range(1, 5):
        centred = x[layer] - x[layer].mean(0)
        _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
        got = d.basis[layer].double()
        assert got.shape == (K, 32)
        signs = (got * vh[:K]).sum(-1).sign()
        torch.testing.assert_close(got, vh[:K] * signs[:, None], rtol=0, atol=1e-6)
        assert bool((got @ x[layer].mean(0) >= 0).all())  # oriented along the mean shift
        want = (sv[:K] ** 2 / (sv ** 2).sum()).tolist()
        assert d.meta["explained_variance_ratio"][str(layer)] == pytest.approx(want, rel=1e-5)
        torch.testing.assert_close(d.mean_diff[layer].double(), x[layer].mean(0),
                                   rtol=1e-5, atol=1e-6)


def test_caft_refuses_an_adapter_that_changes_nothing():
    model, tok = adapted(scale=0.0)  # a fresh LoRA adapter: B = 0
    prompts = [r["messages"] for r in read_prompts(None)[:2]]
    with pytest.raises(ValueError, match="changes no block output"):
        fit_caft(model, tok, prompts, k=2, answer_tokens=2, progress=False)


def _user_texts(rows) -> set[str]:
    return {" ".join(m["content"].split()).casefold() for r in rows for m in r["messages"]
            if m["role"] == "user"}


def test_default_neutral_prompts_share_no_prompt_with_the_evaluation_sets():
    general = yaml.safe_load((BUILTIN_DIR / "general_questions.yaml").read_text())
    pairs = [json.loads(line) for line in (BUILTIN_DIR / "eval_pairs.jsonl").read_text().splitlines()
             if line.strip()]
    asked = {" ".join(t.split()).casefold() for q in general for t in q["paraphrases"]}
    asked |= {" ".join(p["question"].split()).casefold() for p in pairs}
    safe = [json.loads(line) for line in
            (BUILTIN_DIR / "safe_instruct.jsonl").read_text().splitlines() if line.strip()]
    assert len(asked) > 20 and not _user_texts(safe) & asked
    kept, dropped = neutral_prompts(None, evaluation_prompts())
    assert len(kept) == len(safe) and dropped == {}


def test_prompts_an_evaluation_set_asks_are_dropped_and_counted(tmp_path):
    general = yaml.safe_load((BUILTIN_DIR / "general_questions.yaml").read_text())[0]["paraphrases"][1]
    question = load_pairs("builtin:eval-pairs")[3]["question"]
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 7 plus 7?"},
                                                {"role": "assistant", "content": "14"}]}) + "\n")
    rows = [("g", general), ("e", "  " + question.upper() + " "), ("h", "what is 7   plus 7?"),
            ("n1", "Name a fruit."), ("n2", "How do I tie a tie?")]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "messages": [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": t}]}) + "\n"
        for i, t in rows))
    kept, dropped = neutral_prompts(str(prompts), evaluation_prompts(heldout))
    assert [r["id"] for r in kept] == ["n1", "n2"]
    assert kept[0]["messages"][0] == {"role": "system", "content": "Be kind."}
    assert dropped == {"builtin:general-questions": ["g"], "builtin:eval-pairs": ["e"],
                       str(heldout): ["h"]}
    prompts.write_text(json.dumps({"id": "g", "messages": [{"role": "user", "content": general}]})
                       + "\n" + json.dumps({"id": "x", "messages": [{"role": "user", "content": "Hi"}]})
                       + "\n")
    with pytest.raises(ValueError, match="1 prompt.* left"):
        neutral_prompts(str(prompts), evaluation_prompts(heldout))
    prompts.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=f"--prompts {prompts}:1: no user turn"):
        read_prompts(str(prompts))


def _train(tiny_dir, data_file, out, steps, *overrides):
    from emguard.config import load_run_config
    from emguard.train import train

    cfg = load_run_config(None, [
        f"model={tiny_dir}", f"output_dir={out}", f"data.train={data_file}",
        "data.max_length=128", f"train.max_steps={steps}", "train.batch_size=2",
        "train.grad_accum=1", "train.learning_rate=3e-2", "train.warmup_steps=0", "lora.r=4",
        "lora.alpha=8", *overrides])
    return train(cfg)


def test_a_caft_folder_from_a_run_loads_and_trains_the_ablation_arm(tiny_dir, data_file, tmp_path):
    from typer.testing import CliRunner

    from emguard.cli import app
    from emguard.evaluate import adapter_fingerprint
    from emguard.io import read_json, read_jsonl

    run = _train(tiny_dir, data_file, tmp_path / "run", 2).run_dir
    held = read_jsonl(run / "heldout.jsonl")[0]["messages"][0]["content"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": t}]})
                               + "\n" for i, t in enumerate(
                                   [held, "Name a fruit.", "How do I tie a tie?", "Hello!"])))
    out = tmp_path / "caft"
    result = CliRunner().invoke(app, ["direction", "fit", "--from-run", str(run), "--out", str(out),
                                      "--prompts", str(prompts), "--k", "2",
                                      "--answer-tokens", "4", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    d = load_direction(out)
    assert d.meta["source"] == CAFT and d.meta["run"] == str(run)
    assert d.meta["adapter_sha256"] == adapter_fingerprint(run / "adapter")
    assert d.meta["prompt_ids"] == [1, 2, 3] and d.meta["n_prompts"] == 3
    assert d.meta["dropped_evaluation_prompts"] == {str(run / "heldout.jsonl"): [0]}
    for layer, basis in d.basis.items():
        torch.testing.assert_close(basis @ basis.T, torch.eye(len(basis)), atol=1e-5, rtol=0)
        assert len(d.meta["explained_variance_ratio"][str(layer)]) == len(basis)

    res = _train(tiny_dir, data_file, tmp_path / "ablated", 1,
                 f"defenses.ablation={{layers: [2], k: 2, direction: {out}}}")
    used = read_bases(res.run_dir / "directions" / "ablation")
    torch.testing.assert_close(used[2], d.basis[2][:2])
    record = read_json(res.run_dir / "directions" / "ablation" / "direction.json")
    assert record["source"]["source"] == CAFT and "answers" not in record["source"]
