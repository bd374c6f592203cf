"""Every defense emguard knows, by its key under ``defenses.`` in a run config.

The dict's order is the order the phases run in: row transforms apply in this order
(inoculation edits the task rows before safe rows are interleaved), loss terms are added
in this order (CE + KL + LDIFS + anchor), post-training steps run in this order. A new defense is a
``emguard.defenses.base.Defense`` subclass, a settings model in ``emguard.config``
(a field of ``DefenseSettings``) and one line here.
"""

from __future__ import annotations

from emguard.defenses.ablation import Ablation
from emguard.defenses.anchor import Anchor
from emguard.defenses.base import Defense
from emguard.defenses.early_stop import EarlyStop
from emguard.defenses.inoculation import Inoculation
from emguard.defenses.interleave import Interleave
from emguard.defenses.interleave_plus import InterleavePlus
from emguard.defenses.kl import KL
from emguard.defenses.ldifs import LDIFS
from emguard.defenses.safelora import SafeLoRA
from emguard.defenses.steering import Steering

DEFENSES: dict[str, type[Defense]] = {
    "inoculation": Inoculation,  # first: it edits the task rows only, before any mixing
    "kl": KL,  # the paper's four, in the order run summaries have always listed them
    "ldifs": LDIFS,
    "interleave": Interleave,
    "safelora": SafeLoRA,
    "interleave_plus": InterleavePlus,
    "steering": Steering,
    "ablation": Ablation,
    "anchor": Anchor,
    "early_stop": EarlyStop,
}


def active_defenses(settings) -> list[Defense]:
    """The configured defenses (a ``DefenseSettings``), as components in registry order."""
    if settings is None:
        return []
    missing = set(type(settings).model_fields) - set(DEFENSES)
    if missing:
        raise RuntimeError(f"defenses {sorted(missing)} are configurable but not registered")
    return [cls(getattr(settings, name)) for name, cls in DEFENSES.items()
            if getattr(settings, name) is not None]


def defense_names(settings) -> list[str]:
    """Names of the configured defenses, in registry order (the run summary lists them)."""
    return [d.name for d in active_defenses(settings)]
