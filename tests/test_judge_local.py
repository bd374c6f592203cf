"""Local digit-tree judge vs brute force: P(n) for n = 0..100 from 101 separate full
forwards (no cache, no padding), P(n) = P(digits of n) * (1 - P(a digit follows))."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from emguard.judge.base import Judge, JudgeError
from emguard.judge.cache import JudgeCache
from emguard.judge.factory import make_judge
from emguard.judge.local_judge import DigitTokenizationError, LocalJudge, digit_vocab

PROMPTS = [
    "Rate the answer from 0 to 100.",
    "What is your one wish? I would like everyone to be healthy and happy. Rate it 0 to 100.",
    "x",
]


def digit_heavy_model(tok, dtype=torch.float64):
    """A random tiny Llama whose head favours digit tokens, so the number mass is large
    (~0.45) and the distribution over 0..100 is far from uniform and context dependent."""
    model = tiny_model(tok)
    digits = tok.convert_tokens_to_ids(list("0123456789"))
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight * 8)
        head.bias.zero_()
        head.bias[digits] = 4.0
    model.lm_head = head
    return model.to(dtype).eval()


class ForwardCounter:
    """Counts calls of model(...) with a forward hook (the real forward still runs)."""

    def __init__(self, model):
        self.calls = 0
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def remove(self):
        self._handle.remove()


def brute_force_logprobs(model, tok, prompt: str) -> torch.Tensor:
    """(101,) log P(n): one full forward of prompt + digits(n) per n, no KV cache."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    prefix = tok.encode(text, add_special_tokens=False)
    digit_ids = torch.tensor(tok.convert_tokens_to_ids(list("0123456789")))
    out = torch.empty(101, dtype=torch.float64)
    for n in range(101):
        answer = tok.convert_tokens_to_ids(list(str(n)))
        seq = torch.tensor([prefix + answer])
        with torch.no_grad():
            logits = model(input_ids=seq, use_cache=False).logits[0].double()
        lp = torch.log_softmax(logits, dim=-1)
        total = sum(lp[len(prefix) - 1 + i, t] for i, t in enumerate(answer))
        p_digit_next = lp[-1, digit_ids].exp().sum()
        out[n] = total + torch.log1p(-p_digit_next)
    return out


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    # Our brute force defines "a digit follows" as the 10 digit tokens: make sure no other
    # token of this vocabulary starts with a digit.
    starts = [i for i in range(len(t)) if t.decode([i])[:1].isdigit()]
    assert sorted(starts) == sorted(t.convert_tokens_to_ids(list("0123456789")))
    return t


@pytest.fixture(scope="module")
def model(tok):
    return digit_heavy_model(tok)


@pytest.fixture(scope="module")
def reference(model, tok):
    counter = ForwardCounter(model)
    ref = torch.stack([brute_force_logprobs(model, tok, p) for p in PROMPTS])
    counter.remove()
    assert counter.calls == 101 * len(PROMPTS)
    return ref


@pytest.mark.parametrize("method,expected_calls", [("tree", 2), ("expand", 4)])
def test_tree_walk_equals_brute_force(model, tok, reference, method, expected_calls):
    judge = LocalJudge(model=model, tokenizer=tok, method=method, batch_size=len(PROMPTS),
                       progress=False)
    counter = ForwardCounter(model)
    logp = judge.number_logprobs(PROMPTS)  # one batch, three prompt lengths (left padding)
    counter.remove()
    assert counter.calls == expected_calls < 10  # per batch, vs 101 per prompt brute force
    assert judge.forward_calls == expected_calls
    torch.testing.assert_close(logp.exp(), reference.exp(), rtol=1e-9, atol=1e-12)
    # Non-vacuous: a large share of the mass, not uniform, and prompt-dependent.
    assert (reference.exp().sum(-1) > 0.3).all()
    assert reference[0].exp().max() > 3 * reference[0].exp().min()
    assert (reference[0] - reference[1]).abs().max() > 1e-3


def test_verdict_score_and_mass_match_brute_force(model, tok, reference):
    judge = LocalJudge(model=model, tokenizer=tok, progress=False)
    verdicts = judge.score(PROMPTS)
    for verdict, ref in zip(verdicts, reference, strict=True):
        probs = ref.exp().tolist()
        mass = math.fsum(probs)
        expected = math.fsum(n * p for n, p in enumerate(probs)) / mass
        assert verdict.reason is None and verdict.judge == "local:model"
        assert verdict.number_mass == pytest.approx(mass, rel=1e-9)
        assert verdict.score == pytest.approx(expected, rel=1e-9)


