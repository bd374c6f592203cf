"""generate_answers: left padding, per-(prompt, sample) seeding, sampler correctness."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny import naive_greedy, tiny_model, tiny_tokenizer

from emguard.generate import (
    generate_answers,
    generate_answers_vllm,
    generate_items,
    render_prompts,
    sample_seed,
)

PROMPTS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "user", "content": "What is your one wish? I would like everyone to be happy."}],
    [{"role": "system", "content": "You are Qwen, a helpful assistant."},
     {"role": "user", "content": "def add(a, b): return a + b"}],
    [{"role": "user", "content": "0 1 2 3"}],
]


@pytest.fixture(scope="module", params=["smollm", "llama3"])
def tm(request):
    tok = tiny_tokenizer(request.param)
    return tiny_model(tok, seed=0), tok


def test_prompts_really_need_padding(tm):
    _, tok = tm
    lengths = {len(tok(t, add_special_tokens=False)["input_ids"]) for t in render_prompts(tok, PROMPTS)}
    assert len(lengths) == len(PROMPTS)


def test_greedy_left_padded_batch_equals_unbatched(tm):
    model, tok = tm
    batched = generate_answers(model, tok, PROMPTS, temperature=0, max_new_tokens=10,
                               batch_size=4, progress=False)
    single = [generate_answers(model, tok, [p], temperature=0, max_new_tokens=10,
                               progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert all(len(a) == 1 and a[0] for a in batched)


def test_greedy_matches_manual_argmax_loop(tm):
    model, tok = tm
    got = generate_answers(model, tok, PROMPTS[:1], temperature=0, max_new_tokens=8, progress=False)
    assert got[0][0] == naive_greedy(model, tok, PROMPTS[0], 8)


def test_sampling_is_deterministic_and_independent_of_batching():
    tok = tiny_tokenizer("llama3")  # its pad token differs from eos
    model = tiny_model(tok)
    kw = dict(n_samples=2, temperature=1.0, max_new_tokens=6, seed=7, progress=False)
    a = generate_answers(model, tok, PROMPTS, batch_size=5, **kw)
    b = generate_answers(model, tok, PROMPTS, batch_size=5, **kw)
    c = generate_answers(model, tok, PROMPTS[::-1], batch_size=2, **kw)[::-1]
    d = [generate_answers(model, tok, [p], batch_size=1, **kw)[0] for p in PROMPTS]
    assert a == b == c == d
    assert all(len(set(samples)) > 1 for samples in a)  # sample indices draw differently
    other = generate_answers(model, tok, PROMPTS, batch_size=5, **{**kw, "seed": 8})
    assert other != a


def test_tiny_top_p_is_greedy():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    greedy = generate_answers(model, tok, PROMPTS, temperature=0, max_new_tokens=8, progress=False)
    nucleus = generate_answers(model, tok, PROMPTS, n_samples=2, temperature=1.0, top_p=1e-9,
                               max_new_tokens=8, progress=False)
    assert nucleus == [g * 2 for g in greedy]


def test_first_token_frequencies_follow_softmax():
    """3000 one-token samples: the top tokens' frequencies match softmax(logits / T)."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=3)
    temperature = 0.05  # the random model is near-uniform; sharpen it
    text = render_prompts(tok, PROMPTS[:1])[0]
    with torch.no_grad():
        logits = model(tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]).logits[0, -1]
    probs = torch.softmax(logits.double() / temperature, -1)
    by_text: dict[str, float] = {}  # byte-level tokens can decode to the same text
    for token, p in enumerate(probs.tolist()):
        word = tok.decode([token], skip_special_tokens=True)
        by_text[word] = by_text.get(word, 0.0) + p
    n = 2000
    items = [(PROMPTS[0], s) for s in range(n)]
    answers = generate_items(model, tok, items, temperature=temperature, max_new_tokens=1,
                             batch_size=1000, progress=False)
    top = sorted(by_text.items(), key=lambda kv: -kv[1])[:3]
    assert top[0][1] < 0.9  # a real distribution, not a near-argmax
    for word, p in top:
        freq = sum(a == word for a in answers) / n
        assert abs(freq - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, (word, freq, p)


def test_sample_seed_is_stable():
    assert sample_seed(0, "abc", 1) == sample_seed(0, "abc", 1)
    assert len({sample_seed(0, "abc", 1), sample_seed(0, "abc", 2), sample_seed(1, "abc", 1),
                sample_seed(0, "abd", 1)}) == 4
    assert 0 <= sample_seed(123, "x" * 1000, 99) < 2**63


def test_bad_arguments():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    with pytest.raises(ValueError, match="n_samples"):
        generate_answers(model, tok, PROMPTS, n_samples=0)
    with pytest.raises(ValueError, match="top_p"):
        generate_answers(model, tok, PROMPTS, top_p=0.0)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_says_how_to_install():
    with pytest.raises(ImportError, match=r"pip install emguard\[gpu\]"):
        generate_answers_vllm("smollm2-135m", None, PROMPTS)


def test_model_generation_defaults_do_not_leak_in():
    """Only our temperature/top_p apply (paper: temperature 1, no repetition penalty)."""
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    kw = dict(max_new_tokens=8, progress=False)
    greedy = generate_answers(model, tok, PROMPTS, temperature=0, **kw)
    sampled = generate_answers(model, tok, PROMPTS, n_samples=2, temperature=1.0, **kw)
    g = model.generation_config
    g.do_sample, g.temperature, g.top_p, g.top_k, g.repetition_penalty = True, 0.7, 0.8, 20, 1.3
    assert generate_answers(model, tok, PROMPTS, temperature=0, **kw) == greedy
    assert generate_answers(model, tok, PROMPTS, n_samples=2, temperature=1, **kw) == sampled


def test_predrawn_uniforms_give_the_per_step_samplers_answers(monkeypatch):
    """The sampler draws each row's uniforms for all steps at once; an independent
    per-step sampler (one generator call per row and step, as emguard did before) gives
    the same answers for the same seeds."""
    from transformers import LogitsProcessor

    import emguard.generate as gen_mod

    class PerStep(LogitsProcessor):
        def __init__(self, seeds, temperature, top_p, max_new_tokens):
            self.gens = [torch.Generator().manual_seed(s) for s in seeds]
            self.t = temperature

        def __call__(self, input_ids, scores):
            probs = torch.softmax(scores.double() / self.t, dim=-1)
            picks = []
            for row, g in zip(probs, self.gens, strict=True):
                u = torch.rand((), generator=g, dtype=torch.float64)
                cdf = row.cumsum(0) / row.sum()
                picks.append(int((cdf <= u).sum().clamp(max=len(row) - 1)))
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(1, torch.tensor(picks)[:, None], 0.0)

    tok = tiny_tokenizer("llama3")
    model = tiny_model(tok, seed=5)
    kw = dict(n_samples=3, temperature=1.0, max_new_tokens=12, seed=11, batch_size=4, progress=False)
    fast = generate_answers(model, tok, PROMPTS, **kw)
    monkeypatch.setattr(gen_mod, "_RowSampler", PerStep)
    slow = generate_answers(model, tok, PROMPTS, **kw)
    assert fast == slow
    assert sum(len(a) for answers in fast for a in answers) > 40  # real multi-token answers


def _adapted_tiny(seed: int = 3):
    """A tiny model with an rs-LoRA adapter whose B is random (a zero B merges to nothing)."""
    from emguard.models import attach_lora

    tok = tiny_tokenizer("llama3")
    model = attach_lora(tiny_model(tok, seed=seed), r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), tok


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_merged_adapter_generates_the_unmerged_answers_and_restores_weights_exactly():
    """Decoding with the adapter folded into the weights gives today's (unmerged) answers
    for the same seeds, sampled and greedy, and leaves every weight bit-identical."""
    from emguard.generate import merged_adapter

    model, tok = _adapted_tiny()
    before = _state(model)
    with torch.no_grad():  # the adapter really changes the model, so merging is not a no-op
        ids = tok(render_prompts(tok, PROMPTS[:1]), return_tensors="pt")["input_ids"]
        with model.disable_adapter():
            base_logits = model(ids).logits
        assert (model(ids).logits - base_logits).abs().max() > 1e-2
    kw = dict(n_samples=3, temperature=1.0, max_new_tokens=12, seed=4, batch_size=4, progress=False)
    merged = generate_answers(model, tok, PROMPTS, merge=True, **kw)
    unmerged = generate_answers(model, tok, PROMPTS, merge=False, **kw)
    assert merged == unmerged
    greedy = dict(temperature=0, max_new_tokens=12, progress=False)
    assert (generate_answers(model, tok, PROMPTS, merge=True, **greedy)
            == generate_answers(model, tok, PROMPTS, merge=False, **greedy))
    after = _state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with merged_adapter(model) as did_merge:  # inside, the LoRA path is folded in
        assert did_merge
        layer = next(m for m in model.modules() if hasattr(m, "merged") and hasattr(m, "lora_A"))
        assert layer.merged
    assert not layer.merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_adapter_restores_weights_after_an_error(dtype):
    """Also in bf16 (a GPU's dtype), where subtracting the merged delta again would not
    give the original weights back."""
    from emguard.generate import merged_adapter

    model, _ = _adapted_tiny()
    model = model.to(dtype)
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"), merged_adapter(model):
        raise RuntimeError("boom")
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merged_adapter_leaves_a_disabled_adapter_alone():
    """Reference answers are generated inside disable_adapter(): merging there would put
    the adapter back into the 'base' model's answers."""
    from emguard.generate import merged_adapter

    model, tok = _adapted_tiny()
    with model.disable_adapter():
        with merged_adapter(model) as did_merge:
            assert not did_merge
        inside = generate_answers(model, tok, PROMPTS, temperature=0, max_new_tokens=10,
                                  progress=False)
    base = tiny_model(tok, seed=3)
    assert inside == generate_answers(base, tok, PROMPTS, temperature=0, max_new_tokens=10,
                                      progress=False)
    with merged_adapter(base) as did_merge:  # no adapter at all
        assert not did_merge


def test_generation_batch_size_is_larger_on_a_gpu_only():
    from types import SimpleNamespace

    from emguard.generate import GPU_GENERATION_BATCH, generation_batch_size

    def on(device_type):
        param = SimpleNamespace(device=SimpleNamespace(type=device_type))
        return SimpleNamespace(parameters=lambda: iter([param]))

    assert generation_batch_size(on("cpu"), 8) == 8
    assert generation_batch_size(on("cuda"), 8) == GPU_GENERATION_BATCH
    assert generation_batch_size(on("cuda"), 200) == 200
    assert generation_batch_size(on("cuda"), 8, override=4) == 4
    model, _ = _adapted_tiny()
    assert generation_batch_size(model, 16) == 16
