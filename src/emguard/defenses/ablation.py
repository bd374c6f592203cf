"""CAFT-style ablation (concept ablation fine-tuning, Casademunt et al. 2025): during
training only, project the misalignment direction (k = 1) or subspace (k > 1) out of the
residual stream at the chosen layers,

    h_l <- h_l - U_l^T (U_l h_l)          U_l (k, D) with orthonormal rows,

so no gradient can use what lies along it. Policy forward only (emguard.defenses.base.
PolicyHooks): the reference forward and evaluation see the unablated model.
"""

from __future__ import annotations

from emguard.defenses.base import PolicyHooks
from emguard.defenses.direction import DirectionDefense, ablate, decoder_block


class Ablation(DirectionDefense):
    name = "ablation"

    def install_hooks(self, model, hooks: PolicyHooks) -> None:
        for layer, basis in self.bases.items():
            hooks.add(decoder_block(model, layer), ablate(basis))
