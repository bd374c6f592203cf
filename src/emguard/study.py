"""A study: one YAML that expands into the paper's grid of runs (emguard.sweep runs it).

    name: table3
    output_dir: studies/table3
    model: Qwen/Qwen2.5-7B-Instruct
    seeds: [0, 1, 2]
    base:                          # run-config fields every run shares (emguard.config)
      data: {split_seed: 0}        #   fixed split seed: every seed evaluates the same questions
      train: {learning_rate: 1.0e-4, epochs: 1}
      eval: {judge: openai:gpt-4o-mini, general_samples: 100, indomain_max_questions: 30}
    domains:
      insecure:
        misaligned: /data/insecure.jsonl   # chat JSONL, builtin:, hf:, opswap:T, foqa[:SRC]
        aligned: /data/secure.jsonl        # the secure twin (the control arm)
        heldout: null                      # null: a seeded 90/10 split of `misaligned`
        domain: code                       # in-domain judge prompts
        set: {}                            # run-config keys for this domain only
    arms:
      - {name: untrained, data: none}
      - {name: aligned, data: aligned}
      - {name: misaligned}
      - {name: positive_control, data: positive_control}   # broadly misaligned chat
      - {name: negative_control, data: negative_control}   # benign chat
      - {name: kl, grid: {defenses.kl.weight: [0.01, 0.03, 0.1, 0.3, 1.0]}}
      - name: steering                     # + steering_on_aligned: the same on aligned data
        compensation: true
        set: {defenses.steering.layers: [15], defenses.steering.alpha: 0.1}
      - name: safelora                     # post hoc: projects the misaligned arm's adapter
        safelora_of: misaligned
        set: {defenses.safelora.unaligned: Qwen/Qwen2.5-7B}
        grid: {defenses.safelora.tau: [0.1, 0.2, 0.3, 0.4, 0.5]}

Every (seed, domain, arm, grid point) is a run: a run config validated like any other,
written to ``output_dir/runs/DOMAIN/ARM[_KEYVALUE...]/s{seed}-{hash8}``, where hash8
starts the SHA-256 of what it trains (emguard.identity.config_sha256; an untrained
baseline's hash differs from its trained twin's), so a changed setting is a new folder
and never overwrites a finished run. Every arm of a domain is
evaluated on the same held-out set: the aligned arm and the controls hold out
``split:MISALIGNED``. The controls validate the measure, not a defense:
``positive_control`` trains directly on broadly misaligned chat (``CONTROL_DATA``: the
fit pairs' misaligned answers, never the pairs evaluation scores), the ceiling of what
the measures read for a model that *is* broadly misaligned; ``negative_control`` trains
on benign chat and should read about zero.
An arm with ``compensation: true`` also runs, with the same settings, on the domain's
aligned data (arm ``ARM_on_aligned``): a defense that adds or removes something during
training (steering, ablation) can move the measure whether or not EMA exists, and the
report's difference-in-differences (ARM - misaligned) - (ARM_on_aligned - aligned) is
what it does to EMA itself.
A string value ``@run:ARM`` is replaced by the adapter folder of that arm's run of the
same domain and seed (e.g. a misaligned adapter as SafeLoRA's unaligned source); the
sweep orders runs so that every source is finished first.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from emguard.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    build_run_config,
    format_validation_error,
)
from emguard.data.chat import parse_yaml, read_text_file
from emguard.data.pairs import EVAL_PAIRS, FIT_PAIRS
from emguard.identity import config_sha256
from emguard.names import NAME, NAME_RULE, check_name, label
from emguard.ownership import DIRECTION, EVAL, RUN, SAFELORA
from emguard.settings import Int, Settings

RUN_REF = "@run:"
# what the control arms train on (data: positive_control | negative_control)
CONTROL_DATA = {"positive_control": "builtin:misaligned-chat",
                "negative_control": "builtin:safe-instruct"}


class DomainSpec(Settings):
    """One fine-tuning domain: its misaligned data, its aligned twin, its held-out set."""

    misaligned: str
    aligned: str | None = None
    heldout: str | None = None
    domain: Literal["code", "advice"] | None = None
    set: dict[str, Any] = Field(default_factory=dict)


class ArmSpec(Settings):
    """One arm: which data it trains on, run-config keys it sets, and a grid over keys."""

    name: str
    # none: the untrained model; *_control: the measure's controls (CONTROL_DATA)
    data: Literal["misaligned", "aligned", "none", "positive_control",
                  "negative_control"] = "misaligned"
    set: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    safelora_of: str | None = None  # project that arm's adapter post hoc instead of training
    domains: list[str] | None = None  # only these domains (default: all)
    # the compensation control: also train this arm, same settings, on the domain's aligned
    # data (arm ARM_on_aligned); the report's difference-in-differences reads both
    compensation: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "arm name")

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [k for k, values in v.items() if not values]
        if empty:
            raise ValueError(f"no values for {', '.join(empty)}")
        return v


class StudyConfig(Settings):
    """A study: model, seeds, shared run settings, domains and arms."""

    name: str
    output_dir: str
    model: str = "smollm2-135m"
    seeds: list[Int] = Field(default_factory=lambda: [0], min_length=1)
    base: dict[str, Any] = Field(default_factory=dict)
    domains: dict[str, DomainSpec] = Field(min_length=1)
    arms: list[ArmSpec] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "study name")  # it names runs-NAME.json and report-NAME/

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        names = [a.name for a in self.arms]
        for name in {n for n in names if names.count(n) > 1}:
            raise ValueError(f"arms: '{name}' appears twice (merge its grids into one arm)")
        bad = [d for d in self.domains if not isinstance(d, str) or not NAME.match(d)]
        if bad:
            raise ValueError(f"domains: names {bad} name folders: {NAME_RULE}")
        _check_compensation(self)
        for arm in self.arms:
            if arm.safelora_of is not None and arm.safelora_of not in names:
                raise ValueError(f"arms.{arm.name}.safelora_of: no arm named '{arm.safelora_of}'")
            if arm.data == "aligned":
                missing = [d for d, spec in self.domains.items()
                           if spec.aligned is None and (arm.domains is None or d in arm.domains)]
                if missing:
                    raise ValueError(f"arms.{arm.name}: trains on aligned data, which domain(s) "
                                     f"{missing} do not give (domains.NAME.aligned)")
            unknown = [d for d in arm.domains or [] if d not in self.domains]
            if unknown:
                raise ValueError(f"arms.{arm.name}.domains: unknown domain(s) {unknown}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: a seed appears twice")
        return self


COMPENSATION_SUFFIX = "_on_aligned"


def _check_compensation(study: StudyConfig) -> None:
    """A compensation control needs aligned data and both baselines the report compares
    it with: an arm ``misaligned`` and an arm ``aligned`` (``data: aligned``)."""
    names = {a.name: a for a in study.arms}
    for arm in (a for a in study.arms if a.compensation):
        where = f"arms.{arm.name}.compensation"
        if arm.data != "misaligned" or arm.safelora_of:
            raise ValueError(f"{where}: only an arm trained on the misaligned data has a "
                             "compensation control")
        if arm.name + COMPENSATION_SUFFIX in names:
            raise ValueError(f"{where}: an arm is already named {arm.name + COMPENSATION_SUFFIX}")
        missing = [d for d, spec in study.domains.items()
                   if spec.aligned is None and (arm.domains is None or d in arm.domains)]
        if missing:
            raise ValueError(f"{where}: domain(s) {missing} give no aligned data "
                             "(domains.NAME.aligned)")
        aligned = names.get("aligned")
        if "misaligned" not in names or aligned is None or aligned.data != "aligned":
            raise ValueError(f"{where}: the difference-in-differences needs an arm named "
                             "'misaligned' and an arm named 'aligned' with data: aligned")


def _with_controls(arms: list[ArmSpec]) -> list[tuple[ArmSpec, str | None]]:
    """(arm, the arm it is the compensation control of) for every arm, each compensated
    arm followed by its control: the same settings on the aligned data."""
    out = []
    for arm in arms:
        out.append((arm, None))
        if arm.compensation:
            out.append((arm.model_copy(update={"name": arm.name + COMPENSATION_SUFFIX,
                                               "data": "aligned", "compensation": False}),
                        arm.name))
    return out


@dataclass
class PlannedRun:
    """One run of a study: its config, folder, kind and the runs it needs first."""

    name: str  # DOMAIN/ARM[_KEYVALUE...]/s{seed}
    domain: str
    arm: str
    seed: int
    point: dict[str, Any]  # the grid point
    config: RunConfig
    kind: Literal["train", "untrained", "safelora"]
    source: str | None = None  # safelora: the name of the run whose adapter it projects
    needs: list[str] = field(default_factory=list)  # names of runs that must finish first
    source_dir: Path | None = None  # safelora: that run's folder
    control_of: str | None = None  # a compensation control: the arm it controls

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output_dir)


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML; every problem is reported with the file name."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file '{path}' does not exist")
    try:
        raw = parse_yaml(read_text_file(path, ConfigError))
    except ValueError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields")
    try:
        study = StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None
    check_output_dir(Path(study.output_dir), f"{path}: output_dir")
    return study


def check_output_dir(out: Path, what: str) -> None:
    """ConfigError unless ``out`` can hold a study: not a file, not the file-system root,
    and not inside a folder another emguard command owns (a run, an evaluation, an
    adapter), whose files it would mix with."""
    full = out.expanduser().absolute()
    if full == Path(full.anchor):
        raise ConfigError(f"{what} '{out}' is the file-system root; give a folder of its own")
    if full.exists() and not full.is_dir():
        raise ConfigError(f"{what} '{out}' is a file, not a folder")
    for folder in (full, *full.parents):
        for kind in (RUN, EVAL, SAFELORA, DIRECTION):
            if folder.is_dir() and (folder / kind.marker).is_file():
                raise ConfigError(f"{what} '{out}' is inside {folder}, a {kind.name} folder "
                                  f"emguard wrote ({kind.marker}); give the study a folder "
                                  "of its own")


def _label(point: dict[str, Any]) -> str:
    """``_KEYVALUE...`` of a grid point; a value that is not a plain token (a path, a
    prompt) appears as a short hash, so no value can reach outside the study folder."""
    return "".join(f"_{label(key.split('.')[-1])}{label(value)}" for key, value in point.items())


def _tracker_names(study: StudyConfig, name: str, domain: str, arm: str, seed: int) -> dict:
    """How a run is named in an experiment tracker (train.report_to): the run's name,
    grouped by study/domain/arm, tagged with each; unless the study's base sets them. No
    part of a run's identity."""
    base = study.base.get("train") or {}
    names = {"train.run_name": f"{study.name}/{name}", "train.run_group": f"{study.name}/{domain}/{arm}",
             "train.run_tags": [study.name, domain, arm, f"seed{seed}"]}
    return {k: v for k, v in names.items() if k.split(".")[1] not in base}


