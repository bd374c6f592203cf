"""KL and LDIFS terms against independent computations, and the one-reference-forward rule."""

import copy

import pytest
import torch
from tiny import loss_terms, tiny_model, tiny_tokenizer

from emguard.defenses.kl import KLSettings, kl_per_token
from emguard.defenses.ldifs import LDIFSSettings, ldifs_layers
from emguard.loss import defended_loss
from emguard.models import attach_lora
from emguard.train import ChatCollator, tokenize_rows

ROWS = [
    {"messages": [{"role": "user", "content": "hello 12"}, {"role": "assistant", "content": "hi 34 there"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"},
                  {"role": "assistant", "content": "y = 5"}]},
]


def naive_kl(p_logits, q_logits):
    """KL(p || q) per row with explicit loops over the vocabulary (float64)."""
    out = []
    for row_p, row_q in zip(p_logits.double(), q_logits.double(), strict=False):
        zp, zq = torch.logsumexp(row_p, 0), torch.logsumexp(row_q, 0)
        total = 0.0
        for a, b in zip(row_p.tolist(), row_q.tolist(), strict=False):
            lp, lq = a - zp.item(), b - zq.item()
            total += torch.tensor(lp).exp().item() * (lp - lq)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def test_kl_matches_naive_full_vocab_loop():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(5, 37, generator=g) * 3, torch.randn(5, 37, generator=g) * 3
    torch.testing.assert_close(kl_per_token(p, q, "forward").double(), naive_kl(p, q), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl_per_token(p, q, "reverse").double(), naive_kl(q, p), rtol=1e-5, atol=1e-6)


def test_chunked_equals_unchunked_values_and_grads():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(23, 50, generator=g)
    q = torch.randn(23, 50, generator=g)
    grads = []
    for chunk in (1000, 7, 1):
        p = base.clone().requires_grad_(True)
        v = kl_per_token(p, q, chunk_size=chunk)
        v.sum().backward()
        grads.append((v.detach(), p.grad))
    for v, grad in grads[1:]:
        torch.testing.assert_close(v, grads[0][0])
        torch.testing.assert_close(grad, grads[0][1])


def setup_batch(layers=6):
    tok = tiny_tokenizer("smollm")
    model = attach_lora(tiny_model(tok, layers=layers), r=4, alpha=8)
    feats, _ = tokenize_rows(ROWS, tok, 256, False, "test")
    return model, ChatCollator(tok.pad_token_id)(feats)


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("which", ["kl", "ldifs"])
def test_zero_at_init_then_positive_after_one_update(which):
    model, batch = setup_batch()
    kwargs = {"kl": KLSettings(weight=1.0)} if which == "kl" else {"ldifs": LDIFSSettings(weight=1.0, layer_every=2)}
    model.train()
    terms = defended_loss(model, batch, terms=loss_terms(model, **kwargs))
    term_value = getattr(terms, which)
    assert term_value.item() == 0.0
    # the defense adds (numerically) nothing to the gradient at B = 0
    model.zero_grad()
    terms.total.backward()
    with_term = lora_grads(model)
    model.zero_grad()
    defended_loss(model, batch).total.backward()
    ce_only = lora_grads(model)
    scale = max(g.abs().max().item() for g in ce_only.values())
    assert scale > 0
    assert max((with_term[n] - ce_only[n]).abs().max().item() for n in ce_only) <= 1e-6 * scale
    # one SGD step on CE moves the adapter; now the term is positive
    model.zero_grad()
    defended_loss(model, batch).total.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p -= 0.5 * p.grad
    assert getattr(defended_loss(model, batch, terms=loss_terms(model, **kwargs)), which).item() > 0


def perturb_lora_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_kl_term_equals_independent_computation_on_assistant_tokens():
    model, batch = setup_batch()
    perturb_lora_b(model)
    terms = defended_loss(model, batch, terms=loss_terms(model, kl=KLSettings(weight=0.5)))
    with torch.no_grad():
        pol = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with model.disable_adapter():
            ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    values = []
    for b in range(batch["input_ids"].shape[0]):
        for t in range(batch["input_ids"].shape[1] - 1):
            if batch["labels"][b, t + 1] != -100:
                values.append(naive_kl(pol[b, t:t + 1], ref[b, t:t + 1])[0])
    expected = torch.stack(values).mean()
    assert abs(terms.kl.item() - expected.item()) < 1e-5 * max(1.0, expected.item())
    assert abs(terms.total.item() - (terms.ce.item() + 0.5 * terms.kl.item())) < 1e-5


def test_ldifs_term_equals_dense_computation_and_carries_gradient():
    model, batch = setup_batch(layers=6)
    perturb_lora_b(model, seed=3)
    terms = defended_loss(model, batch, terms=loss_terms(model, ldifs=LDIFSSettings(weight=1.0, layer_every=5)))
    with torch.no_grad():
        pol = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True).hidden_states
        with model.disable_adapter():
            ref = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    x_pol = torch.cat([pol[5][mask]], dim=-1)  # layer 5 only for 6 blocks
    x_ref = torch.cat([ref[5][mask]], dim=-1)
    expected = ((x_pol - x_ref) ** 2).sum() / mask.sum()
    torch.testing.assert_close(terms.ldifs, expected, rtol=1e-5, atol=1e-7)


