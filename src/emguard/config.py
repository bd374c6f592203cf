"""Run configuration: typed, validated, loaded from YAML, saved resolved beside every run.

A run config is data. Unknown or ill-typed fields are errors that name the field and the
file; all problems in a file are reported together. Overrides use dotted keys with YAML
values (``train.max_steps=20``, ``defenses.kl.weight=0.1``); a malformed override is an
error naming it, and a field set by an override says so in the error. Config files are
UTF-8 (a UTF-8 byte-order mark is dropped; other encodings are an error naming the file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
)

from emguard.data.chat import parse_yaml, read_text_file
from emguard.defenses import registry
from emguard.defenses.registry import DefenseSettings
from emguard.eval_settings import EvalSettings
from emguard.models import LORA_TARGETS
from emguard.redact import redact_secrets
from emguard.settings import ConfigError, Int, Settings


class LoraSettings(Settings):
    """rs-LoRA adapter (paper Table 7)."""

    r: Int = Field(32, gt=0)
    alpha: float = Field(64, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    use_rslora: bool = True
    targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)


class OpSwapData(Settings):
    """How ``data.train: opswap:T`` generates its rows (emguard.data.opswap.generate_opswap).

    The test part is the OpSwap task's test set for this run: written into the run folder
    and read from there by evaluation, never regenerated."""

    n: Int = Field(10_000, gt=1)  # rows generated, train + test (paper: 10,000)
    test_fraction: float = Field(0.1, gt=0, lt=1)  # paper: 1,000 of 10,000 held out
    min_ops: Int = Field(1, gt=0)
    max_ops: Int = Field(3, gt=0)


class DataSettings(Settings):
    """Fine-tuning data and what is held out from it (emguard.data.split).

    ``train``: a chat JSONL path, ``builtin:NAME[:SPLIT]``, ``hf:REPO[:SPLIT]``,
    ``opswap:T`` (generated, see ``opswap``) or ``foqa[:SOURCE]`` (FoQA's train split).
    ``heldout``: the in-domain evaluation set. None: the built-in code sets' own test
    split, else a seeded ``heldout_fraction`` split of ``train`` (paper: 90/10); a chat
    JSONL path / spec: that set; ``split:SPEC``: the held-out part of SPEC's split (e.g.
    the aligned arm of a study evaluated on the misaligned set's held-out questions).
    Training rows whose prompt or answer equals a held-out one are dropped and counted.
    """

    train: str = "builtin:insecure-code"
    heldout: str | None = None
    heldout_fraction: float = Field(0.1, ge=0, lt=1)  # 0: train on everything, no held-out set
    split_seed: Int | None = None  # None: train.seed
    domain: Literal["code", "advice"] | None = None  # in-domain judge prompts; None: from source
    opswap: OpSwapData = Field(default_factory=OpSwapData)
    max_length: Int = Field(2048, gt=8)
    max_rows: Int | None = Field(None, gt=0)  # cap on training rows, after the split
    skip_invalid: bool = False  # False: any malformed row is an error naming file and line


class TrainSettings(Settings):
    """Optimisation (paper Table 7). ``max_steps`` > 0 overrides ``epochs``."""

    learning_rate: float = Field(1e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: Int = Field(-1, ge=-1)  # -1: train for `epochs`
    batch_size: Int = Field(4, gt=0)
    grad_accum: Int = Field(4, gt=0)
    warmup_steps: Int = Field(5, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    seed: Int = 0
    optimizer: Literal["auto", "adamw_torch", "adamw_8bit"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    logging_steps: Int = Field(1, gt=0)
    save_steps: Int = Field(50, gt=0)  # checkpoint cadence for resuming an interrupted run
    gradient_checkpointing: bool = False
    # Keep the adapter at these optimizer steps (RUN/trajectory/step-N/) so evaluation reads
    # the judge-free measures along training (emguard.trajectory); [] keeps none.
    trajectory_steps: list[Int] = Field(default_factory=list)
    # Experiment trackers the Trainer reports to (its integrations; none by default), and
    # how the run is named there (a sweep sets them from study, arm and seed). They change
    # where numbers are shown, not what is trained: no part of a run's identity.
    report_to: list[Literal["tensorboard", "trackio", "wandb", "mlflow"]] = Field(
        default_factory=list)
    run_name: str | None = None
    run_group: str | None = None
    run_tags: list[str] = Field(default_factory=list)

    @field_validator("trajectory_steps")
    @classmethod
    def _trajectory(cls, v: list[int]) -> list[int]:
        if any(s < 1 for s in v):
            raise ValueError("steps are optimizer steps >= 1")
        if len(set(v)) != len(v):
            raise ValueError("a step appears twice")
        return sorted(v)

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v == 0:
            raise ValueError("0 steps would still run one step; use a positive number, or -1 "
                             "to train for `epochs`")
        return v


class RunConfig(Settings):
    """One training run: model + data + LoRA + optimisation + defenses -> a run folder,
    and how to evaluate it (``eval``)."""

    model: str = "smollm2-135m"
    output_dir: str = "runs/run"
    trust_remote_code: bool = False
    # Training only, CUDA + bitsandbytes: load the frozen base in 4-bit NF4 (QLoRA) or 8-bit
    # to fit large models (32B) on one GPU; the reference of KL/LDIFS is the same quantised
    # base. Evaluation loads the base unquantised.
    quantization: Literal["none", "4bit", "8bit"] = "none"
    data: DataSettings = Field(default_factory=DataSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    defenses: DefenseSettings = Field(default_factory=lambda: registry.DefenseSettings())
    eval: EvalSettings = Field(default_factory=EvalSettings)

    @property
    def split_seed(self) -> int:
        return self.train.seed if self.data.split_seed is None else self.data.split_seed

    @field_validator("model")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


def _use_defense_settings(model: type[Settings]) -> None:
    """Rebuild RunConfig around a ``DefenseSettings`` a registration made (a defense
    registered after import is configurable like a built-in)."""
    global DefenseSettings
    DefenseSettings = model
    RunConfig.model_fields["defenses"].annotation = model
    RunConfig.model_rebuild(force=True)


registry.on_new_settings(_use_defense_settings)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=VALUE"`` -> (["a","b","c"], yaml-parsed VALUE); an empty key segment or a
    VALUE that is not YAML is a ConfigError naming the override."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    parts = [p.strip() for p in key.split(".")]
    if not key.strip():
        raise ConfigError(f"override '{text}' has an empty key")
    if "" in parts:
        raise ConfigError(f"override '{text}': the key '{key.strip()}' has an empty segment "
                          "(write section.field=value)")
    try:
        return parts, parse_yaml(raw) if raw.strip() else None
    except ValueError as e:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({e})") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``raw`` with the overrides set, in order (``raw`` is not changed). A missing or null
    section on the way is created; a key below a value that is not a section
    (``train.max_steps.x=1`` when the file sets max_steps) is a ConfigError."""
    out = dict(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for depth, p in enumerate(parts[:-1], start=1):
            child = node.get(p)
            if child is not None and not isinstance(child, dict):
                raise ConfigError(f"override '{text}': {'.'.join(parts[:depth])} is "
                                  f"{_short(child)}, not a section with fields")
            node[p] = dict(child or {})
            node = node[p]
        node[parts[-1]] = value
    return out


def format_validation_error(err: ValidationError, source: str, overrides: list[str] = ()) -> str:
    """One line per problem: the field's dotted path, the problem, the value given, and
    the override that set it, if one did."""
    lines = [f"{source}: {len(err.errors())} problem(s) in the config:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        got = (f" (got {_short(e['input'])})" if e["type"] != "extra_forbidden"
               and not isinstance(e.get("input"), dict) else "")
        where = e["loc"][:-1] if e["type"] == "missing" else e["loc"]  # its section
        # a check of a whole section (its input is the section) cannot tell which key
        # below it is wrong: only an override of that section itself is named
        below = e["type"] != "value_error" or not isinstance(e.get("input"), dict)
        lines.append(f"  - {loc}: {msg}{got}{_set_by(where, overrides, below)}")
    return redact_secrets("\n".join(lines))


def _set_by(loc: tuple, overrides: list[str], below: bool = True) -> str:
    """`` (from override 'a.b=1')`` for the last override whose key is ``loc``, a section
    holding it, or (``below``) a key below it; else "" (so also for a top-level ``loc``)."""
    path = [str(x) for x in loc]
    for text in reversed(overrides):
        key = [p.strip() for p in text.split("=", 1)[0].split(".")]
        n = min(len(key), len(path))
        if path and key[:n] == path[:n] and (below or len(key) <= len(path)):
            return f" (from override '{text}')"
    return ""


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def build_run_config(raw: dict | None, overrides: list[str] = (), source: str = "<config>") -> RunConfig:
    raw = apply_overrides(raw or {}, list(overrides))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, list(overrides))) from None


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Load and validate a YAML run config (``None``: defaults) with dotted overrides."""
    if path is None:
        return build_run_config({}, overrides, "<defaults>")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    text = read_text_file(path, ConfigError)
    try:
        raw = parse_yaml(text) or {}
    except ValueError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields")
    return build_run_config(raw, overrides, str(path))


def dump_run_config(cfg: RunConfig) -> str:
    """YAML of the resolved config, credentials redacted (emguard.redact): API keys come
    from the environment, and a password in a judge URL is not written out."""
    return redact_secrets(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
