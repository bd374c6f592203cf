"""The ``emguard`` command line. Each command group lives in its own module here and
registers itself with ``register(app)``; this file only assembles them."""

from __future__ import annotations

import importlib
import warnings

import typer

# PEFT 0.21 calls a transformers 5.x API that now warns on every model wrap; nothing to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

app = typer.Typer(
    name="emguard",
    help="Fine-tune chat models with LoRA under defenses against emergent misalignment, "
         "then measure misalignment, in-domain learning and benign-task learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# One module per command group; each defines register(app: typer.Typer) -> None.
COMMAND_MODULES = [
    "emguard.cli.demo_cmd",
    "emguard.cli.train_cmd",
    "emguard.cli.data_cmd",
    "emguard.cli.safelora_cmd",
    "emguard.cli.direction_cmd",
    "emguard.cli.eval_cmd",
    "emguard.cli.sweep_cmd",
    "emguard.cli.report_cmd",
    "emguard.cli.push_cmd",
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:  # pragma: no cover - console entry
    app()
