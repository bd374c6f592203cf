"""Every defense emguard knows, by its key under ``defenses.`` in a run config.

A defense is one module: a ``Defense`` subclass (emguard.defenses.base) with its settings
model beside it (``settings_model``), and one ``register`` line (below, or in your own code
for a defense outside the package). What the subclass declares is read from it here, by
the training recipe, by ``--force`` and by emguard.identity; nothing else lists defenses:

  settings_model     the ``defenses.NAME`` block of a run config (``DefenseSettings`` is
                     built from the registered models)
  term (+ weight)    the loss term, logged in train_log.jsonl and as ``last_TERM`` in
                     summary.json; a defense with a term must have a ``weight`` setting
  artifacts          what it writes into a run folder (``--force`` removes it)
  identity_when_off  whether its ``null`` block stays in a run's identity (paper four only)

The registry's order is the order the phases run in: row transforms apply in this order
(inoculation edits the task rows before safe rows are interleaved), loss terms are added
in this order (CE + KL + LDIFS + anchor), post-training steps run in this order.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import create_model

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
from emguard.ownership import RUN, FolderKind
from emguard.settings import Settings

DEFENSES: dict[str, type[Defense]] = {}
BUILTIN: tuple[str, ...] = ()
DefenseSettings: type[Settings]  # set by register(): the run config's ``defenses:`` model
_listeners: list[Callable[[type[Settings]], None]] = []  # told of each new DefenseSettings


def defense_settings_model() -> type[Settings]:
    """The ``defenses:`` block: one optional field per registered defense, in registry
    order, all off (None) by default; any subset composes."""
    fields = {name: (cls.settings_model | None, None) for name, cls in DEFENSES.items()}
    return create_model("DefenseSettings", __base__=Settings, __module__=__name__,
                        __doc__="Which defenses are on, with their settings (None: off).",
                        **fields)


def register(cls: type[Defense]) -> type[Defense]:
    """Add a defense (after the ones already registered, so its phases run last) and
    rebuild ``DefenseSettings`` so run configs accept ``defenses.NAME``. Raises
    RuntimeError for a defense a run could not use as declared. Returns ``cls``."""
    _add(cls)
    _rebuild()
    return cls


def unregister(name: str) -> None:
    """Remove a defense registered with ``register`` (tests; built-ins stay)."""
    if name in BUILTIN:
        raise RuntimeError(f"{name!r} is a built-in defense")
    DEFENSES.pop(name, None)
    _rebuild()


def _add(cls: type[Defense]) -> None:
    check_declaration(cls)
    if cls.name in DEFENSES and DEFENSES[cls.name] is not cls:
        raise RuntimeError(f"a defense named {cls.name!r} is already registered "
                           f"({DEFENSES[cls.name].__name__})")
    DEFENSES[cls.name] = cls


def _rebuild() -> None:
    """``DefenseSettings`` from the registry as it is now, handed to every listener."""
    global DefenseSettings
    DefenseSettings = defense_settings_model()
    for listener in _listeners:
        listener(DefenseSettings)


def on_new_settings(listener: Callable[[type[Settings]], None]) -> None:
    """Call ``listener(DefenseSettings)`` whenever a registration rebuilds it (emguard.config
    rebuilds RunConfig with it)."""
    _listeners.append(listener)


def check_declaration(cls: type[Defense]) -> None:
    """RuntimeError unless ``cls`` declares a name, a settings model, and a ``weight``
    setting for its loss term (a term without one would silently do nothing)."""
    name = getattr(cls, "name", None)
    model = getattr(cls, "settings_model", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise RuntimeError(f"defense {cls.__name__} needs a `name` that is an identifier")
    if model is None or not issubclass(model, Settings):
        raise RuntimeError(f"defense {name!r} needs a `settings_model` (an emguard.settings."
                           "Settings subclass)")
    if cls.term is not None and "weight" not in model.model_fields:
        raise RuntimeError(f"defense {name!r} adds the loss term {cls.term!r} but its settings "
                           "have no `weight` field")


def run_folder() -> FolderKind:
    """The run folder's kind: the recipe's files and every registered defense's artifacts,
    so ``--force`` removes all of them and nothing else."""
    extra = [a for cls in DEFENSES.values() for a in cls.artifacts if a not in RUN.artifacts]
    return FolderKind(RUN.name, RUN.artifacts + tuple(dict.fromkeys(extra)), RUN.whole)


def logged_terms() -> list[str]:
    """The loss terms of every registered defense, in registry order (summary.json keeps
    each one's last value as ``last_TERM``)."""
    return [cls.term for cls in DEFENSES.values() if cls.term is not None]


def active_defenses(settings) -> list[Defense]:
    """The configured defenses (a ``DefenseSettings``), as components in registry order."""
    if settings is None:
        return []
    return [cls(getattr(settings, name)) for name, cls in DEFENSES.items()
            if getattr(settings, name, None) is not None]


def defense_names(settings) -> list[str]:
    """Names of the configured defenses, in registry order (the run summary lists them)."""
    return [d.name for d in active_defenses(settings)]


for _builtin in (
    Inoculation,  # first: it edits the task rows only, before any mixing
    KL,  # the paper's four, in the order run summaries have always listed them
    LDIFS,
    Interleave,
    SafeLoRA,
    InterleavePlus,
    Steering,
    Ablation,
    Anchor,
    EarlyStop,
):
    _add(_builtin)
_rebuild()  # once, not once per built-in
BUILTIN = tuple(DEFENSES)  # names of the package's own defenses