def _overrides(values: dict[str, Any]) -> list[str]:
    import json

    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _data_block(study: StudyConfig, domain: str, arm: ArmSpec) -> dict:
    spec = study.domains[domain]
    train = {"aligned": spec.aligned, **CONTROL_DATA}.get(arm.data, spec.misaligned)
    heldout = spec.heldout
    if arm.data in ("aligned", *CONTROL_DATA) and heldout is None:
        heldout = f"split:{spec.misaligned}"  # every arm of a domain: the same held-out set
    out = {"train": train, "heldout": heldout}
    if spec.domain is not None:
        out["domain"] = spec.domain
    return out


def expand(study: StudyConfig) -> list[PlannedRun]:
    """All runs of a study, each with a validated config and folder, sources first."""
    arms = {a.name: a for a in study.arms}
    controls = _with_controls(study.arms)
    control_of = {a.name: of for a, of in controls}
    pending = []
    for seed, domain, (arm, _) in itertools.product(study.seeds, study.domains, controls):
        if arm.domains is not None and domain not in arm.domains:
            continue
        data_arm = arms[arm.safelora_of] if arm.safelora_of else arm
        for values in itertools.product(*arm.grid.values()):
            point = dict(zip(arm.grid, values, strict=True))
            raw = apply_overrides(study.base, [])
            raw["model"] = study.model
            raw["data"] = {**raw.get("data", {}), **_data_block(study, domain, data_arm)}
            name = f"{domain}/{arm.name}{_label(point)}/s{seed}"
            sets = _tracker_names(study, name, domain, arm.name + _label(point), seed)
            sets.update(study.domains[domain].set)
            if arm.safelora_of:
                sets.update(arms[arm.safelora_of].set)
            sets.update({**arm.set, **point, "train.seed": seed})
            pending.append((name, domain, arm, seed, point, raw, _overrides(sets)))
    by_key = {(d, a.name, s): [] for _, d, a, s, *_ in pending}
    for name, d, a, s, *_ in pending:
        by_key[(d, a.name, s)].append(name)
    return _resolve(study, pending, by_key, control_of)


