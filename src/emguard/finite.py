"""Non-finite numbers stop a run loudly: a NaN loss, gradient or adapter is never saved.

The Trainer's own log filter would show a NaN loss as the running mean (0.0 at the first
step), so a diverged run looked like a run at loss 0. emguard turns that filter off and
checks the loss (``check_loss``), the gradients before each optimizer step
(``FiniteGradients``) and the trainable weights before anything is saved
(``check_parameters``).
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback


class NonFiniteError(FloatingPointError):
    """A loss, gradient or weight is NaN or infinite; the message says which and where."""


def check_loss(total: float, parts: dict[str, float], step: int) -> None:
    """NonFiniteError when the step's loss ``total`` (or a term of it) is not finite."""
    if math.isfinite(total) and all(math.isfinite(v) for v in parts.values()):
        return
    terms = ", ".join(f"{k} {v:.4g}" for k, v in parts.items())
    raise NonFiniteError(f"training step {step}: the loss is {total} ({terms}); stopped before "
                         "the optimizer step. Lower train.learning_rate or a defense's weight, "
                         "or check the inputs (a direction folder, the data)")


def nonfinite_names(named: list[tuple[str, torch.Tensor]], limit: int = 5) -> list[str]:
    """Names of the tensors in ``named`` holding a NaN or an infinity (the first ``limit``)."""
    if not named:
        return []
    finite = torch.stack([t.detach().isfinite().all() for _, t in named]).cpu()  # one sync
    return [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok][:limit]


def check_parameters(model: torch.nn.Module, what: str) -> None:
    """NonFiniteError when a trainable weight of ``model`` is not finite (``what``: what
    was about to be saved, e.g. "the adapter")."""
    bad = nonfinite_names([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    if bad:
        raise NonFiniteError(f"{what} holds non-finite weights ({', '.join(bad)}); nothing was "
                             "saved. Lower train.learning_rate or a defense's weight")


class FiniteGradients(TrainerCallback):
    """Stop at the first optimizer step whose gradients hold a NaN or an infinity.

    ``skip=True`` under fp16 loss scaling, where an overflowing step is expected and the
    scaler skips it (the loss and the saved weights are still checked)."""

    def __init__(self, skip: bool = False):
        self.skip = skip

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.skip or model is None:
            return
        bad = nonfinite_names([(n, p.grad) for n, p in model.named_parameters()
                               if p.requires_grad and p.grad is not None])
        if bad:
            raise NonFiniteError(f"training step {state.global_step + 1}: non-finite gradients "
                                 f"in {', '.join(bad)}; stopped before the optimizer step")
