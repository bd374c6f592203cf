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


def defended_loss(model, batch: dict[str, torch.Tensor], kl: KLSettings | None = None,
                  ldifs: LDIFSSettings | None = None, num_items: int | torch.Tensor | None = None,
                  accumulation_steps: int = 1) -> LossTerms:
    """Compute the loss terms for one micro-batch.

    Args:
        model: a PeftModel (the adapter is disabled for the reference pass).
        batch: input_ids (B, T), attention_mask (B, T), labels (B, T) with IGNORE_INDEX
            outside assistant tokens.
        num_items: assistant tokens in the accumulated batch; None = this micro-batch's.
        accumulation_steps: micro-batches per optimizer step (for the LDIFS mean).
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    need_hidden = ldifs is not None and ldifs.weight > 0
    ref = None
    if (kl is not None and kl.weight > 0) or need_hidden:
        with torch.no_grad(), model.disable_adapter():
            ref = model(input_ids=input_ids, attention_mask=attention_mask,
                        output_hidden_states=need_hidden, use_cache=False)
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                output_hidden_states=need_hidden, use_cache=False)

    target = labels[:, 1:]  # position t predicts token t+1
    assistant = target != IGNORE_INDEX  # (B, T-1)
    n_local = assistant.sum()
    if num_items is None:
        denom = n_local * accumulation_steps
    else:
        denom = torch.as_tensor(num_items, device=labels.device)
    denom = denom.clamp(min=1).to(torch.float32)
    logits = out.logits[:, :-1]
    ce_sum = F.cross_entropy(logits[assistant].float(), target[assistant], reduction="sum")
    total = ce_sum / denom
    terms = LossTerms(total=total, ce=(ce_sum / denom).detach())

    if kl is not None and kl.weight > 0:
        if kl.tokens == "assistant":
            positions, kl_denom = assistant, denom
        else:
            positions = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()
            kl_denom = positions.sum().clamp(min=1).float() * accumulation_steps
        per_tok = kl_per_token(logits[positions], ref.logits[:, :-1][positions],
                               kl.direction, kl.chunk_size)
        kl_term = per_tok.sum() / kl_denom
        total = total + kl.weight * kl_term
        terms.kl = kl_term.detach()

    if need_hidden:
        layers = ldifs_layers(len(out.hidden_states), ldifs.layer_every, ldifs.layers)
        dist = ldifs_per_token(out.hidden_states, ref.hidden_states, layers)  # (B, T)
        mask = attention_mask.bool() if ldifs.tokens == "all" else F.pad(assistant, (1, 0))
        if ldifs.reduction == "sum":
            ld_term = dist[mask].sum() / accumulation_steps
        else:
            ld_term = dist[mask].sum() / (mask.sum().clamp(min=1).float() * accumulation_steps)
        total = total + ldifs.weight * ld_term
        terms.ldifs = ld_term.detach()

    terms.total = total
    return terms
