"""Ablation during training only: project the span of the basis' first k rows out of
the residual stream at the chosen layers,

    h_l <- h_l - U_l^T (U_l h_l)          U_l (k, D) with orthonormal rows,

so no gradient can use what lies along it. Policy forward only (emguard.defenses.base.
PolicyHooks): the reference forward and evaluation see the unablated model.

What is ablated depends on the direction's source (emguard.defenses.direction):

- ``direction: fit`` or a contrastive folder: ablation of the contrastive mean difference
  (k = 1; k > 1 adds principal directions of the pair differences), the persona-vectors
  variant (Chen et al. 2025);
- a folder of ``emguard direction fit --from-run RUN``: CAFT (Casademunt et al. 2025,
  arXiv 2507.16795), the top k principal components of (fine-tuned - base) residual
  differences of a model already fine-tuned on the task. CAFT ablates the components a
  person interpreted as unwanted; here the first k are taken, without interpretation.
"""

from __future__ import annotations

from emguard.defenses.base import PolicyHooks
from emguard.defenses.direction import DirectionDefense, DirectionSettings, ablate, decoder_block


class AblationSettings(DirectionSettings):
    """Ablation during training only: the span of U_l's first k rows is projected out of
    the residual stream at the layers. With ``direction: fit`` or a contrastive folder this
    is ablation of the contrastive mean difference (the persona-vectors variant, Chen et
    al. 2025); with a folder of ``emguard direction fit --from-run`` it is CAFT
    (Casademunt et al. 2025): the top k principal components of (fine-tuned - base)."""


class Ablation(DirectionDefense):

    settings_model = AblationSettings
    name = "ablation"

    def install_hooks(self, model, hooks: PolicyHooks) -> None:
        for layer, basis in self.bases.items():
            hooks.add(decoder_block(model, layer), ablate(basis))
