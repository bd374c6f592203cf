"""What a defense is: a small component with optional phases (emguard.defenses.registry
lists them, the training recipe runs them).

Phases, in the order a run meets them:

  check(cfg)                 before anything is loaded: sources exist, settings fit
  transform_rows(rows, ctx)  the shuffled training rows -> the rows trained on
  prepare(model, ctx)        once, with the LoRA model loaded (load or fit a direction;
                             raise ConfigError for settings the model cannot have)
  record(run_dir)            once the run folder is claimed: write what was used
  install_hooks(model, hooks) forward hooks that act on the POLICY forward only
  reference_layers / loss_term   a term of the training loss, reading the one reference
                             forward of the step (emguard.loss.defended_loss)
  callbacks(ctx)             transformers TrainerCallbacks (early stopping)
  before_save(model, ctx)    after the last step, before the adapter is saved
  after_training(ctx)        a post-training step (SafeLoRA's projection)

Every phase is a no-op by default; a component overrides the ones it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch


@dataclass
class RunContext:
    """What a phase may read about its run: the resolved config, the run folder (None
    before it is claimed), the model's tokenizer and the data report to add to."""

    cfg: Any  # emguard.config.RunConfig
    run_dir: Path | None = None
    tokenizer: Any = None
    device: str = "cpu"
    report: dict = field(default_factory=dict)  # data_report.json, written after the rows
    previous: dict | None = None  # the data report of an interrupted run of this config
    hooks: PolicyHooks | None = None  # the policy hooks (pause them to see the plain model)
    cache: dict = field(default_factory=dict)  # shared between defenses (one direction fit)


@dataclass
class StepInputs:
    """One micro-batch's tensors, shared by every loss term (no term reruns a forward).

    hidden: the policy's ``hidden_states``, L + 1 tensors (B, T, D); [-1] is final-normed.
    ref_hidden: the reference's, the same tuple, or None when no term asked for layers.
    ref_final: (B, T, D) final-normed reference states, or None without a reference.
    attention_mask: (B, T); assistant: (B, T-1) bool, position t predicts an answer token.
    denom: assistant tokens in the accumulated batch (float32 scalar), CE's normaliser.
    assistant_logits: (N, V) policy logits at the assistant positions (shared with CE).
    head: final hidden states (N, D) -> logits (N, V), as the model's forward applies it.
    """

    hidden: tuple[torch.Tensor, ...]
    ref_hidden: tuple[torch.Tensor, ...] | None
    ref_final: torch.Tensor | None
    attention_mask: torch.Tensor
    assistant: torch.Tensor
    denom: torch.Tensor
    accumulation_steps: int
    assistant_logits: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor]

    def token_mask(self, tokens: str) -> torch.Tensor:
        """(B, T) positions a hidden-state term reads: every non-pad one ("all") or the
        answer tokens ("assistant")."""
        if tokens == "all":
            return self.attention_mask.bool()
        return torch.nn.functional.pad(self.assistant, (1, 0))


class PolicyHooks:
    """Forward hooks on decoder blocks that act only on the policy's forward.

    Hooks stay installed for the whole of training (so that gradient checkpointing,
    which reruns a block's forward during backward, reruns it with the hook); they are
    paused around every reference forward and every check that must see the plain model,
    and removed when training ends, so evaluation never meets them. A hook is installed
    first among the block's hooks: the ``hidden_states`` transformers records for that
    block are the modified stream, i.e. what the next block reads.
    """

    def __init__(self) -> None:
        self.active = True
        self._handles: list = []

    def add(self, module: torch.nn.Module, edit: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """``edit`` maps the block's output hidden state (B, T, D) to its replacement."""

        def hook(_module, _inputs, output):
            if not self.active:
                return None
            if torch.is_tensor(output):
                return edit(output)
            return (edit(output[0]), *output[1:])

        self._handles.append(module.register_forward_hook(hook, prepend=True))

    @contextmanager
    def paused(self) -> Iterator[None]:
        before, self.active = self.active, False
        try:
            yield
        finally:
            self.active = before

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)


class Defense:
    """Base class: every phase does nothing. What a defense declares about itself:

    name       its key under ``defenses.`` in a run config
    settings_model  the pydantic model of that block (an emguard.settings.Settings)
    term       the loss term it adds, as train_log.jsonl and summary.json (``last_TERM``)
               name it; None: no term. A defense with a term has a ``weight`` setting.
    artifacts  the files and folders (globs allowed) it writes into a run folder, so that
               ``--force`` removes them with the run's own (emguard.ownership)
    identity_when_off  True only for the paper's four: their ``null`` settings stay in a
               run's identity (emguard.identity), so the folders of runs recorded before
               later defenses existed keep their names
    """

    name: ClassVar[str]
    settings_model: ClassVar[type]
    term: ClassVar[str | None] = None
    artifacts: ClassVar[tuple[str, ...]] = ()
    identity_when_off: ClassVar[bool] = False

    def __init__(self, settings) -> None:
        self.settings = settings

    # -- before training
    def check(self, cfg) -> None:
        """Raise ConfigError for what can be known wrong before a model is loaded."""

    def transform_rows(self, rows: list[dict], ctx: RunContext) -> list[dict]:
        return rows

    def prepare(self, model, ctx: RunContext) -> None:
        """Called once with the LoRA model, before the first step."""

    def record(self, run_dir: Path) -> None:
        """Write what the defense used into the claimed run folder (atomically)."""

    def install_hooks(self, model, hooks: PolicyHooks) -> None:
        """Add forward hooks that edit the policy's residual stream."""

    # -- every step
    def reference_layers(self, num_states: int) -> set[int] | None:
        """None: the term needs no reference. A set: the reference ``hidden_states``
        indices the term reads (empty: only the final-normed state)."""
        return None

    @property
    def weight(self) -> float:
        """The term's weight in the loss (a defense without a term adds nothing: 0)."""
        return float(self.settings.weight) if self.term is not None else 0.0

    def loss_term(self, step: StepInputs) -> torch.Tensor:
        """The unweighted term (a scalar scaled for gradient accumulation)."""
        raise NotImplementedError

    # -- around and after training
    def callbacks(self, ctx: RunContext) -> list:
        return []

    def before_save(self, model, ctx: RunContext) -> dict | None:
        """After training, before the adapter is written (e.g. restore a chosen
        checkpoint); what it returns goes into summary.json under its name."""
        return None

    def after_training(self, ctx: RunContext) -> dict | None:
        """A post-training step; what it returns goes into summary.json under its name."""
        return None
