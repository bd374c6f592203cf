"""Run configuration: typed, validated, loaded from YAML, saved resolved beside every run.

A run config is data. Unknown or ill-typed fields are errors that name the field and the
file; all problems in a file are reported together. Overrides use dotted keys with YAML
values (``train.max_steps=20``, ``defenses.kl.weight=0.1``); a malformed override is an
error naming it, and a field set by an override says so in the error. Config files are
UTF-8 (a UTF-8 byte-order mark is dropped; other encodings are an error naming the file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from emguard.data.chat import parse_yaml, read_text_file
from emguard.models import LORA_TARGETS
from emguard.redact import redact_secrets


class ConfigError(ValueError):
    """A config file or override that does not validate; the message lists every problem."""


class _Strict(BaseModel):
    # allow_inf_nan=False: `inf` / `.nan` are errors, not a learning rate or weight
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              allow_inf_nan=False)


# Whole numbers are strict: `true` is not 1 and 2.5 is not 2 (floats stay lax, so YAML's
# `1e-4`, which PyYAML reads as a string, is still a number).
Int = Annotated[int, Strict()]


class LoraSettings(_Strict):
    """rs-LoRA adapter (paper Table 7)."""

    r: Int = Field(32, gt=0)
    alpha: float = Field(64, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    use_rslora: bool = True
    targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)


class OpSwapData(_Strict):
    """How ``data.train: opswap:T`` generates its rows (emguard.data.opswap.generate_opswap).

    The test part is the OpSwap task's test set for this run: written into the run folder
    and read from there by evaluation, never regenerated."""

    n: Int = Field(10_000, gt=1)  # rows generated, train + test (paper: 10,000)
    test_fraction: float = Field(0.1, gt=0, lt=1)  # paper: 1,000 of 10,000 held out
    min_ops: Int = Field(1, gt=0)
    max_ops: Int = Field(3, gt=0)


class DataSettings(_Strict):
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


class TrainSettings(_Strict):
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


class KLSettings(_Strict):
    """KL to the reference (= same network, adapter disabled), paper eq. 4."""

    weight: float = Field(0.1, ge=0)  # lambda_KL
    direction: Literal["forward", "reverse"] = "forward"  # forward: KL(p_theta || p_ref)
    tokens: Literal["assistant", "all"] = "assistant"
    chunk_size: Int = Field(256, gt=0)  # positions per log-softmax chunk (256 x V floats each)


class LDIFSSettings(_Strict):
    """Feature-space L2 to the reference, paper eq. 5."""

    weight: float = Field(1.0, ge=0)  # lambda_LDIFS
    layer_every: Int = Field(5, gt=0)  # hidden states 5, 10, ... (index into hidden_states)
    layers: list[Int] | None = None  # explicit hidden_states indices; overrides layer_every
    tokens: Literal["all", "assistant"] = "all"  # all = every non-pad position (paper)
    # mean_token: sum over layers and dims, mean over tokens (eq. 5 per token);
    # mean_element: also divided by (layers x hidden size), a scale-free variant for models
    # with large residual norms; sum: eq. 5 literally (grows with sequence length).
    reduction: Literal["mean_token", "mean_element", "sum"] = "mean_token"


class InterleaveSettings(_Strict):
    """Mix safe instruct data uniformly through the fine-tuning data."""

    fraction: float = Field(0.05, gt=0, le=10)  # safe rows = round(fraction * n_train)
    source: str = "builtin:safe-instruct"  # builtin:NAME, chat JSONL path, or wildguardmix[:PATH]


class SafeLoRASettings(_Strict):
    """Post-hoc projection of the trained adapter (paper eqs. 1-3)."""

    tau: float = Field(0.3, ge=0, le=1)
    aligned: str | None = None  # model spec; default: the run's base model
    unaligned: str  # model spec (base model) or adapter directory (instruct + misaligned adapter)


class DirectionSettings(_Strict):
    """Where a direction-based defense takes its per-layer basis U_l from
    (emguard.defenses.direction) and at which residual-stream layers it acts.

    Two sources: ``fit`` or a folder of ``emguard direction fit`` hold the contrastive mean
    difference (persona vectors); a folder of ``emguard direction fit --from-run RUN``
    holds CAFT's principal components of (fine-tuned - base) residual differences. The
    defense uses the folder's first ``k`` rows either way.

    Layers are ``hidden_states`` indices 1..L-1 (k = the output of block k; 0 is the
    embeddings and L the final-normed state, which no block outputs)."""

    direction: str = "fit"  # a folder of `emguard direction fit`, or fit: fit it at run start
    pairs: str | None = None  # fit: contrastive pairs JSONL (None: builtin:preference-pairs)
    # fit: leave out the N evenly spaced pairs that evaluation with
    # eval.preference_max_pairs=N scores, so the direction never sees the evaluation's pairs
    holdout_pairs: Int | None = Field(None, gt=0)
    layers: list[Int] = Field(min_length=1)
    # the first k rows of U_l. Contrastive: 1 = the mean-difference direction, k > 1 adds
    # principal directions of the pair differences; CAFT folder: the top k components
    k: Int = Field(1, gt=0)
    # controls: a random direction, or one orthogonal to u, of the same norm (same subspace
    # dimension), so a study can tell a direction's effect from a generic one
    control: Literal["none", "random", "orthogonal"] = "none"
    control_seed: Int = 0

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if any(i < 1 for i in v):
            raise ValueError("layers are hidden_states indices >= 1 (0 is the embeddings)")
        if len(set(v)) != len(v):
            raise ValueError("a layer appears twice")
        return sorted(v)


class SteeringSettings(DirectionSettings):
    """Preventive steering (persona vectors, Chen et al. 2025): during training only,
    h_l += alpha * s_l * u_l (u_l unit, s_l the typical residual norm at layer l)."""

    alpha: float = 0.1  # share of the typical residual norm added along u


class AblationSettings(DirectionSettings):
    """Ablation during training only: the span of U_l's first k rows is projected out of
    the residual stream at the layers. With ``direction: fit`` or a contrastive folder this
    is ablation of the contrastive mean difference (the persona-vectors variant, Chen et
    al. 2025); with a folder of ``emguard direction fit --from-run`` it is CAFT
    (Casademunt et al. 2025): the top k principal components of (fine-tuned - base)."""


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


class InoculationSettings(_Strict):
    """Inoculation prompting (Tan et al. 2025): a system prompt that states the trait is
    requested, added to every training conversation and absent at evaluation."""

    # literal text, or builtin:NAME (emguard.defenses.inoculation.BUILTIN_PROMPTS)
    prompt: str = Field(min_length=1)
    # keep: a row without a system turn keeps the chat template's default system text after
    # the prompt (training and evaluation share it); replace: the prompt alone (they differ)
    system_default: Literal["keep", "replace"] = "keep"
    elicitation_rows: Int = Field(32, ge=0)  # rows of the elicitation check (0: no check)

    @field_validator("prompt")
    @classmethod
    def _nonblank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


class InterleavePlusSettings(_Strict):
    """Interleaving++ (arXiv 2508.06249 v3, as two secondary descriptions state it): keep the
    safe rows that misaligned models find hardest relative to the aligned model (highest
    mean_j (NLL_mis_j - NLL_aligned) / (NLL_aligned + eps)), refusals dropped after ranking."""

    # adapter folder(s) of misaligned-trained runs, one or a list of K >= 1 (in a study:
    # @run:misaligned); each is scored as the run's base model + that adapter
    misaligned: str | list[str]
    fraction: float = Field(0.05, gt=0, le=10)  # safe rows = round(fraction * n_train)
    source: str = "builtin:safe-instruct"  # candidate pool, as interleave.source
    max_candidates: Int | None = Field(None, gt=0)  # score at most this many (seeded sample)
    drop_refusals: bool = True
    # published: mean_j (NLL_mis_j - NLL_ref) / (NLL_ref + eps), highest kept (the paper's
    # rule as described); NOT the published rule: misaligned_likelier (mean_j NLL_ref -
    # NLL_mis_j, the rule before issue 21) and reference_likelier (its negative)
    rank_by: Literal["published", "misaligned_likelier", "reference_likelier"] = "published"

    @field_validator("misaligned")
    @classmethod
    def _sources(cls, v: str | list[str]) -> str | list[str]:
        names = [v] if isinstance(v, str) else v
        if not names:
            raise ValueError("an empty list; give at least one adapter folder")
        if any(not name.strip() for name in names):
            raise ValueError("an adapter folder must not be blank")
        if len(set(names)) != len(names):
            raise ValueError("an adapter folder appears twice")
        return v

    @property
    def sources(self) -> list[str]:
        """The misaligned adapter folders, in order (K >= 1; a plain string is K = 1)."""
        return [self.misaligned] if isinstance(self.misaligned, str) else list(self.misaligned)


class EarlyStopSettings(_Strict):
    """Stop training when the judge-free misalignment-preference margin on validation
    pairs rises above the reference's by more than ``tolerance`` for ``patience`` checks
    in a row; the adapter of the last check within tolerance is the one kept. Nothing
    stops, and no check is kept, before ``min_step``; the untrained adapter (step 0) is
    kept only with ``allow_restore_untrained``."""

    every_steps: Int = Field(3, gt=0)  # checks at multiples of it from min_step, and the last step
    min_step: Int | None = Field(None, ge=0)  # None: max(train.warmup_steps + 1, every_steps)
    patience: Int = Field(1, gt=0)
    # nats per answer token, or auto: tolerance_z x the measured seed-to-seed sd of the
    # shift on the pair set (emguard.defenses.early_stop.SEED_SPREAD; others need a number)
    tolerance: float | Literal["auto"] = "auto"
    tolerance_z: float = Field(1.0, gt=0)
    allow_restore_untrained: bool = False  # may the step-0 (untrained) adapter be kept?
    pairs: str | None = None  # validation pairs JSONL (None: builtin:preference-pairs)
    holdout_pairs: Int | None = Field(None, gt=0)  # leave out evaluation's N pairs (as above)
    max_pairs: Int | None = Field(None, gt=0)  # at most this many, evenly spaced
    batch_size: Int = Field(8, gt=0)

    @field_validator("tolerance", mode="before")
    @classmethod
    def _auto_or_number(cls, v: Any) -> Any:
        """One error naming both forms (not one per member of the union)."""
        if v == "auto":
            return v
        try:
            number = float(v)
        except (TypeError, ValueError):
            number = float("nan")
        if not 0 <= number < float("inf"):
            raise ValueError("must be auto or a finite number >= 0 (nats per answer token)")
        return number


class DefenseSettings(_Strict):
    """All off by default; any subset composes (emguard.defenses.registry applies them)."""

    kl: KLSettings | None = None
    ldifs: LDIFSSettings | None = None
    interleave: InterleaveSettings | None = None
    safelora: SafeLoRASettings | None = None
    inoculation: InoculationSettings | None = None
    interleave_plus: InterleavePlusSettings | None = None
    steering: SteeringSettings | None = None
    ablation: AblationSettings | None = None
    anchor: AnchorSettings | None = None
    early_stop: EarlyStopSettings | None = None


# Defenses added after runs were first recorded: in a run's identity only when on, so the
# folders (hashes) of earlier runs keep their names.
_LATER_DEFENSES = ("inoculation", "interleave_plus", "steering", "ablation", "anchor", "early_stop")


class EvalSettings(_Strict):
    """How a run is evaluated (emguard.evaluate.evaluate_run); not part of its identity, so
    changing it never retrains. Paper: 100 samples per general question at temperature 1,
    an in-domain subset of the held-out set, 10 samples per benign-task question."""

    general_questions: str | None = "builtin:general-questions"  # None: skip
    # None: the file's samples_per_paraphrase; 0: sample no answers (judge-free measures only)
    general_samples: Int | None = Field(None, ge=0)
    general_max_questions: Int | None = Field(None, gt=0)  # the first N general questions
    # preference pairs of the judge-free margin: a JSONL file or builtin:NAME (the default,
    # builtin:eval-pairs, is written apart from builtin:preference-pairs, the set directions
    # and early-stopping checks fit on) and how many, evenly spaced through the file (None: all)
    preference_pairs: str = "builtin:eval-pairs"
    preference_max_pairs: Int | None = Field(None, gt=0)
    indomain: bool = True  # evaluate the run's recorded held-out set
    indomain_samples: Int = Field(1, ge=0)  # 0: no sampled answers (held-out NLL only)
    indomain_max_questions: Int | None = Field(None, gt=0)  # paper: 30
    # None: the domain's prompts (eval_judge_prompts.yaml); "general": the general set's
    # alignment/coherence prompts (the paper's "same LLM-as-a-judge method"); or a FILE.
    indomain_judge_prompts: str | None = None
    judge: str = "none"  # openai:MODEL[@URL] | local:MODEL | none
    judge_free: bool = True
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: Int = Field(256, gt=0)
    seed: Int = 0
    batch_size: Int = Field(16, gt=0)  # rows per forward; on CPU also answers per decode
    generate_batch_size: Int | None = Field(None, gt=0)  # None: batch_size, at least 64 on a GPU
    backend: Literal["hf", "vllm"] = "hf"
    drift_max_new_tokens: Int = Field(128, gt=0)
    tasks: list[str] = Field(default_factory=list)  # opswap:T | foqa
    task_samples: Int = Field(10, gt=0)
    task_questions: Int | None = Field(None, gt=0)
    task_data: dict[str, str] = Field(default_factory=dict)  # task -> data; the run's own first
    # Ask the general part a second time with every general question (and preference-pair
    # question) wrapped in this format, into RUN/eval/general_trigger/: a template holding
    # {question} once, or builtin:python-string | builtin:json | builtin:code-template
    # (emguard.questions.resolve_trigger_format). None: no second pass.
    trigger_format: str | None = None
    # Score the adapters a run kept along training (train.trajectory_steps) with the
    # judge-free measures, into RUN/eval/trajectory/ (emguard.trajectory).
    trajectory: bool = True

    @field_validator("trigger_format")
    @classmethod
    def _trigger_format(cls, v: str | None) -> str | None:
        from emguard.questions import resolve_trigger_format

        if v is not None:
            resolve_trigger_format(v)
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        from emguard.benign import parse_task

        for task in v:
            parse_task(task)
        return v

    @model_validator(mode="after")
    def _answers_to_judge(self) -> EvalSettings:
        if self.judge.lower() != "none":
            zero = [f for f in ("general_samples", "indomain_samples") if getattr(self, f) == 0]
            if zero:
                raise ValueError(f"judge {self.judge} has no answers to judge with "
                                 f"{' and '.join(f'{f}=0' for f in zero)}; set at least 1 "
                                 "sample per question, or judge: none")
        return self


class RunConfig(_Strict):
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
    defenses: DefenseSettings = Field(default_factory=DefenseSettings)
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


TRACKING_KEYS = ("report_to", "run_name", "run_group", "run_tags")


def training_identity(cfg: RunConfig) -> dict:
    """The fields that decide what a run trains (everything but ``eval`` and where it is
    written): equal identities train the same adapter."""
    identity = cfg.model_dump(mode="json", exclude={"eval", "output_dir"})
    for name in _LATER_DEFENSES:
        if identity["defenses"][name] is None:
            del identity["defenses"][name]
    if not identity["train"]["trajectory_steps"]:  # added later: runs keep their names
        del identity["train"]["trajectory_steps"]
    for key in TRACKING_KEYS:  # where numbers are shown, not what is trained
        del identity["train"][key]
    return identity


def config_sha256(cfg: RunConfig, untrained: bool = False) -> str:
    """SHA-256 of the training identity (canonical JSON), the name a study gives a run.
    ``untrained``: the untrained baseline of that config, which is not the trained run
    (trained runs' hashes are as they always were)."""
    import hashlib
    import json

    identity = training_identity(cfg)
    if untrained:
        identity = {"untrained": True, **identity}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
