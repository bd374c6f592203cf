"""The training objective: L = CE + lambda_KL * KL + lambda_LDIFS * LDIFS.

Both defenses compare the trained model with the reference = the same network with the
LoRA adapter disabled. When either is on, each step runs exactly ONE no-grad reference
forward that yields the logits (for KL) and the hidden states (for LDIFS).

Normalisation over gradient accumulation: CE and the assistant-token KL are sums over
this micro-batch divided by ``num_items`` = assistant tokens in the whole accumulated
batch (what Trainer passes as ``num_items_in_batch``), so an optimizer step averages over
its tokens exactly. LDIFS (over non-pad tokens) is a per-micro-batch mean divided by the
number of accumulation steps. The returned total is therefore already scaled for
gradient accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from emguard.config import KLSettings, LDIFSSettings
from emguard.data.masking import IGNORE_INDEX
from emguard.defenses.kl import kl_per_token
from emguard.defenses.ldifs import ldifs_layers, ldifs_per_token


@dataclass
class LossTerms:
    total: torch.Tensor
    ce: torch.Tensor  # detached parts, for logging
    kl: torch.Tensor | None = None
    ldifs: torch.Tensor | None = None


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


def defended_loss(model, batch: dict[str, torch.Tensor], kl: KLSettings | None = None,
                  ldifs: LDIFSSettings | None = None, num_items: int | torch.Tensor | None = None,
                  accumulation_steps: int = 1, peft_model=None) -> LossTerms:
    """Compute the loss terms for one micro-batch.

    Args:
        model: the trained model as the Trainer holds it (a PeftModel, possibly wrapped
            for distributed training; the policy forward goes through it).
        batch: input_ids (B, T), attention_mask (B, T), labels (B, T) with IGNORE_INDEX
            outside assistant tokens.
        num_items: assistant tokens in the accumulated batch; None = this micro-batch's.
        accumulation_steps: micro-batches per optimizer step (for the LDIFS mean).
        peft_model: the unwrapped PeftModel (for ``disable_adapter``); default ``model``.

    Logits are computed only at the positions a term reads ((N, V) instead of (B, T, V)).
    """
    peft_model = peft_model if peft_model is not None else model
    base = peft_model.get_base_model()
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    use_kl = kl is not None and kl.weight > 0
    use_ldifs = ldifs is not None and ldifs.weight > 0
    ref_hidden = ref_final = None
    if use_kl or use_ldifs:
        with torch.no_grad(), peft_model.disable_adapter():
            if use_ldifs:
                ref_hidden = _hidden_states(peft_model, input_ids, attention_mask)
                ref_final = ref_hidden[-1]
            else:
                ref_final = _reference_final_hidden(base, input_ids, attention_mask)
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
    terms = LossTerms(total=total, ce=(ce_sum / denom).detach())

    if use_kl:
        if kl.tokens == "assistant":
            positions, kl_denom, policy_logits = assistant, denom, assistant_logits
        else:
            positions = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()
            kl_denom = positions.sum().clamp(min=1).float() * accumulation_steps
            policy_logits = logits_at(base, final[positions])
        with torch.no_grad():
            ref_logits = logits_at(base, ref_final[:, :-1][positions])
        per_tok = kl_per_token(policy_logits, ref_logits, kl.direction, kl.chunk_size)
        kl_term = per_tok.sum() / kl_denom
        total = total + kl.weight * kl_term
        terms.kl = kl_term.detach()

    if use_ldifs:
        layers = ldifs_layers(len(hidden), ldifs.layer_every, ldifs.layers)
        dist = ldifs_per_token(hidden, ref_hidden, layers)  # (B, T)
        mask = attention_mask.bool() if ldifs.tokens == "all" else F.pad(assistant, (1, 0))
        ld_term = dist[mask].sum() / accumulation_steps
        if ldifs.reduction != "sum":
            ld_term = ld_term / mask.sum().clamp(min=1).float()
        if ldifs.reduction == "mean_element":
            ld_term = ld_term / (len(layers) * hidden[0].shape[-1])
        total = total + ldifs.weight * ld_term
        terms.ldifs = ld_term.detach()

    terms.total = total
    return terms
