"""KL to the reference model (paper eq. 4): L = CE + lambda_KL * KL.

The reference is the same network with the LoRA adapter disabled. The full-vocabulary
log-softmax over N tokens x V is the memory peak, so it runs in chunks of positions and
each chunk is recomputed in the backward pass, whose gradient is written in closed form:
only the logits themselves are kept, never N x V log-probabilities for both models.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from emguard.defenses.base import Defense, StepInputs
from emguard.settings import Int, Settings


def _math_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half-precision and float32 logits, float64 stays float64."""
    return torch.promote_types(logits.dtype, torch.float32)


def _log_probs(policy: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = _math_dtype(policy)
    return F.log_softmax(policy.to(dtype), dim=-1), F.log_softmax(ref.to(dtype), dim=-1)


class _ChunkedKL(torch.autograd.Function):
    """Per-position KL over the vocabulary in chunks, with a hand-written backward.

    Only the inputs are kept (the logits exist anyway); the backward recomputes each
    chunk's log-probabilities once and writes the gradient in closed form:
      forward  KL(p||q) = sum_v p (log p - log q)  ->  dKL/dz = p (log p - log q - KL)
      reverse  KL(q||p) = sum_v q (log q - log p)  ->  dKL/dz = p - q
    (z = policy logits, p = softmax(z), q = the reference's distribution). That is two
    log-softmaxes per chunk in each direction, where autograd through a checkpointed
    chunk recomputes the forward graph and then runs its backward op by op.
    """

    @staticmethod
    def forward(ctx, policy: torch.Tensor, ref: torch.Tensor, forward: bool, chunk: int):
        out = torch.empty(policy.shape[0], dtype=_math_dtype(policy), device=policy.device)
        for s in range(0, policy.shape[0], chunk):
            logp, logq = _log_probs(policy[s:s + chunk], ref[s:s + chunk])
            if forward:
                out[s:s + chunk] = (logp.exp() * (logp - logq)).sum(-1)
            else:
                out[s:s + chunk] = (logq.exp() * (logq - logp)).sum(-1)
        ctx.save_for_backward(policy, ref, out)
        ctx.forward, ctx.chunk = forward, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        policy, ref, kl = ctx.saved_tensors
        grad = torch.empty_like(policy)
        for s in range(0, policy.shape[0], ctx.chunk):
            logp, logq = _log_probs(policy[s:s + ctx.chunk], ref[s:s + ctx.chunk])
            p = logp.exp()
            if ctx.forward:
                g = p * (logp - logq - kl[s:s + ctx.chunk, None])
            else:
                g = p - logq.exp()
            grad[s:s + ctx.chunk] = g * grad_out[s:s + ctx.chunk, None]
        return grad, None, None, None


def kl_per_token(policy_logits: torch.Tensor, ref_logits: torch.Tensor,
                 direction: Literal["forward", "reverse"] = "forward",
                 chunk_size: int = 1024) -> torch.Tensor:
    """Per-position KL between two next-token distributions.

    Args:
        policy_logits: (N, V) logits of the trained model (may require grad).
        ref_logits: (N, V) logits of the reference model (no grad).
        direction: "forward" = KL(p_theta || p_ref) (default), "reverse" = KL(p_ref || p_theta).
        chunk_size: positions per log-softmax chunk (the float32 working set is a few
            chunk x V tensors).
    Returns:
        (N,) KL in nats, float32 (float64 for float64 logits).
    """
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(policy_logits.shape)} vs {tuple(ref_logits.shape)}")
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedKL.apply(policy_logits, ref_logits.detach(), direction == "forward", chunk_size)


class KLSettings(Settings):
    """KL to the reference (= same network, adapter disabled), paper eq. 4."""

    weight: float = Field(0.1, ge=0)  # lambda_KL
    direction: Literal["forward", "reverse"] = "forward"  # forward: KL(p_theta || p_ref)
    tokens: Literal["assistant", "all"] = "assistant"
    chunk_size: Int = Field(256, gt=0)  # positions per log-softmax chunk (256 x V floats each)


class KL(Defense):
    """KL to the reference over the assistant tokens (or every non-pad position)."""

    settings_model = KLSettings

    name, term = "kl", "kl"
    identity_when_off = True

    def reference_layers(self, num_states: int) -> set[int]:
        return set()  # the final-normed state alone

    def loss_term(self, step: StepInputs) -> torch.Tensor:
        s = self.settings
        final, ref_final = step.hidden[-1][:, :-1], step.ref_final[:, :-1]
        if s.tokens == "assistant":
            positions, denom, policy_logits = step.assistant, step.denom, step.assistant_logits
        else:
            positions = (step.attention_mask[:, :-1] * step.attention_mask[:, 1:]).bool()
            denom = positions.sum().clamp(min=1).float() * step.accumulation_steps
            policy_logits = step.head(final[positions])
        with torch.no_grad():
            ref_logits = step.head(ref_final[positions])
        return kl_per_token(policy_logits, ref_logits, s.direction, s.chunk_size).sum() / denom
