"""Early stopping on a judge-free misalignment proxy (``defenses.early_stop``).

Every ``every_steps`` optimizer steps (and at the last step) the model being trained is
scored on validation preference pairs with the judge-free misalignment-preference margin
(emguard.judge_free, measure (b)): per pair, the mean log-probability per answer token of
the misaligned answer minus that of the aligned one, averaged over the pairs. The
**shift** is that mean margin minus the reference's (the same network with its adapter
disabled, scored once before training), in **nats per answer token**. It is a proxy: it
says which of two fixed answers the model now prefers, not what it would answer, and no
judge reads anything.

**When.** Checks run at the multiples of ``every_steps`` from ``min_step`` on, and at
the last step; none runs before ``min_step``, so nothing stops before it. Default
``min_step``: max(train.warmup_steps + 1, every_steps), the first step taken at the full
learning rate (the schedules here take step k at lr x (k - 1) / warmup_steps during
warm-up, so with one warm-up step the adapter after step 1 is still the untrained one).
Step 0 is the reference (shift 0 by definition).

**Tolerance.** A check is *within tolerance* when ``shift <= tolerance``. ``tolerance:
auto`` is ``tolerance_z`` x the seed-to-seed sd of the shift measured on the pair set in
use (``SEED_SPREAD``); a pair set without a measured spread needs a number.

**Stop and keep.** After ``patience`` checks in a row over tolerance, training stops. The
adapter kept is that of the last *restorable* check within tolerance, where restorable is a
check at or after ``min_step`` (step 0, the untrained adapter, only with
``allow_restore_untrained``); when no restorable check is within tolerance, the earliest
restorable check is kept (the training that reached it is not thrown away). A CPU copy of
the chosen check's weights is taken when it is chosen and loaded back before the adapter
is saved when the last check was over tolerance and is not itself the chosen one.
``stopped`` in the report means the patience ran out (also when that happened at the last
step). A run that is stopped by something else between checks keeps its final, unchecked
adapter, as does a run too short to reach ``min_step``.

Validation pairs are ``training_pairs(pairs, holdout_pairs)`` (never the pairs evaluation
scores when ``holdout_pairs`` equals ``eval.preference_max_pairs``), evenly thinned to
``max_pairs``. Checks run on the plain model: policy hooks paused, eval mode, no_grad.

Run folder: ``early_stop.json`` (the checks, the chosen step; also in summary.json) and
``early_stop/`` (resume state: ``state.json`` and at most two adapter copies, so that a run
resumed from a Trainer checkpoint keeps its history and its chosen adapter; the checks
after that checkpoint are forgotten and rerun). A resumed run whose patience had already
run out at its checkpoint's step trains one more step (the Trainer cannot stop before one),
then stops and keeps the chosen adapter as before.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from transformers import TrainerCallback

from emguard.data.pairs import (
    BUILTIN,
    BUILTIN_PAIRS,
    EVAL_PAIRS,
    FIT_PAIRS,
    evenly_spaced,
    load_pairs,
    training_pairs,
)
from emguard.defenses.base import Defense, PolicyHooks, RunContext
from emguard.io import read_json, write_json_atomic
from emguard.judge_free import pair_margins, reference_mode
from emguard.settings import ConfigError, Int, Settings

logger = logging.getLogger(__name__)

REPORT = "early_stop.json"
STATE_DIR = "early_stop"
STATE_FILE = "state.json"
UNITS = "nats per answer token"
FIELD = "defenses.early_stop"

# Seed-to-seed sd (over seeds 0, 1, 2) of the misaligned run's preference shift, in nats
# per answer token, per pair set: what ``tolerance: auto`` multiplies by ``tolerance_z``.
# Each was measured on other pairs of the same set and in another regime than a run's own
# checks may use: a noise scale, not an exact null distribution.
SEED_SPREAD = {
    FIT_PAIRS: (0.083, "docs/defense_study_6step.md: misaligned arm, shift +/-sd over seeds 0-2 "
                       "(6 steps at lr 1e-3, 22 held-out pairs of the set)"),
    EVAL_PAIRS: (0.036, "docs/regime.md (benchmarks/results/regime.json): misaligned - "
                        "untrained over seeds 0-2 at the chosen regime (12 steps at lr 5e-4, "
                        "158 pairs)"),
}


def resolve_tolerance(settings) -> tuple[float, str]:
    """(tolerance in nats per answer token, where it comes from); ``auto`` without a
    measured spread for the pair set is a ConfigError naming the field."""
    if settings.tolerance != "auto":
        return float(settings.tolerance), "set"
    spec = settings.pairs or BUILTIN
    if spec not in SEED_SPREAD:
        raise ConfigError(f"{FIELD}.tolerance: auto needs the seed-to-seed spread of the shift "
                          f"measured on the pairs in use, and none is recorded for {spec} "
                          f"(measured: {', '.join(SEED_SPREAD)}); set a number "
                          f"({UNITS})")
    sd, source = SEED_SPREAD[spec]
    z = settings.tolerance_z
    return z * sd, f"auto: {z:g} x sd {sd:g} of {spec} ({source})"


def resolve_min_step(settings, cfg) -> int:
    """``min_step``, or by default max(train.warmup_steps + 1, every_steps): the first step
    at the full learning rate (warm-up 0 without a run config)."""
    if settings.min_step is not None:
        return settings.min_step
    warmup = cfg.train.warmup_steps if getattr(cfg, "train", None) is not None else 0
    return max(warmup + 1, settings.every_steps)


def restorable(step: int, min_step: int, allow_untrained: bool) -> bool:
    """May the adapter of the check at ``step`` be the one kept?"""
    return step >= max(min_step, 1) or (step == 0 and allow_untrained)


def validation_pairs(settings) -> list[dict]:
    """The pairs the checks score: the training pairs of ``settings.pairs`` (evaluation's
    ``holdout_pairs`` left out), ``max_pairs`` of them evenly spaced."""
    return evenly_spaced(training_pairs(settings.pairs, settings.holdout_pairs),
                         settings.max_pairs)


@contextmanager
def plain_eval(model, hooks: PolicyHooks | None):
    """Eval mode, no_grad and the policy hooks paused; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with hooks.paused() if hooks is not None else nullcontext(), torch.no_grad():
            yield
    finally:
        model.train(was_training)


