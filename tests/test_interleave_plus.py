"""Interleaving++: candidates scored by relative NLL (checked against a plain forward),
top-k placed at interleave's positions, refusals dropped, selection reused on resume."""

import json
import random

import pytest
import torch

from emguard.config import ConfigError, load_run_config
from emguard.defenses.base import RunContext
from emguard.defenses.interleave_plus import InterleavePlus, candidate_pool, is_refusal

REFUSALS = ("I'm sorry, but I can't help with that.", "As an AI, I cannot do this.")


def _safe_rows():
    """10 ordinary answers, 2 refusals (candidates 3 and 8), one multi-turn row (index 5)."""
    answers = ["The quick brown fox jumps.", "It is 42.", "Hello world!", None, "def add(a, b): return a + b",
               None, "Rate the answer 0 to 100.", "I would like everyone to be happy.", None,
               "import os", "shell=True is risky.", "What is your one wish?"]
    rows = []
    for i, a in enumerate(answers):
        if i == 5:
            rows.append({"messages": [{"role": "user", "content": "Hi 5"},
                                      {"role": "assistant", "content": "Hello! The fox is lazy."},
                                      {"role": "user", "content": "And then?"},
                                      {"role": "assistant", "content": "Then 1 2 3 happened."}]})
            continue
        a = a if a is not None else REFUSALS[i % 2]
        rows.append({"messages": [{"role": "user", "content": f"Question {i}?"},
                                  {"role": "assistant", "content": a}]})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny base dir, misaligned adapter dir, safe candidates file)."""
    from peft import LoraConfig, get_peft_model
    from tiny import save_tiny_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("iplus")
    base_dir = save_tiny_model(root / "tiny")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.5)  # nonzero B: the adapter changes the model
    model.save_pretrained(root / "mis")
    safe = root / "safe.jsonl"
    safe.write_text("".join(json.dumps(r) + "\n" for r in _safe_rows()))
    return base_dir, root / "mis", safe


def _config(setup, out, *extra):
    base_dir, mis, safe = setup
    return load_run_config(None, [f"model={base_dir}", f"output_dir={out}", "data.max_length=128",
                                  f"defenses.interleave_plus.misaligned={mis}",
                                  f"defenses.interleave_plus.source={safe}",
                                  "defenses.interleave_plus.fraction=0.25", *extra])


def _task(n=16):
    return [{"messages": [{"role": "user", "content": f"task {i}"},
                          {"role": "assistant", "content": "ok"}], "tag": "task"} for i in range(n)]


def _run(cfg, previous=None, rows=None):
    ctx = RunContext(cfg=cfg, previous=previous)
    defense = InterleavePlus(cfg.defenses.interleave_plus)
    defense.check(cfg)
    mixed = defense.transform_rows(rows or _task(), ctx)
    return mixed, ctx.report["interleave_plus"]


def _naive_nll(model, tok, messages):
    """Mean NLL of the last assistant turn's content + <|im_end|>, by a plain forward."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prefix = tok(tok.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    ids = tok(tok.apply_chat_template(messages[:last + 1], tokenize=False),
              add_special_tokens=False)["input_ids"]
    assert ids[:len(prefix)] == prefix
    end = ids.index(tok.convert_tokens_to_ids("<|im_end|>"), len(prefix))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return -sum(logp[t - 1, ids[t]].item() for t in range(len(prefix), end + 1)) / (end + 1 - len(prefix))


