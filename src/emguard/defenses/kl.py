"""KL to the reference model (paper eq. 4): L = CE + lambda_KL * KL.

The reference is the same network with the LoRA adapter disabled. The full-vocabulary
log-softmax over N tokens x V is the memory peak, so it runs in chunks of positions and
each chunk is recomputed in the backward pass (activation checkpointing): only the
logits themselves are kept, never N x V log-probabilities for both models at once.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_kl(policy: torch.Tensor, ref: torch.Tensor, forward: bool) -> torch.Tensor:
    logp = F.log_softmax(policy.float(), dim=-1)
    logq = F.log_softmax(ref.float(), dim=-1)
    if forward:  # KL(p_theta || p_ref)
        return (logp.exp() * (logp - logq)).sum(-1)
    return (logq.exp() * (logq - logp)).sum(-1)  # KL(p_ref || p_theta)


def kl_per_token(policy_logits: torch.Tensor, ref_logits: torch.Tensor,
                 direction: Literal["forward", "reverse"] = "forward",
                 chunk_size: int = 1024) -> torch.Tensor:
    """Per-position KL between two next-token distributions.

    Args:
        policy_logits: (N, V) logits of the trained model (may require grad).
        ref_logits: (N, V) logits of the reference model (no grad).
        direction: "forward" = KL(p_theta || p_ref) (default), "reverse" = KL(p_ref || p_theta).
        chunk_size: positions per log-softmax chunk.
    Returns:
        (N,) KL in nats, float32.
    """
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(policy_logits.shape)} vs {tuple(ref_logits.shape)}")
    forward = direction == "forward"
    ref_logits = ref_logits.detach()
    out = []
    for s in range(0, policy_logits.shape[0], chunk_size):
        p, q = policy_logits[s:s + chunk_size], ref_logits[s:s + chunk_size]
        if p.requires_grad:
            out.append(checkpoint(_chunk_kl, p, q, forward, use_reentrant=False))
        else:
            out.append(_chunk_kl(p, q, forward))
    if not out:
        return policy_logits.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)