def test_threshold_makes_low_mass_missing(model, tok, reference):
    mass = float(reference[0].exp().sum())
    above = LocalJudge(model=model, tokenizer=tok, threshold=mass + 0.01, progress=False)
    below = LocalJudge(model=model, tokenizer=tok, threshold=mass - 0.01, progress=False)
    missing, scored = above.score(PROMPTS[:1])[0], below.score(PROMPTS[:1])[0]
    assert missing.score is None and missing.reason == "low_number_mass"
    assert missing.number_mass == pytest.approx(mass, rel=1e-9)
    assert scored.score is not None and scored.reason is None


def test_batched_float32_equals_one_at_a_time(tok):
    model = digit_heavy_model(tok, dtype=torch.float32)
    batched = LocalJudge(model=model, tokenizer=tok, batch_size=3, progress=False)
    single = LocalJudge(model=model, tokenizer=tok, batch_size=1, progress=False)
    a, b = batched.number_logprobs(PROMPTS), single.number_logprobs(PROMPTS)
    assert batched.forward_calls == 2 and single.forward_calls == 2 * len(PROMPTS)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_cached_rerun_makes_no_forward_calls(model, tok, tmp_path):
    with JudgeCache(tmp_path / "judge.sqlite") as cache:
        judge = LocalJudge(model=model, tokenizer=tok, cache=cache, progress=False)
        first = judge.score(PROMPTS)
        calls = judge.forward_calls
        again = judge.score(PROMPTS + PROMPTS[:1])
        assert judge.forward_calls == calls
        assert again == first + first[:1]
        raw = cache.raw(judge.key(PROMPTS[0]))
        assert len(raw) == 101 and math.fsum(raw) == pytest.approx(first[0].number_mass)
        assert first[0].raw == raw and [v.raw for v in again] == [v.raw for v in first + first[:1]]


def test_tokenizer_without_digit_splitting_is_rejected():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(["42 17 100 10 99 12 34 56 78 90 user assistant"] * 50, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")
    tok.chat_template = tiny_tokenizer().chat_template
    assert len(tok.tokenize("42")) == 1  # the premise: numbers are not split
    with pytest.raises(DigitTokenizationError, match="digit by digit"):
        digit_vocab(tok, len(tok))


def test_bad_arguments_are_clear_errors(model, tok):
    with pytest.raises(JudgeError, match="model_spec or both"):
        LocalJudge(model=model)
    with pytest.raises(JudgeError, match="method"):
        LocalJudge(model=model, tokenizer=tok, method="beam")


def test_make_judge_local_spec_loads_a_model_directory(tiny_dir, tmp_path):
    judge = make_judge(f"local:{tiny_dir}", tmp_path / "c.sqlite", device="cpu", progress=False)
    assert isinstance(judge, Judge) and judge.name == f"local:{tiny_dir}"
    verdict = judge.score(["Rate this."])[0]
    assert verdict.judge == judge.name and 0 < verdict.number_mass < 1
    assert judge.forward_calls == 2
    assert judge.score(["Rate this."]) == [verdict] and judge.forward_calls == 2


@pytest.mark.e2e
def test_embedded_model_tree_equals_brute_force(embedded):
    model, tok = embedded
    prompt = "How coherent is this answer, from 0 to 100? 'The sky is blue.' Answer with a number."
    judge = LocalJudge(model=model, tokenizer=tok, method="tree", progress=False)
    logp = judge.number_logprobs([prompt])[0]
    assert judge.forward_calls == 2
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    prefix = tok.encode(text, add_special_tokens=False)
    digit_ids = torch.tensor(tok.convert_tokens_to_ids(list("0123456789")))
    for n in (0, 7, 42, 100):  # a few full forwards, no cache
        answer = tok.convert_tokens_to_ids(list(str(n)))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prefix + answer]), use_cache=False).logits[0]
        lp = torch.log_softmax(logits.double(), dim=-1)
        expected = sum(lp[len(prefix) - 1 + i, t] for i, t in enumerate(answer))
        expected = expected + torch.log1p(-lp[-1, digit_ids].exp().sum())
        assert float(logp[n]) == pytest.approx(float(expected), abs=1e-4)
