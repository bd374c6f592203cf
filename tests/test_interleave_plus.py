"""Interleaving++ as published (arXiv 2508.06249 v3 as two secondary descriptions state it):
s = mean_j (NLL_mis_j - NLL_aligned) / (NLL_aligned + eps) over K misaligned adapters,
HIGHEST kept, refusals dropped after ranking. Checked against NLLs of a plain forward of the
base and of each merged adapter model, and against hand-worked scores."""

import json
import random
import warnings

import pytest
import torch

import emguard.defenses.interleave_plus as iplus
from emguard.config import ConfigError, load_run_config
from emguard.defenses.base import RunContext
from emguard.defenses.interleave_plus import InterleavePlus, candidate_pool, is_refusal

REFUSALS = ("I'm sorry, but I can't help with that.", "As an AI, I cannot do this.")
REFUSAL_ROWS = (3, 8)
EPS = 1e-6  # the epsilon the published score is stated with


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


def _save_adapter(base_dir, out, seed, targets):
    """A LoRA adapter with random nonzero B (so it changes the model), saved to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny base dir, [two misaligned adapter dirs on different modules], safe candidates file)."""
    from tiny import save_tiny_model

    root = tmp_path_factory.mktemp("iplus")
    base_dir = save_tiny_model(root / "tiny")
    adapters = [_save_adapter(base_dir, root / "mis_a", 1, ["q_proj", "v_proj", "down_proj"]),
                _save_adapter(base_dir, root / "mis_b", 2, ["k_proj", "o_proj", "up_proj"])]
    safe = root / "safe.jsonl"
    safe.write_text("".join(json.dumps(r) + "\n" for r in _safe_rows()))
    return base_dir, adapters, safe