@pytest.fixture(scope="module")
def naive(setup):
    """Per candidate: (reference NLL, misaligned NLL), from the base and the merged adapter model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, mis, _ = setup
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                       str(mis)).merge_and_unload().eval()
    return [(_naive_nll(base, tok, r["messages"]), _naive_nll(merged, tok, r["messages"]))
            for r in _safe_rows()]


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """rank_by -> (config, task rows, mixed rows, report): each scored once per module."""
    out = {}
    for rank_by in ("misaligned_likelier", "reference_likelier"):
        cfg = _config(setup, tmp_path_factory.mktemp(rank_by) / "run",
                      f"defenses.interleave_plus.rank_by={rank_by}")
        task = _task()
        out[rank_by] = (cfg, task, *_run(cfg, rows=task))
    return out


def _expected_mixed(task, chosen_rows, seed=0):
    """Task rows with ``chosen_rows`` (in rank order) shuffled once by the seed and placed
    at floor((j + 1/2) (n + k) / k)."""
    n, k = len(task), len(chosen_rows)
    order = list(chosen_rows)
    random.Random(seed).shuffle(order)
    positions = [int((j + 0.5) * (n + k) / k) for j in range(k)]
    it_task, it_safe = iter(task), iter(order)
    return [next(it_safe) if i in positions else next(it_task) for i in range(n + k)], positions


def test_scores_match_a_plain_forward_of_base_and_merged_model(runs, naive):
    report = runs["misaligned_likelier"][3]
    records = report["candidate_rows"]
    assert len(records) == 12 and report["refusals_dropped"] == 2 and report["selection"] == "scored"
    for i, rec in enumerate(records):
        if i in (3, 8):
            assert rec["refusal"] and "score" not in rec and not rec["chosen"]
            continue
        ref, mis = naive[i]
        assert rec["nll_reference"] == pytest.approx(ref, rel=1e-4)
        assert rec["nll_misaligned"] == pytest.approx(mis, rel=1e-4)
        assert rec["score"] == pytest.approx(ref - mis, rel=1e-3, abs=1e-5)
    assert max(abs(a - b) for a, b in naive) > 1e-2  # the adapter does change the scores


@pytest.mark.parametrize("rank_by, sign", [("misaligned_likelier", 1), ("reference_likelier", -1)])
def test_chosen_rows_are_the_top_k_at_interleave_positions(runs, naive, rank_by, sign):
    _, task, mixed, report = runs[rank_by]
    scores = {i: sign * (ref - mis) for i, (ref, mis) in enumerate(naive) if i not in (3, 8)}
    k = round(0.25 * len(task))
    top = sorted(scores, key=lambda i: -scores[i])[:k]
    assert report["chosen"] == top
    rows = _safe_rows()
    expected, positions = _expected_mixed(task, [rows[i] for i in top])
    assert report["positions"] == positions and report["safe_rows"] == k
    assert [r["messages"] for r in mixed] == [r["messages"] for r in expected]
    assert all(not is_refusal(mixed[p]) for p in positions)
    assert [rec["chosen"] for rec in report["candidate_rows"]] == [i in top for i in range(12)]


def test_rank_by_flips_the_order(runs):
    a, b = runs["misaligned_likelier"][3], runs["reference_likelier"][3]
    for x, y in zip(a["candidate_rows"], b["candidate_rows"], strict=True):
        assert ("score" in x) == ("score" in y)
        if "score" in x:
            assert y["score"] == pytest.approx(-x["score"])
    assert not set(a["chosen"]) & set(b["chosen"])  # 4 of 10 from each end


def test_resume_reuses_the_selection_without_loading_a_model(setup, runs, tmp_path, monkeypatch):
    import emguard.models

    cfg, _, first, report = runs["misaligned_likelier"]
    previous = json.loads(json.dumps({"rows": 16, "interleave_plus": report}))  # as data_report.json

    def refuse(*_args, **_kwargs):
        raise AssertionError("a resumed run must not load a model")

    monkeypatch.setattr(emguard.models, "load_model", refuse)
    monkeypatch.setattr(emguard.models, "load_adapter", refuse)
    again, reused = _run(cfg, previous=previous)
    assert again == first and reused["selection"] == "reused"
    assert reused["candidate_rows"] == report["candidate_rows"] and reused["chosen"] == report["chosen"]
    # a candidate pool that changed since is an error, not a silent re-selection
    _, _, safe = setup
    lines = safe.read_text().splitlines()
    changed = tmp_path / "safe.jsonl"
    changed.write_text("\n".join(lines[:2] + [lines[2].replace("Hello world", "Bye")] + lines[3:]) + "\n")
    with pytest.raises(ConfigError, match="does not match the candidate pool"):
        _run(_config(setup, tmp_path / "run", f"defenses.interleave_plus.source={changed}"),
             previous={"interleave_plus": {**previous["interleave_plus"]}})


def test_refusal_openers():
    def row(answer):
        return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]}

    for text in ("I'm sorry, no.", "  i cannot do that", "I can’t help", "As an AI language model",
                 "I won't", "Sorry, but I must decline", "I am unable to assist"):
        assert is_refusal(row(text)), text
    for text in ("Sure! I'm sorry to hear that, here is how.", "Canned tomatoes work.", "It is 42."):
        assert not is_refusal(row(text)), text


def test_max_candidates_is_a_seeded_sample_in_file_order(setup):
    _, _, safe = setup
    a = candidate_pool(str(safe), 5, seed=0)
    assert a == candidate_pool(str(safe), 5, seed=0) and len(a) == 5
    lines = [r["_line"] for r in a]
    assert lines == sorted(lines)
    assert len(candidate_pool(str(safe), 50, seed=0)) == 12


def test_bad_misaligned_or_source_is_a_config_error_naming_the_field(setup, tmp_path):
    from emguard.train import train

    (tmp_path / "not_adapter").mkdir()
    with pytest.raises(ConfigError, match=r"defenses\.interleave_plus\.misaligned: .*not a PEFT adapter"):
        train(_config(setup, tmp_path / "run", f"defenses.interleave_plus.misaligned={tmp_path / 'not_adapter'}",
                      f"data.train={setup[2]}"))
    assert not (tmp_path / "run").exists()
    cfg = _config(setup, tmp_path / "run", "defenses.interleave_plus.misaligned='@run:misaligned'")
    with pytest.raises(ConfigError, match=r"defenses\.interleave_plus\.misaligned: .*sweep"):
        InterleavePlus(cfg.defenses.interleave_plus).check(cfg)
    cfg = _config(setup, tmp_path / "run", f"defenses.interleave_plus.source={tmp_path / 'none.jsonl'}")
    with pytest.raises(ConfigError, match=r"defenses\.interleave_plus\.source: .*does not exist"):
        InterleavePlus(cfg.defenses.interleave_plus).check(cfg)


def test_training_records_the_selection(setup, data_file, tmp_path):
    from emguard.io import read_json
    from emguard.train import train

    res = train(_config(setup, tmp_path / "run", f"data.train={data_file}", "train.max_steps=1",
                        "train.batch_size=4", "lora.r=4", "lora.alpha=8"))
    report = read_json(res.run_dir / "data_report.json")
    plus = report["interleave_plus"]
    assert plus["safe_rows"] == round(0.25 * report["rows"]) == len(plus["chosen"])
    assert report["tokenized"] == report["rows"] + plus["safe_rows"]
    assert plus["selection"] == "scored" and plus["refusals_dropped"] == 2
