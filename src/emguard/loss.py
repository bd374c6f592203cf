"""The training objective: L = CE + sum over active defense terms of weight x term
(KL, LDIFS, direction-targeted anchoring; emguard.defenses.registry).

The terms compare the trained model with the reference = the same network with the
LoRA adapter disabled (and the defenses' policy hooks paused). Whatever set of terms is
on, each step runs at most ONE no-grad reference forward, shaped by what they read: the
final-normed state (KL's logits) or every hidden state (LDIFS, anchoring).

Normalisation over gradient accumulation: CE and the assistant-token KL are sums over
this micro-batch divided by ``num_items`` = assistant tokens in the whole accumulated
batch (what Trainer passes as ``num_items_in_batch``), so an optimizer step averages over
its tokens exactly. LDIFS (over non-pad tokens) is a per-micro-batch mean divided by the
number of accumulation steps. The returned total is therefore already scaled for
gradient accumulation.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from emguard.data.masking import IGNORE_INDEX
from emguard.defenses.base import Defense, PolicyHooks, StepInputs


@dataclass
class LossTerms:
    total: torch.Tensor
    ce: torch.Tensor  # detached parts, for logging
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # term name -> detached value

    @property
    def kl(self) -> torch.Tensor | None:
        return self.parts.get("kl")

    @property
    def ldifs(self) -> torch.Tensor | None:
        return self.parts.get("ldifs")


def _hidden_states(model, input_ids, attention_mask) -> tuple[torch.Tensor, ...]:
    """All residual-stream states; the last one is the final-normed state the LM head reads.

    ``logits_to_keep=1`` stops the model from materialising (B, T, V) logits: we apply the
    head only at the positions the loss reads.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                use_cache=False, logits_to_keep=1)
    return out.hidden_states


def _reference_final_hidden(base_model, input_ids, attention_mask) -> torch.Tensor:
    """(B, T, D) final-normed hidden states of the reference, without keeping every layer's.

    Calls the decoder stack directly (no grad, adapter already disabled by the caller), so
    a KL-only step holds one (B, T, D) tensor of the reference instead of L + 1 of them.
    """
    decoder = base_model.get_decoder()
    if decoder is base_model:  # exotic layout: fall back to the full model
        return _hidden_states(base_model, input_ids, attention_mask)[-1]
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def logits_at(base_model, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits (N, V) for final hidden states (N, D), with the output scaling some
    architectures apply in their forward (Gemma-2 soft-capping, Cohere / Granite scales).

    The head runs in its weight's dtype, as inside the model's forward: under CUDA mixed
    precision accelerate hands back float32 hidden states from a bf16 model, and a bf16
    head cannot multiply them. Logits come out in that dtype (callers upcast per chunk).
    """
    head = base_model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is not None and weight.is_floating_point():
        hidden = hidden.to(weight.dtype)
    logits = head(hidden)
    cfg = base_model.config
    if getattr(cfg, "logit_scale", None):
        logits = logits * cfg.logit_scale
    if getattr(cfg, "logits_scaling", None):
        logits = logits / cfg.logits_scaling
    if getattr(cfg, "final_logit_softcapping", None):
        cap = cfg.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def reference_forward(peft_model, input_ids, attention_mask, terms: list[Defense],
                      hooks: PolicyHooks | None = None):
    """The step's one no-grad reference forward (adapter disabled, policy hooks paused),
    shaped by what the active terms read: every hidden state when some term reads layers,
    else the final-normed state alone, else nothing. Returns (all states | None, final | None)."""
    needs = [t.reference_layers(_num_states(peft_model)) for t in terms]
    needs = [n for n in needs if n is not None]
    if not needs:
        return None, None
    with torch.no_grad(), peft_model.disable_adapter(), hooks.paused() if hooks else nullcontext():
        if any(needs):
            states = _hidden_states(peft_model, input_ids, attention_mask)
            return states, states[-1]
        return None, _reference_final_hidden(peft_model.get_base_model(), input_ids, attention_mask)


def _num_states(model) -> int:
    return model.config.get_text_config().num_hidden_layers + 1


def defended_loss(model, batch: dict[str, torch.Tensor], terms: list[Defense] = (),
                  num_items: int | torch.Tensor | None = None, accumulation_steps: int = 1,
                  peft_model=None, hooks: PolicyHooks | None = None) -> LossTerms:
    """Compute the loss terms for one micro-batch: CE + sum of weight x term.

    Args:
        model: the trained model as the Trainer holds it (a PeftModel, possibly wrapped
            for distributed training; the policy forward goes through it).
        batch: input_ids (B, T), attention_mask (B, T), labels (B, T) with IGNORE_INDEX
            outside assistant tokens.
        num_items: assistant tokens in the accumulated batch; None = this micro-batch's.
        accumulation_steps: micro-batches per optimizer step (for per-micro-batch means).
        peft_model: the unwrapped PeftModel (for ``disable_adapter``); default ``model``.
        terms: defenses (emguard.defenses.registry), prepared; those with a term and a
            positive weight add ``weight x term``.
        hooks: the defenses' policy hooks, paused for the reference forward.

    Logits are computed only at the positions a term reads ((N, V) instead of (B, T, V)).
    """
    peft_model = peft_model if peft_model is not None else model
    base = peft_model.get_base_model()
    terms = [t for t in terms if t.term is not None and t.weight > 0]
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    ref_hidden, ref_final = reference_forward(peft_model, input_ids, attention_mask, terms, hooks)
    hidden = _hidden_states(model, input_ids, attention_mask)

    target = labels[:, 1:]  # position t predicts token t+1
    assistant = target != IGNORE_INDEX  # (B, T-1)
    if num_items is None:
        denom = assistant.sum() * accumulation_steps
    else:
        denom = torch.as_tensor(num_items, device=labels.device)
    denom = denom.clamp(min=1).to(torch.float32)
    final = hidden[-1][:, :-1]  # (B, T-1, D)
    assistant_logits = logits_at(base, final[assistant])  # (N, V), shared by CE and KL
    ce_sum = F.cross_entropy(assistant_logits.float(), target[assistant], reduction="sum")
    total = ce_sum / denom
    out = LossTerms(total=total, ce=(ce_sum / denom).detach())
    step = StepInputs(hidden=hidden, ref_hidden=ref_hidden, ref_final=ref_final,
                      attention_mask=attention_mask, assistant=assistant, denom=denom,
                      accumulation_steps=accumulation_steps, assistant_logits=assistant_logits,
                      head=lambda h: logits_at(base, h))
    for t in terms:
        value = t.loss_term(step)
        total = total + t.weight * value
        out.parts[t.term] = value.detach()
    out.total = total
    return out
