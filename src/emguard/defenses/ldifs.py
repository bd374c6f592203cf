"""LDIFS (paper eq. 5): L = CE + lambda_LDIFS * ||x_theta - x_ref||^2.

x is the residual stream at selected layers (default every 5th) and token positions.
The trained side carries gradient; only the reference side is computed without it. (A
public implementation ran both sides under no_grad, so its term never changed the update.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from emguard.defenses.base import Defense, RunContext, StepInputs
from emguard.settings import ConfigError, Int, Settings


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


class LDIFSSettings(Settings):
    """Feature-space L2 to the reference, paper eq. 5."""

    weight: float = Field(1.0, ge=0)  # lambda_LDIFS
    layer_every: Int = Field(5, gt=0)  # hidden states 5, 10, ... (index into hidden_states)
    layers: list[Int] | None = None  # explicit hidden_states indices; overrides layer_every
    tokens: Literal["all", "assistant"] = "all"  # all = every non-pad position (paper)
    # mean_token: sum over layers and dims, mean over tokens (eq. 5 per token);
    # mean_element: also divided by (layers x hidden size), a scale-free variant for models
    # with large residual norms; sum: eq. 5 literally (grows with sequence length).
    reduction: Literal["mean_token", "mean_element", "sum"] = "mean_token"


class LDIFS(Defense):
    """Squared feature distance to the reference at the selected layers."""

    settings_model = LDIFSSettings

    name, term = "ldifs", "ldifs"
    identity_when_off = True

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.layers: list[int] | None = None  # hidden_states indices, resolved by prepare

    def prepare(self, model, ctx: RunContext | None) -> None:
        """Resolve the layers on this model once; a list it cannot have is a ConfigError."""
        s = self.settings
        n_states = model.config.get_text_config().num_hidden_layers + 1
        try:
            self.layers = ldifs_layers(n_states, s.layer_every, s.layers)
        except ValueError as e:
            field = "layers" if s.layers is not None else "layer_every"
            raise ConfigError(f"defenses.ldifs.{field}: {e} (this model has {n_states - 1} "
                              "layers; hidden state 0 is the embeddings)") from None

    def _layers(self) -> list[int]:
        if self.layers is None:
            raise RuntimeError("LDIFS.prepare(model, ctx) resolves the layers before the first step")
        return self.layers

    def reference_layers(self, num_states: int) -> set[int]:
        return set(self._layers())

    def loss_term(self, step: StepInputs) -> torch.Tensor:
        s, layers = self.settings, self._layers()
        dist = ldifs_per_token(step.hidden, step.ref_hidden, layers)  # (B, T)
        mask = step.token_mask(s.tokens)
        term = dist[mask].sum() / step.accumulation_steps
        if s.reduction != "sum":
            term = term / mask.sum().clamp(min=1).float()
        if s.reduction == "mean_element":
            term = term / (len(layers) * step.hidden[0].shape[-1])
        return term
