"""``emguard demo``: the main job on the embedded default model."""

from __future__ import annotations

from pathlib import Path

import typer


def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Folder for runs, metrics, plot."),
    steps: int = typer.Option(20, min=1, help="Optimizer steps per fine-tune."),
    model: str = typer.Option("smollm2-135m", help="Model spec (default: embedded SmolLM2-135M-Instruct)."),
    seed: int = typer.Option(0, help="Seed for data order, training and generation."),
) -> None:
    """Fine-tune on aligned code, on insecure code, and on insecure code under the KL
    defense; compare them and the untrained model on judge-free measures.

    Writes OUT/demo_results.md, OUT/demo_results.png and OUT/demo_metrics.json. A rerun
    skips finished runs and evaluations.
    """
    from rich.console import Console
    from rich.markdown import Markdown

    from emguard.demo import DemoSettings, run_demo

    result = run_demo(out, DemoSettings(model=model, steps=steps, seed=seed))
    console = Console()
    console.print(Markdown(result["table"]))
    verdict = "lower" if result["kl_reduces_drift"] else "NOT lower"
    console.print(f"KL defense: general drift is {verdict} than the undefended fine-tune. "
                  f"Results: {out / 'demo_results.md'}, plot: {out / 'demo_results.png'}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