def _config(setup, out, *extra, misaligned=None):
    base_dir, adapters, safe = setup
    sources = misaligned if misaligned is not None else f"[{adapters[0]}, {adapters[1]}]"
    return load_run_config(None, [f"model={base_dir}", f"output_dir={out}", "data.max_length=128",
                                  f"defenses.interleave_plus.misaligned={sources}",
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
    """Mean NLL of the last assistant turn's content + <|im_end|>, by a plain forward and a
    per-token loop over log-softmax."""
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
    """Per candidate: (aligned NLL, [NLL under base + adapter j, merged, for j = 0, 1])."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapters, _ = setup
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    merged = [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                        str(a)).merge_and_unload().eval() for a in adapters]
    return [(_naive_nll(base, tok, r["messages"]), [_naive_nll(m, tok, r["messages"]) for m in merged])
            for r in _safe_rows()]


def _hand_score(ref, mis):
    """The published score, written out: mean_j (mis_j - ref) / (ref + eps)."""
    return sum((m - ref) / (ref + EPS) for m in mis) / len(mis)


def _order(scores):
    """Candidate indices, highest score first (ties: lower index)."""
    return sorted(scores, key=lambda i: (-scores[i], i))


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """rank_by -> (config, task rows, mixed rows, report): each scored once per module."""
    out = {}
    for rank_by in ("published", "misaligned_likelier"):
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


def test_published_score_per_row_matches_a_plain_forward_of_base_and_each_merged_adapter(runs, naive):
    report = runs["published"][3]
    records = report["candidate_rows"]
    assert len(records) == 12 and report["selection"] == "scored"
    assert report["rank_by"] == "published" and report["epsilon"] == EPS
    for i, rec in enumerate(records):  # refusals are scored too: they are filtered after ranking
        ref, mis = naive[i]
        assert rec["refusal"] == (i in REFUSAL_ROWS)
        assert rec["nll_reference"] == pytest.approx(ref, rel=1e-4)
        assert rec["nll_misaligned"] == pytest.approx(mis, rel=1e-4)
        assert rec["score"] == pytest.approx(_hand_score(ref, mis), rel=1e-3, abs=1e-5)
    assert sum(abs(m[0] - m[1]) > 1e-2 for _, m in naive) >= 6  # the two sources differ
    assert max(abs(r - m[0]) for r, m in naive) > 1e-2  # the adapters do change the NLLs


def test_ranking_is_highest_first_and_refusals_are_dropped_after_it(runs, naive):
    _, task, mixed, report = runs["published"]
    scores = {i: _hand_score(ref, mis) for i, (ref, mis) in enumerate(naive)}
    order = _order(scores)
    k = round(0.25 * len(task))
    top = [i for i in order if i not in REFUSAL_ROWS][:k]
    assert [rec["rank"] for rec in report["candidate_rows"]] == [order.index(i) for i in range(12)]
    assert report["chosen"] == top and report["k"] == k
    assert report["refusals_in_top_k"] == sum(i in REFUSAL_ROWS for i in order[:k])
    assert report["refusals_dropped"] == 2
    old = {i: ref - sum(mis) / 2 for i, (ref, mis) in enumerate(naive) if i not in REFUSAL_ROWS}
    assert top != _order(old)[:k]  # the old rule (NLL_ref - NLL_mis) picks other rows here
    rows = _safe_rows()
    expected, positions = _expected_mixed(task, [rows[i] for i in top])
    assert report["positions"] == positions and report["safe_rows"] == k
    assert [r["messages"] for r in mixed] == [r["messages"] for r in expected]
    assert all(not is_refusal(mixed[p]) for p in positions)
    assert [rec["chosen"] for rec in report["candidate_rows"]] == [i in top for i in range(12)]


def test_old_ordering_is_kept_under_its_explicit_name(runs, naive):
    report = runs["misaligned_likelier"][3]
    old = {i: ref - sum(mis) / 2 for i, (ref, mis) in enumerate(naive)}
    for i, rec in enumerate(report["candidate_rows"]):
        assert rec["score"] == pytest.approx(old[i], rel=1e-3, abs=1e-5)
    assert report["chosen"] == [i for i in _order(old) if i not in REFUSAL_ROWS][:4]
    assert report["chosen"] != runs["published"][3]["chosen"]


# Hand-worked NLLs (nats/token) per candidate: (aligned, [source A, source B]); 3 and 8 are
# the refusals. Scores mean_j (mis_j - ref) / ref, times ref / (ref + eps) (no near ties):
#   0: (0.5 + 0.5)/2 = 0.5      1: (0 + 0.5)/2 = 0.25      2: (-0.5 + 0)/2 = -0.25
#   3: (2 + 1)/2 = 1.5          4: (1.1 + 0)/2 = 0.55      5: 0
#   6: (-0.5 - 0.5)/2 = -0.5    7: (1 + 0.2)/2 = 0.6       8: (2 + 1.4)/2 = 1.7
#   9: (-0.5 - 0.4)/2 = -0.45  10: (0.1 + 0.1)/2 = 0.1    11: (0 + 0.6)/2 = 0.3
# Ranking: 8 3 7 4 0 11 1 10 5 2 9 6. k = round(0.25 * 16) = 4: the top 4 (8 3 7 4) hold 2
# refusals; dropped after ranking, the chosen rows are 7 4 0 11. The old rule (ref - mean mis)
# would choose 6 9 2 5.
HAND_NLL = [(1.0, [1.5, 1.5]), (2.0, [2.0, 3.0]), (1.0, [0.5, 1.0]), (0.5, [1.5, 1.0]),
            (2.0, [4.2, 2.0]), (1.0, [1.0, 1.0]), (4.0, [2.0, 2.0]), (1.0, [2.0, 1.2]),
            (1.0, [3.0, 2.4]), (2.0, [1.0, 1.2]), (1.0, [1.1, 1.1]), (0.5, [0.5, 0.8])]
HAND_SCORES = [0.5, 0.25, -0.25, 1.5, 0.55, 0.0, -0.5, 0.6, 1.7, -0.45, 0.1, 0.3]
HAND_RANKING = [8, 3, 7, 4, 0, 11, 1, 10, 5, 2, 9, 6]


@pytest.fixture
def hand_scored(setup, monkeypatch):
    """score_candidates replaced by HAND_NLL (checked to be asked for both sources, all rows)."""
    _, adapters, _ = setup

    def fake(cfg, sources, rows, device):
        assert sources == [str(a) for a in adapters] and len(rows) == 12
        return [r for r, _ in HAND_NLL], [list(m) for _, m in HAND_NLL]

    monkeypatch.setattr(iplus, "score_candidates", fake)


@pytest.mark.parametrize("drop, chosen, dropped", [(True, [7, 4, 0, 11], 2), (False, [8, 3, 7, 4], 0)])
def test_hand_worked_scores_rank_and_refusal_filter(setup, hand_scored, tmp_path, drop, chosen, dropped):
    cfg = _config(setup, tmp_path / "run", f"defenses.interleave_plus.drop_refusals={str(drop).lower()}")
    _, report = _run(cfg)
    records = report["candidate_rows"]
    # eps enters as one common factor ref / (ref + eps) per row
    expected = [s * r / (r + EPS) for s, (r, _) in zip(HAND_SCORES, HAND_NLL, strict=True)]
    assert [rec["score"] for rec in records] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert [rec["rank"] for rec in records] == [HAND_RANKING.index(i) for i in range(12)]
    assert [rec["nll_misaligned"] for rec in records] == [m for _, m in HAND_NLL]
    assert report["chosen"] == chosen and report["refusals_in_top_k"] == 2
    assert report["refusals_dropped"] == dropped
    assert [rec["refusal"] for rec in records] == [i in REFUSAL_ROWS for i in range(12)]


def test_a_plain_string_is_one_source_and_a_list_keeps_its_order(setup, tmp_path):
    _, adapters, _ = setup
    one = _config(setup, tmp_path / "a", misaligned=str(adapters[1])).defenses.interleave_plus
    assert one.misaligned == str(adapters[1]) and one.sources == [str(adapters[1])]
    two = _config(setup, tmp_path / "b", misaligned=f"[{adapters[1]}, {adapters[0]}]").defenses.interleave_plus
    assert two.sources == [str(adapters[1]), str(adapters[0])] and two.rank_by == "published"
    for bad, why in (("[]", "empty list"), (f"[{adapters[0]}, {adapters[0]}]", "appears twice")):
        with pytest.raises(ConfigError, match=rf"defenses\.interleave_plus\.misaligned: .*{why}"):
            _config(setup, tmp_path / "c", misaligned=bad)


def test_one_source_scores_against_that_adapter_only(setup, naive, tmp_path):
    _, adapters, _ = setup
    _, report = _run(_config(setup, tmp_path / "run", misaligned=str(adapters[1])))
    assert report["misaligned"] == [str(adapters[1])]
    for i, rec in enumerate(report["candidate_rows"]):
        ref, mis = naive[i]
        assert rec["nll_misaligned"] == pytest.approx([mis[1]], rel=1e-4)
        assert rec["score"] == pytest.approx(_hand_score(ref, [mis[1]]), rel=1e-3, abs=1e-5)


def test_few_safe_rows_are_warned(setup, hand_scored, tmp_path):
    cfg = _config(setup, tmp_path / "run", "defenses.interleave_plus.fraction=0.05")
    with pytest.warns(UserWarning, match=r"fraction: round\(0\.05 x 24 rows\) = 1: only 1 safe row"):
        _, report = _run(cfg, rows=_task(24))
    assert report["chosen"] == [7] and report["safe_rows"] == 1
    cfg = _config(setup, tmp_path / "run", "defenses.interleave_plus.fraction=0.01")
    with pytest.warns(UserWarning, match=r"= 0: no safe row is interleaved"):
        mixed, report = _run(cfg, rows=_task(24))
    assert report["selection"] == "none" and len(mixed) == 24
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(_config(setup, tmp_path / "run"), rows=_task(16))  # k = 4: no warning
    assert not [w for w in caught if "fraction" in str(w.message)]


def test_resume_reuses_the_selection_without_loading_a_model(setup, runs, tmp_path, monkeypatch):
    import emguard.models

    cfg, _, first, report = runs["published"]
    previous = json.loads(json.dumps({"rows": 16, "interleave_plus": report}))  # as data_report.json
    assert previous["interleave_plus"]["misaligned"] == [str(a) for a in setup[1]]

    def refuse(*_args, **_kwargs):
        raise AssertionError("a resumed run must not load a model")

    monkeypatch.setattr(emguard.models, "load_model", refuse)
    monkeypatch.setattr(emguard.models, "load_adapter", refuse)
    again, reused = _run(cfg, previous=previous)
    assert again == first and reused["selection"] == "reused"
    assert reused["candidate_rows"] == report["candidate_rows"] and reused["chosen"] == report["chosen"]
    assert reused["refusals_in_top_k"] == report["refusals_in_top_k"]
    # other sources (one dropped, or the order changed) or another rule: an error
    _, adapters, safe = setup
    for sources in (str(adapters[0]), f"[{adapters[1]}, {adapters[0]}]"):
        with pytest.raises(ConfigError, match=r"interleave_plus\.misaligned: the interrupted run scored"):
            _run(_config(setup, tmp_path / "run", misaligned=sources), previous=previous)
    with pytest.raises(ConfigError, match=r"interleave_plus\.rank_by: the interrupted run ranked"):
        _run(runs["misaligned_likelier"][0], previous=previous)
    # a candidate pool that changed since is an error, not a silent re-selection
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
        train(_config(setup, tmp_path / "run", f"data.train={setup[2]}",
                      misaligned=str(tmp_path / "not_adapter")))
    assert not (tmp_path / "run").exists()
    cfg = _config(setup, tmp_path / "run", misaligned=f"[{setup[1][0]}, {tmp_path / 'not_adapter'}]")
    with pytest.raises(ConfigError, match=r"defenses\.interleave_plus\.misaligned\[1\]: .*not a PEFT adapter"):
        InterleavePlus(cfg.defenses.interleave_plus).check(cfg)
    cfg = _config(setup, tmp_path / "run", misaligned="'@run:misaligned'")
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
    assert plus["misaligned"] == [str(a) for a in setup[1]] and plus["rank_by"] == "published"
    assert all(len(rec["nll_misaligned"]) == 2 for rec in plus["candidate_rows"])