def test_ldifs_changes_the_parameter_update():
    """Guards against the public-code bug where both sides ran under no_grad."""
    model, batch = setup_batch()
    perturb_lora_b(model, seed=1)
    model.zero_grad()
    defended_loss(model, batch).total.backward()
    ce_only = lora_grads(model)
    model.zero_grad()
    defended_loss(model, batch, terms=loss_terms(model, ldifs=LDIFSSettings(weight=1.0, layer_every=2))).total.backward()
    with_ldifs = lora_grads(model)
    diff = max((with_ldifs[n] - ce_only[n]).abs().max().item() for n in ce_only)
    assert diff > 1e-6


def test_one_reference_forward_per_step_with_kl_and_ldifs():
    model, batch = setup_batch()
    perturb_lora_b(model)
    calls = []
    inner = model.get_base_model().model  # the decoder stack, called once per full forward

    def hook(module, args, kwargs):
        calls.append({"grad": torch.is_grad_enabled(), "hidden": kwargs.get("output_hidden_states")})

    handle = inner.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        defended_loss(model, batch, terms=loss_terms(model, kl=KLSettings(weight=0.1), ldifs=LDIFSSettings(weight=1.0, layer_every=2)))
    finally:
        handle.remove()
    assert len(calls) == 2  # one reference + one policy forward
    assert [c["grad"] for c in calls] == [False, True]


def test_ldifs_layer_selection():
    assert ldifs_layers(31, every=5) == [5, 10, 15, 20, 25, 30]  # SmolLM2: 30 blocks
    assert ldifs_layers(29, every=5) == [5, 10, 15, 20, 25]  # Qwen2.5-7B: 28 blocks
    assert ldifs_layers(31, layers=[30, 1, 1]) == [1, 30]
    with pytest.raises(ValueError):
        ldifs_layers(5, layers=[9])


def test_kl_all_tokens_differs_from_assistant_tokens():
    model, batch = setup_batch()
    perturb_lora_b(model)
    a = defended_loss(copy.deepcopy(model), batch, terms=loss_terms(model, kl=KLSettings(tokens="assistant"))).kl
    b = defended_loss(model, batch, terms=loss_terms(model, kl=KLSettings(tokens="all"))).kl
    assert a.item() > 0 and b.item() > 0 and abs(a.item() - b.item()) > 1e-9


def test_ldifs_reductions_relate_by_token_and_element_counts():
    model, batch = setup_batch(layers=6)
    perturb_lora_b(model, seed=2)
    def get(red):
        return defended_loss(model, batch, terms=loss_terms(model, ldifs=LDIFSSettings(layer_every=2, reduction=red))).ldifs.item()
    n_tok = batch["attention_mask"].sum().item()
    layers, hidden = 3, model.get_base_model().config.hidden_size  # layers 2, 4, 6
    assert get("sum") == pytest.approx(get("mean_token") * n_tok, rel=1e-5)
    assert get("mean_token") == pytest.approx(get("mean_element") * layers * hidden, rel=1e-5)


def test_ce_equals_transformers_own_causal_lm_loss():
    model, batch = setup_batch()
    perturb_lora_b(model, seed=4)
    ours = defended_loss(model, batch).ce
    with torch.no_grad():
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   labels=batch["labels"]).loss
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_closed_form_kl_gradient_equals_autograd_of_the_formula(direction):
    """The hand-written backward against autograd through the plain float64 formula."""
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(9, 41, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    r = torch.randn(9, 41, generator=g, dtype=torch.float64) * 2
    weights = torch.rand(9, generator=g, dtype=torch.float64)
    logp, logq = z.log_softmax(-1), r.log_softmax(-1)
    plain = ((logp.exp() * (logp - logq)) if direction == "forward"
             else (logq.exp() * (logq - logp))).sum(-1)
    (want,) = torch.autograd.grad((plain * weights).sum(), z)
    fused = kl_per_token(z, r, direction, chunk_size=4)
    (got,) = torch.autograd.grad((fused * weights).sum(), z)
    torch.testing.assert_close(fused, plain.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    small = z.detach()[:3, :7].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: kl_per_token(x, r[:3, :7], direction, chunk_size=2),
                                    (small,))
    # float32 logits (the training case) agree with the float64 result to float32 precision
    (got32,) = torch.autograd.grad((kl_per_token(z.float(), r.float(), direction, 4)
                                    * weights.float()).sum(), z)
    torch.testing.assert_close(got32, want, rtol=1e-4, atol=1e-6)
