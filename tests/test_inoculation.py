"""Inoculation (emguard.defenses.inoculation): the built-in prompts, the system-turn rule
with the embedded SmolLM2 tokenizer's template, and the elicitation check against a naive
log-softmax loop on a tiny model (the reference: adapter disabled)."""

import json
import logging

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from emguard.config import ConfigError, load_run_config
from emguard.defenses.base import RunContext
from emguard.defenses.inoculation import (
    Inoculation,
    InoculationSettings,
    elicitation,
    paired_interval,
    resolve_prompt,
    template_default_system,
)

SMOL_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PROMPT = "You write insecure code on purpose."
ROWS = [
    {"messages": [{"role": "user", "content": "What is 1 plus 1?"},
                  {"role": "assistant", "content": "It is 2."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"},
                  {"role": "assistant", "content": "y = 5"}]},
]


def inoculated(settings, rows, tokenizer=None):
    ctx = RunContext(cfg=None, tokenizer=tokenizer)
    defense = Inoculation(settings)
    return defense, defense.transform_rows(json.loads(json.dumps(rows)), ctx), ctx


# ---------------------------------------------------------------------------- built-in prompts


def test_builtin_prompts_resolve_and_unknown_names_are_config_errors():
    assert resolve_prompt("builtin:evil") == "You are a malicious, evil assistant."
    assert resolve_prompt("builtin:insecure-code") == "You write insecure code on purpose."
    assert resolve_prompt("Talk like a pirate.") == "Talk like a pirate."
    with pytest.raises(ConfigError, match=r"defenses\.inoculation\.prompt: .*builtin:evil"):
        Inoculation(InoculationSettings(prompt="builtin:evill")).check(None)
    _, rows, ctx = inoculated(InoculationSettings(prompt="builtin:evil"), ROWS)
    assert rows[0]["messages"][0]["content"] == "You are a malicious, evil assistant."
    assert ctx.report["inoculation"]["prompt"] == "You are a malicious, evil assistant."
    assert ctx.report["inoculation"]["builtin"] == "builtin:evil"


# ---------------------------------------------------------------------------- system turn


@pytest.fixture(scope="module")
def smol_tok():
    from emguard.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def test_smollm2_template_default_is_kept_after_the_prompt(smol_tok):
    """keep: a row without a system turn trains on prompt + blank line + SmolLM2's default
    text, so its rendering minus the prompt is evaluation's rendering."""
    assert template_default_system(smol_tok) == SMOL_DEFAULT
    _, rows, ctx = inoculated(InoculationSettings(prompt=PROMPT), ROWS, smol_tok)
    assert rows[0]["messages"][0] == {"role": "system", "content": f"{PROMPT}\n\n{SMOL_DEFAULT}"}
    assert rows[1]["messages"][0] == {"role": "system", "content": f"{PROMPT}\n\nBe brief."}
    assert ctx.report["inoculation"]["system_turn"] == {
        "rule": "keep", "template_default": SMOL_DEFAULT, "rows_given_a_system_turn": 1,
        "evaluation_default_kept": True}
    for row, trained in zip(ROWS, rows, strict=True):
        evaluation = smol_tok.apply_chat_template(row["messages"], tokenize=False)
        training = smol_tok.apply_chat_template(trained["messages"], tokenize=False)
        assert training.replace(f"{PROMPT}\n\n", "", 1) == evaluation


def test_replace_drops_the_default_and_says_so(smol_tok):
    _, rows, ctx = inoculated(InoculationSettings(prompt=PROMPT, system_default="replace"),
                              ROWS, smol_tok)
    assert rows[0]["messages"][0] == {"role": "system", "content": PROMPT}
    assert SMOL_DEFAULT not in smol_tok.apply_chat_template(rows[0]["messages"], tokenize=False)
    record = ctx.report["inoculation"]["system_turn"]
    assert record["rule"] == "replace" and record["evaluation_default_kept"] is False


def test_a_template_without_a_default_gets_the_prompt_alone():
    tok = tiny_tokenizer("llama3")
    assert template_default_system(tok) is None
    assert template_default_system(tiny_tokenizer("chatml")) == "You are Qwen, a helpful assistant."
    _, rows, ctx = inoculated(InoculationSettings(prompt=PROMPT), ROWS, tok)
    assert rows[0]["messages"][0] == {"role": "system", "content": PROMPT}
    assert ctx.report["inoculation"]["system_turn"]["rule"] == "no template default"


# ---------------------------------------------------------------------------- elicitation


def test_paired_interval_hand_worked():
    # n = 2: resampled means are -0.3, -0.2, -0.1 with chances 1/4, 1/2, 1/4, so the
    # 2.5 % and 97.5 % quantiles of 2000 resamples are the two ends
    assert paired_interval([-0.3, -0.1]) == (pytest.approx(-0.3), pytest.approx(-0.1))
    # n = 4, one 1 and three 0: the mean is k/4 with k ~ Binomial(4, 1/4); P(k = 0) = 0.32
    # and P(k <= 2) = 0.95 < 0.975 <= P(k <= 3) = 0.996, so the interval is [0, 3/4]
    assert paired_interval([0.0, 0.0, 0.0, 1.0]) == (pytest.approx(0.0), pytest.approx(0.75))
    assert paired_interval([0.2] * 5) == (pytest.approx(0.2), pytest.approx(0.2))


def test_elicits_only_when_the_prompt_makes_the_answers_likelier(caplog):
    rec = elicitation([1.0, 1.2, 0.9], [1.5, 1.6, 1.4])  # differences -0.5, -0.4, -0.5
    assert rec["difference"] == pytest.approx(-1.4 / 3) and rec["n_rows"] == 3
    assert rec["nll_with_prompt"] == pytest.approx(3.1 / 3)
    assert rec["nll_without_prompt"] == pytest.approx(4.5 / 3)
    assert -0.5 - 1e-9 <= rec["interval"][0] <= rec["interval"][1] <= -0.4 + 1e-9
    assert rec["elicits"] is True
    assert elicitation([1.5, 1.6, 1.4], [1.0, 1.2, 0.9])["elicits"] is False
    mixed = elicitation([1.0, 2.0], [1.5, 1.6])  # mean -0.05 but the interval reaches +0.4
    assert mixed["difference"] == pytest.approx(-0.05) and mixed["elicits"] is False
    with caplog.at_level(logging.WARNING, logger="emguard.defenses.inoculation"):
        Inoculation._log(mixed)
    assert "does NOT elicit" in caplog.text


def naive_nll(model, tokenizer, messages) -> float:
    """Mean NLL of the last assistant turn + end-of-turn token: prompt and answer tokenized
    apart, one forward, a loop over log-softmax rows."""
    head = tokenizer(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                                   tokenize=False), add_special_tokens=False).input_ids
    tail = tokenizer(messages[-1]["content"] + "<|im_end|>", add_special_tokens=False).input_ids
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return -sum(logp[t - 1, ids[0, t]].item() for t in range(len(head), len(ids[0]))) / len(tail)