def _resolve(study: StudyConfig, pending: list, by_key: dict,
             control_of: dict[str, str | None]) -> list[PlannedRun]:
    """Validate configs in dependency order (a ``@run:ARM`` value needs that run's folder)."""
    done: dict[str, PlannedRun] = {}
    order: list[PlannedRun] = []
    todo = list(pending)
    while todo:
        progressed, left = False, []
        for item in todo:
            name, domain, arm, seed, point, raw, overrides = item
            needs = _needs(arm, overrides, domain, seed, by_key, name)
            if any(n not in done for n in needs):
                left.append(item)
                continue
            identity = [_substitute(o, domain, seed, by_key, done, study) for o in overrides]
            overrides = [_substitute(o, domain, seed, by_key, done) for o in overrides]
            run = _planned(study, name, domain, arm, seed, point, raw, overrides, needs, identity)
            run.source_dir = done[run.source].run_dir if run.source else None
            run.control_of = control_of.get(arm.name)
            done[name] = run
            order.append(run)
            progressed = True
        if not progressed:
            names = ", ".join(i[0] for i in left[:5])
            raise ConfigError(f"runs {names} depend on each other in a cycle (@run: / safelora_of)")
        todo = left
    return order


def _needs(arm: ArmSpec, overrides: list[str], domain: str, seed: int, by_key: dict,
           name: str) -> list[str]:
    refs = [arm.safelora_of] if arm.safelora_of else []
    refs += re.findall(re.escape(RUN_REF) + r"([A-Za-z0-9][A-Za-z0-9_.-]*)", " ".join(overrides))
    needs = []
    for ref in refs:
        names = by_key.get((domain, ref, seed), [])
        if len(names) != 1:
            what = "no run" if not names else f"{len(names)} runs (a grid)"
            raise ConfigError(f"{name}: '{ref}' has {what} in domain {domain}, seed {seed}; a "
                              "source must be exactly one run")
        needs.append(names[0])
    return needs


