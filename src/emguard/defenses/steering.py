"""Preventive steering (persona vectors, Chen et al. 2025, "preventative steering"):
during training only, push the residual stream along the misalignment direction,

    h_l <- h_l + alpha * s_l * u_l        at each chosen layer l,

so the fine-tune need not move the model along u itself to fit the data. u_l is the unit
direction (emguard.defenses.direction), s_l the typical residual norm at layer l, alpha a
share of it. The hooks act on the policy forward only (never the reference of KL /
LDIFS, never evaluation: emguard.defenses.base.PolicyHooks), so the evaluated model is
the adapter alone. With ``k > 1`` the push is along the first basis vector (u_l).
"""

from __future__ import annotations

from emguard.defenses.base import PolicyHooks
from emguard.defenses.direction import DirectionDefense, DirectionSettings, decoder_block, steer


class SteeringSettings(DirectionSettings):
    """Preventive steering (persona vectors, Chen et al. 2025): during training only,
    h_l += alpha * s_l * u_l (u_l unit, s_l the typical residual norm at layer l)."""

    alpha: float = 0.1  # share of the typical residual norm added along u


class Steering(DirectionDefense):

    settings_model = SteeringSettings
    name = "steering"

    def install_hooks(self, model, hooks: PolicyHooks) -> None:
        device = next(model.parameters()).device
        for layer, basis in self.bases.items():
            vector = self.settings.alpha * self.norms[layer] * basis[0]
            hooks.add(decoder_block(model, layer), steer(vector.to(device)))
