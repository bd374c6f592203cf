"""The transformers APIs that changed name inside the supported range, in one place.

Each difference is detected by feature, not by version number, so a release between the
two ends CI tests behaves like the nearer one:

- KV cache: the forward keyword and the output field ``past_key_values`` (transformers
  <= 5.22) are called ``cache`` from 5.24 (the old name is a deprecated alias there).
- ``TrainingArguments``: ``gradient_checkpointing`` became ``activation_checkpointing``
  in 5.24 (the old name is a deprecated alias there).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any


def _base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (``model`` itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_keyword(model: Any) -> str:
    """The forward keyword that takes a KV cache: ``cache`` (5.24+) or ``past_key_values``."""
    params = inspect.signature(type(_base_model(model)).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (``output.cache`` or ``output.past_key_values``)."""
    cache = getattr(output, "cache", None)  # 5.24+: a field; older outputs have no such attribute
    return cache if cache is not None else getattr(output, "past_key_values", None)


@functools.cache
def training_argument_fields() -> frozenset[str]:
    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments))


def checkpointing_argument(enabled: bool) -> dict[str, bool]:
    """``{activation_checkpointing: enabled}`` (5.24+) or ``{gradient_checkpointing: enabled}``."""
    name = ("activation_checkpointing" if "activation_checkpointing" in training_argument_fields()
            else "gradient_checkpointing")
    return {name: enabled}