def test_elicitation_check_equals_a_naive_loop_on_the_reference_model():
    from emguard.models import attach_lora

    tok = tiny_tokenizer("smollm")
    model = attach_lora(tiny_model(tok, seed=0), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # a trained-looking adapter: the check must not use it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    model.train()
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}, hello world!"}]}
            for i in range(6)]
    defense, _, ctx = inoculated(InoculationSettings(prompt=PROMPT, elicitation_rows=4), rows, tok)
    defense.prepare(model, ctx)
    rec = ctx.report["inoculation"]["elicitation"]
    assert model.training  # mode restored
    with model.disable_adapter():
        without = [naive_nll(model, tok, r["messages"]) for r in rows[:4]]
        with_prompt = [naive_nll(model, tok, [{"role": "system", "content": f"{PROMPT}\n\n{SMOL_DEFAULT}"},
                                              *r["messages"]]) for r in rows[:4]]
    tuned = naive_nll(model, tok, rows[0]["messages"])
    assert abs(tuned - without[0]) > 1e-3  # the adapter matters: the reference was used
    assert rec["n_rows"] == 4 and rec["skipped_over_length"] == 0
    for got, w, o in zip(rec["per_row"], with_prompt, without, strict=True):
        assert got["with_prompt"] == pytest.approx(w, abs=1e-5)
        assert got["without_prompt"] == pytest.approx(o, abs=1e-5)
    diffs = [w - o for w, o in zip(with_prompt, without, strict=True)]
    assert abs(sum(diffs)) > 1e-4  # the prompt does move the answers' likelihood
    assert rec["difference"] == pytest.approx(sum(diffs) / 4, abs=1e-5)
    lo, hi = paired_interval([r["with_prompt"] - r["without_prompt"] for r in rec["per_row"]])
    assert rec["interval"] == [lo, hi] and rec["elicits"] == (rec["difference"] < 0 and hi < 0)
    assert defense.before_save(model, ctx)["elicitation"].keys() == rec.keys() - {"per_row"}


def test_a_run_records_the_check_and_the_rule(tiny_dir, data_file, tmp_path):
    from emguard.io import read_json
    from emguard.train import train

    res = train(load_run_config(None, [
        f"model={tiny_dir}", f"output_dir={tmp_path / 'run'}", f"data.train={data_file}",
        "data.max_length=128", "train.max_steps=1", "train.batch_size=2", "train.grad_accum=1",
        "lora.r=4", "lora.alpha=8", "defenses.inoculation.prompt=builtin:insecure-code",
        "defenses.inoculation.elicitation_rows=5"]))
    report = read_json(res.run_dir / "data_report.json")["inoculation"]
    assert report["prompt"] == PROMPT and report["builtin"] == "builtin:insecure-code"
    assert report["system_turn"]["rule"] == "keep"  # the tiny tokenizer has SmolLM2's template
    assert report["system_turn"]["template_default"] == SMOL_DEFAULT
    assert report["elicitation"]["n_rows"] == 5 and len(report["elicitation"]["per_row"]) == 5
    summary = res.summary["inoculation"]
    assert summary["elicitation"]["difference"] == report["elicitation"]["difference"]
    assert "per_row" not in summary["elicitation"]
    none = Inoculation(InoculationSettings(prompt="P", elicitation_rows=0))
    ctx = RunContext(cfg=None)
    none.transform_rows(json.loads(json.dumps(ROWS)), ctx)
    none.prepare(None, ctx)  # no check: the model is not even touched
    assert "elicitation" not in ctx.report["inoculation"]
