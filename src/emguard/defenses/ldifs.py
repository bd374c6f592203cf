"""LDIFS (paper eq. 5): L = CE + lambda_LDIFS * ||x_theta - x_ref||^2.

x is the residual stream at selected layers (default every 5th) and token positions.
The trained side carries gradient; only the reference side is computed without it. (A
public implementation ran both sides under no_grad, so its term never changed the update.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from emguard.defenses.base import Defense, StepInputs


def ldifs_layers(num_hidden_states: int, every: int = 5, layers: Sequence[int] | None = None) -> list[int]:
    """Indices into ``hidden_states`` (0 = embeddings, k = output of block k).

    Default: every ``every``-th block, i.e. 5, 10, ..., up to the last block.
    """
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < num_hidden_states]
        if bad:
            raise ValueError(f"LDIFS layers {bad} out of range 0..{num_hidden_states - 1}")
        return sorted(set(layers))
    chosen = list(range(every, num_hidden_states, every))
    if not chosen:
        raise ValueError(f"layer_every={every} selects no layer of {num_hidden_states - 1}")
    return chosen


def ldifs_per_token(policy_hidden: Sequence[torch.Tensor], ref_hidden: Sequence[torch.Tensor],
                    layers: Sequence[int]) -> torch.Tensor:
    """Squared L2 distance of the concatenated selected-layer features, per position.

    Args:
        policy_hidden / ref_hidden: ``hidden_states`` tuples, each entry (B, T, D).
        layers: indices into those tuples.
    Returns:
        (B, T) float32: sum over selected layers and hidden dims of (x_theta - x_ref)^2.
    """
    total = None
    for i in layers:
        d = (policy_hidden[i].float() - ref_hidden[i].detach().float()).pow(2).sum(-1)
        total = d if total is None else total + d
    return total


class LDIFS(Defense):
    """Squared feature distance to the reference at the selected layers."""

    name, term = "ldifs", "ldifs"

    def check_layers(self, num_states: int) -> list[int]:
        s = self.settings
        return ldifs_layers(num_states, s.layer_every, s.layers)

    def reference_layers(self, num_states: int) -> set[int]:
        return set(self.check_layers(num_states))

    def loss_term(self, step: StepInputs) -> torch.Tensor:
        s = self.settings
        layers = self.check_layers(len(step.hidden))
        dist = ldifs_per_token(step.hidden, step.ref_hidden, layers)  # (B, T)
        mask = step.token_mask(s.tokens)
        term = dist[mask].sum() / step.accumulation_steps
        if s.reduction != "sum":
            term = term / mask.sum().clamp(min=1).float()
        if s.reduction == "mean_element":
            term = term / (len(layers) * step.hidden[0].shape[-1])
        return term