def margins(model, tokenizer, pairs: list[dict], batch_size: int,
            hooks: PolicyHooks | None = None, reference: bool = False) -> list[float]:
    """Per-pair margins (nats per answer token) of the plain model (``reference``: with
    its adapter disabled)."""
    with plain_eval(model, hooks), reference_mode(model) if reference else nullcontext():
        return pair_margins(model, tokenizer, pairs, batch_size)


def adapter_copy(model) -> dict[str, torch.Tensor]:
    """A CPU copy of the adapter's weights (peft's state-dict keys)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True).contiguous()
            for k, v in get_peft_model_state_dict(model).items()}


def kept_step(history: list[dict], min_step: int, allow_untrained: bool) -> int:
    """The step whose adapter is kept: the last restorable check within tolerance, else
    the earliest restorable check, else 0 (no check yet: nothing to restore)."""
    steps = [h for h in history if restorable(h["step"], min_step, allow_untrained)]
    within = [h["step"] for h in steps if h["within"]]
    if within:
        return max(within)
    return min((h["step"] for h in steps), default=0)


def stop_step(history: list[dict], patience: int) -> int | None:
    """The step of the check that exhausted ``patience`` (None: none did)."""
    streak = 0
    for entry in history:
        streak = 0 if entry["within"] else streak + 1
        if streak >= patience:
            return entry["step"]
    return None


def _adapter_file(step: int) -> str:
    return f"adapter-{step:08d}.safetensors"


class EarlyStopSettings(Settings):
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


class EarlyStop(Defense):
    """Stop when the judge-free margin shift exceeds ``tolerance`` (nats per answer token)
    for ``patience`` checks in a row from ``min_step`` on; keep the adapter of the last
    restorable check within it."""

    settings_model = EarlyStopSettings

    name = "early_stop"
    artifacts = (STATE_DIR, REPORT)

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.pairs: list[dict] | None = None
        self.reference: list[float] = []  # per-pair reference margins (nats/token)
        self.history: list[dict] = []  # [{step, shift, margin, within}]
        self.chosen: dict[str, torch.Tensor] | None = None
        self.chosen_step = 0
        self.anchor_step = 0  # the chosen step as of the latest Trainer checkpoint
        self.tolerance: float | None = None  # resolved (nats per answer token)
        self.tolerance_source = ""
        self.min_step = 0
        self.state_dir: Path | None = None  # written to: the main process, folder claimed
        self.load_dir: Path | None = None  # read from: the state of the run resumed
        self._resumed = False

    # -- before training
    def check(self, cfg) -> None:
        """The pairs file exists, parses and leaves at least one pair to check on; the
        tolerance and ``min_step`` resolve."""
        spec = self.settings.pairs
        if spec is not None and spec not in BUILTIN_PAIRS and not Path(spec).is_file():
            raise ConfigError(f"defenses.early_stop.pairs: {spec} does not exist (a JSONL file "
                              f"of question / aligned / misaligned pairs, or {BUILTIN})")
        try:
            pairs = load_pairs(spec)
        except ValueError as e:
            raise ConfigError(f"defenses.early_stop.pairs: {e}") from None
        try:
            self.pairs = validation_pairs(self.settings)
        except ValueError as e:
            raise ConfigError(f"defenses.early_stop.holdout_pairs: {e}") from None
        if not pairs or not self.pairs:
            raise ConfigError(f"defenses.early_stop.pairs: {spec or BUILTIN} holds no pairs")
        self.tolerance, self.tolerance_source = resolve_tolerance(self.settings)
        self.min_step = resolve_min_step(self.settings, cfg)
        self._warn_overlap(cfg)
        self._warn_short(cfg)

    def _warn_short(self, cfg) -> None:
        """Warn when the run ends before ``min_step``: no check runs at all."""
        steps = cfg.train.max_steps if getattr(cfg, "train", None) is not None else -1
        if 0 < steps < self.min_step:
            logger.warning("%s: train.max_steps %d < min_step %d: no check will run",
                           FIELD, steps, self.min_step)

    def _warn_overlap(self, cfg) -> None:
        """Warn when the checks may score pairs evaluation scores too."""
        ev = getattr(cfg, "eval", None)
        if ev is None or (ev.preference_pairs or EVAL_PAIRS) != (self.settings.pairs or BUILTIN):
            return
        held = self.settings.holdout_pairs
        if held is None or held != ev.preference_max_pairs:
            logger.warning("defenses.early_stop checks pairs evaluation also scores: set "
                           "defenses.early_stop.holdout_pairs = eval.preference_max_pairs "
                           "(now %s and %s)", held, ev.preference_max_pairs)

    def prepare(self, model, ctx: RunContext) -> None:
        """Score the reference once; take the step-0 adapter, or the state of the run this
        one resumes."""
        if self.pairs is None:
            self.check(ctx.cfg)
        self.reference = margins(model, ctx.tokenizer, self.pairs, self.settings.batch_size,
                                 ctx.hooks, reference=True)
        ref = _mean(self.reference)
        self.history = [{"step": 0, "shift": 0.0, "margin": ref, "within": True}]
        self.chosen, self.chosen_step, self.anchor_step = adapter_copy(model), 0, 0
        if ctx.previous is not None and ctx.run_dir is not None:
            self.load_dir = Path(ctx.run_dir) / STATE_DIR
            self._load_state()
        logger.info("early_stop: %d validation pairs, reference margin %.4f %s; tolerance "
                    "%.4f (%s), checks from step %d", len(self.pairs), ref, UNITS,
                    self.tolerance, self.tolerance_source, self.min_step)

    def record(self, run_dir: Path) -> None:
        """Claim the resume state folder (main process only) and write the step-0 state."""
        self.state_dir = Path(run_dir) / STATE_DIR
        if not self._resumed:
            self._save_adapter(self.chosen_step, self.chosen)
            self._save_state()

    # -- during training
    def callbacks(self, ctx: RunContext) -> list:
        return [EarlyStopCallback(self, ctx)]

    @property
    def stopped(self) -> bool:
        """The patience ran out (a resumed run that had stopped stops after one step)."""
        return stop_step(self.history, self.settings.patience) is not None

    def due(self, step: int, max_steps: int) -> bool:
        """A check is due at the multiples of ``every_steps`` from ``min_step`` on and at
        the last step (never before ``min_step``, never twice)."""
        if self.stopped or self.history[-1]["step"] >= step or step < self.min_step:
            return False
        return step % self.settings.every_steps == 0 or 0 < max_steps <= step

    def kept(self, history: list[dict] | None = None) -> int:
        """The step whose adapter is kept, given ``history`` (default: all checks)."""
        return kept_step(self.history if history is None else history, self.min_step,
                         self.settings.allow_restore_untrained)

    def run_check(self, model, ctx: RunContext, step: int) -> None:
        """Score the model at ``step`` and record the check (``stopped`` says what next)."""
        tuned = margins(model, ctx.tokenizer, self.pairs, self.settings.batch_size, ctx.hooks)
        shift = _mean([t - r for t, r in zip(tuned, self.reference, strict=True)])
        within = shift <= self.tolerance
        self.history.append({"step": step, "shift": shift, "margin": _mean(tuned),
                             "within": within})
        if self.kept() != self.chosen_step:  # only ever moves to the check just made
            self.chosen, self.chosen_step = adapter_copy(model), step
            self._save_adapter(step, self.chosen)
        self._save_state()
        stop = self.stopped
        logger.info("early_stop: step %d margin %.4f shift %+.4f %s (tolerance %.4f): %s%s",
                    step, self.history[-1]["margin"], shift, UNITS, self.tolerance,
                    "within" if within else "over",
                    f"; stopping, keeping step {self.chosen_step}" if stop else "")

    def checkpointed(self, step: int) -> None:
        """A Trainer checkpoint at ``step`` was written: the chosen adapter as of it is
        the one a resume needs; older copies go."""
        self.anchor_step = self.kept([h for h in self.history if h["step"] <= step])
        self._save_state()

    def rewind(self, step: int) -> None:
        """Training resumed at ``step``: forget the checks after it (they are rerun)."""
        if self.history[-1]["step"] <= step:
            return
        self.history = [h for h in self.history if h["step"] <= step]
        self._set_chosen(self.kept())
        self.anchor_step = self.chosen_step
        self._save_state()

    # -- after training
    def before_save(self, model, ctx: RunContext) -> dict:
        """Load the chosen adapter back when the last check was over tolerance and is not
        the chosen one; write ``early_stop.json``; return the same for summary.json."""
        last = self.history[-1]
        if not last["within"] and last["step"] != self.chosen_step:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, self.chosen)
            if result.unexpected_keys:
                raise RuntimeError(f"early_stop: adapter keys {result.unexpected_keys[:3]} "
                                   "do not fit the model")
            logger.info("early_stop: restored the adapter of step %d", self.chosen_step)
        summary = self.summary()
        if ctx.run_dir is not None:
            write_json_atomic(Path(ctx.run_dir) / REPORT, summary)
        return summary

    def summary(self) -> dict:
        """The checks and the outcome (margins and shifts in nats per answer token)."""
        stopped_at = stop_step(self.history, self.settings.patience)
        chosen = next(h for h in self.history if h["step"] == self.chosen_step)
        return {"checks": self.history, "chosen_step": self.chosen_step,
                "chosen_within": chosen["within"],
                "stopped_at_step": stopped_at, "stopped": stopped_at is not None,
                "n_pairs": len(self.pairs), "reference_margin": self.history[0]["margin"],
                "tolerance": self.tolerance, "tolerance_source": self.tolerance_source,
                "patience": self.settings.patience, "every_steps": self.settings.every_steps,
                "min_step": self.min_step,
                "allow_restore_untrained": self.settings.allow_restore_untrained,
                "units": UNITS}

    # -- resume state (run_dir/early_stop/)
    def _save_adapter(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        if self.state_dir is None:
            return
        from safetensors.torch import save_file

        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / _adapter_file(step)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)

    def _save_state(self) -> None:
        """Write the history, then drop adapter copies no resume can need."""
        if self.state_dir is None:
            return
        write_json_atomic(self.state_dir / STATE_FILE,
                          {"history": self.history, "anchor_step": self.anchor_step,
                           "reference": self.reference})
        keep = {_adapter_file(self.anchor_step), _adapter_file(self.chosen_step)}
        for path in self.state_dir.glob("adapter-*.safetensors"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def _load_state(self) -> None:
        """Take over the history and chosen adapter an interrupted run left behind."""
        folder = self.load_dir
        if not (folder / STATE_FILE).is_file():
            return
        state = read_json(folder / STATE_FILE)
        if len(state.get("reference", [])) != len(self.pairs):
            logger.warning("early_stop: %s was written for other pairs; starting over", folder)
            return
        self.history, self.anchor_step = state["history"], state["anchor_step"]
        self._set_chosen(self.kept())
        self._resumed = True
        logger.info("early_stop: resumed %d checks from %s (chosen step %d)",
                    len(self.history) - 1, folder, self.chosen_step)

    def _set_chosen(self, step: int) -> None:
        """Make the adapter copy of ``step`` (read from the resume state) the chosen one."""
        if step == self.chosen_step and self.chosen is not None:
            return
        from safetensors.torch import load_file

        folder = self.state_dir or self.load_dir
        if folder is None:
            raise RuntimeError(f"early_stop: no adapter copy of step {step} to go back to")
        path = folder / _adapter_file(step)
        if not path.is_file():
            raise RuntimeError(f"early_stop: {path} (the adapter of step {step}) is missing; "
                               f"remove {path.parent} to restart early stopping from step 0")
        self.chosen, self.chosen_step = load_file(str(path)), step


class EarlyStopCallback(TrainerCallback):
    """Runs the defense's checks from the Trainer loop (``kwargs["model"]`` is the PEFT
    model; the tokenizer comes from the run context)."""

    def __init__(self, defense: EarlyStop, ctx: RunContext) -> None:
        self.defense, self.ctx = defense, ctx

    def on_train_begin(self, args, state, control, **kwargs):
        self.defense.rewind(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.defense.due(step, state.max_steps):
            self.defense.run_check(kwargs["model"], self.ctx, step)
        if self.defense.stopped:
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.defense.checkpointed(state.global_step)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
