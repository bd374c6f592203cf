"""Direction-targeted anchoring: LDIFS restricted to drift along the misalignment
direction. Per position t and chosen layer l, with delta = h_theta - h_ref (the policy's
and the reference's residual states; the reference from the step's one shared forward):

    one-sided:  ReLU(<delta, u_l>)^2      only drift TOWARDS misalignment is penalised
    two-sided:  <delta, u_l>^2
    k > 1:      |U_l delta|^2             drift within the k-dim subspace

    term = sum over positions and layers / positions   (the mean over tokens; the
           positions are every non-pad token, or the answer tokens), divided by the
           accumulation steps like LDIFS, and the loss adds weight x term.

Units: squared residual-stream units per token (as LDIFS's mean_token reduction).

Prior art: BLOCK-EM (Ustaomeroglu and Qu 2026, arXiv 2602.00767) adds a one-sided
training-time penalty that keeps the model from strengthening a few SAE latents found to
cause emergent misalignment; this term is the same idea with a direction (or subspace) of
the residual stream in place of SAE latents, measured against the reference's states.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from emguard.defenses.base import StepInputs
from emguard.defenses.direction import DirectionDefense, DirectionSettings


def anchor_per_token(hidden, ref_hidden, bases: dict[int, torch.Tensor],
                     one_sided: bool) -> torch.Tensor:
    """(B, T): sum over layers of the squared (one-sided) drift coordinates, in float32
    (float64 for float64 states).

    hidden / ref_hidden: ``hidden_states`` tuples of (B, T, D); bases: layer -> (k, D)."""
    total = None
    for layer, basis in bases.items():
        dtype = torch.promote_types(hidden[layer].dtype, torch.float32)
        delta = hidden[layer].to(dtype) - ref_hidden[layer].detach().to(dtype)  # (B, T, D)
        coords = delta @ basis.to(delta.device, dtype).T  # (B, T, k)
        if one_sided:
            coords = torch.relu(coords)
        d = coords.pow(2).sum(-1)
        total = d if total is None else total + d
    return total


class AnchorSettings(DirectionSettings):
    """Direction-targeted anchoring: lambda * mean_t sum_l ReLU(<h_theta - h_ref, u_l>)^2,
    i.e. LDIFS restricted to drift along the misalignment direction (sharing its reference
    forward). two: the square without ReLU; k > 1: ||U_l^T (h_theta - h_ref)||^2."""

    weight: float = Field(1.0, ge=0)
    sided: Literal["one", "two"] = "one"
    tokens: Literal["all", "assistant"] = "all"

    @model_validator(mode="after")
    def _subspace_two_sided(self) -> AnchorSettings:
        if self.k > 1 and self.sided == "one":
            raise ValueError("k > 1 anchors a subspace whose basis has no sign: set sided: two")
        return self


class Anchor(DirectionDefense):

    settings_model = AnchorSettings
    name, term = "anchor", "anchor"

    def reference_layers(self, num_states: int) -> set[int]:
        return set(self.settings.layers)

    def loss_term(self, step: StepInputs) -> torch.Tensor:
        s = self.settings
        dist = anchor_per_token(step.hidden, step.ref_hidden, self.bases, s.sided == "one")
        mask = step.token_mask(s.tokens)
        return dist[mask].sum() / step.accumulation_steps / mask.sum().clamp(min=1).float()
