"""What every settings model shares, and the error a config problem raises.

A settings model is strict data: an unknown or ill-typed field is an error that names the
field, values are frozen once validated, and ``inf``/``nan`` are refused. emguard.config
builds the run config from the models of the training recipe; each defense keeps its own
settings model beside its code (emguard.defenses.*), and emguard.defenses.registry collects
them into ``defenses:``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict
from pydantic import Strict as _StrictValue


class ConfigError(ValueError):
    """A config file or override that does not validate; the message lists every problem."""


class Settings(BaseModel):
    """Base of every settings model: unknown fields are errors, values frozen."""

    # allow_inf_nan=False: `inf` / `.nan` are errors, not a learning rate or weight
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              allow_inf_nan=False)


# Whole numbers are strict: `true` is not 1 and 2.5 is not 2 (floats stay lax, so YAML's
# `1e-4`, which PyYAML reads as a string, is still a number).
Int = Annotated[int, _StrictValue()]