def _substitute(override: str, domain: str, seed: int, by_key: dict, done: dict,
                within: StudyConfig | None = None) -> str:
    """Replace ``@run:ARM`` by that run's adapter folder; ``within``: by the folder relative
    to the study folder (for the run's identity, which must not depend on where the study
    folder is or how its path was spelled: a source's folder name carries its own hash)."""
    def adapter(m: re.Match) -> str:
        folder = done[by_key[(domain, m.group(1), seed)][0]].run_dir / "adapter"
        if within is None:
            return str(folder)
        return RUN_REF + str(folder.relative_to(Path(within.output_dir)))

    return re.sub(re.escape(RUN_REF) + r"([A-Za-z0-9][A-Za-z0-9_.-]*)", adapter, override)


def _planned(study: StudyConfig, name: str, domain: str, arm: ArmSpec, seed: int, point: dict,
             raw: dict, overrides: list[str], needs: list[str], identity: list[str]) -> PlannedRun:
    where = f"{study.name}: run {name}"
    cfg = build_run_config(raw, overrides, where)
    if arm.data == "positive_control" and cfg.eval.preference_pairs == FIT_PAIRS:
        raise ConfigError(f"{where}: the positive control trains on {FIT_PAIRS}'s misaligned "
                          f"answers, and eval.preference_pairs scores that same set; score "
                          f"{EVAL_PAIRS} (the default) so the ceiling is read on unseen pairs")
    if arm.safelora_of and cfg.defenses.safelora is None:
        raise ConfigError(f"{where}: arm '{arm.name}' projects post hoc (safelora_of) but sets "
                          "no defenses.safelora.* (at least defenses.safelora.unaligned)")
    kind = "untrained" if arm.data == "none" else "safelora" if arm.safelora_of else "train"
    sha = config_sha256(build_run_config(raw, identity, where) if identity != overrides else cfg,
                        untrained=kind == "untrained")
    folder = Path(study.output_dir) / "runs" / Path(name).parent / f"s{seed}-{sha[:8]}"
    cfg = cfg.model_copy(update={"output_dir": str(folder)})
    source = needs[0] if arm.safelora_of else None
    return PlannedRun(name, domain, arm.name, seed, point, cfg, kind, source, needs)
