"""The demo: a small study on the embedded model, run through the sweep and the report.

``configs/demo.yaml`` (beside this module) is an ordinary study in the regime the regime
study chose (docs/regime.md): the untrained model, the aligned control (secure code), the
misaligned fine-tune (insecure code), the positive control (the ceiling of the measure),
KL at lambda 1 and 10, LDIFS, SafeLoRA and interleaving, on SmolLM2-135M-Instruct and the
built-in code sets. ``run_demo`` adjusts it (folder, seeds, steps, judge), runs it with
``emguard.sweep.run_sweep`` (finished runs are skipped, so a rerun continues) and writes
the report with ``emguard.report.build_report``. There is no second measurement path:
what the demo prints is what ``emguard report`` reads from the run folders.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from emguard.config import apply_overrides
from emguard.report import Report, build_report
from emguard.study import StudyConfig, load_study
from emguard.sweep import run_sweep

DEMO_STUDY = Path(__file__).parent / "configs" / "demo.yaml"
# with a judge, answers are sampled for it to score (none are without one)
JUDGED_EVAL = {"general_samples": 2, "indomain_samples": 1, "max_new_tokens": 128}


class DemoError(RuntimeError):
    """Some runs of the demo failed; the message names them and their errors."""


def demo_study(out: str | Path = "runs/demo", seeds: list[int] | None = None,
               steps: int | None = None, model: str | None = None,
               judge: str | None = None, overrides: list[str] = ()) -> StudyConfig:
    """The demo study with its folder, seeds, training steps, model and judge replaced;
    ``overrides`` (``data.max_length=1024``) set run-config keys of every run."""
    study = load_study(DEMO_STUDY)
    raw = study.model_dump(mode="json")
    raw["output_dir"] = str(out)
    if seeds is not None:
        raw["seeds"] = list(seeds)
    if model is not None:
        raw["model"] = model
    base = raw["base"]
    if steps is not None:
        base["train"] = {**base["train"], "max_steps": steps}
    if judge is not None and judge.lower() != "none":
        base["eval"] = {**base["eval"], **JUDGED_EVAL, "judge": judge}
    raw["base"] = apply_overrides(base, list(overrides))
    return StudyConfig.model_validate(raw)


def run_demo(out: str | Path = "runs/demo", seeds: list[int] | None = None,
             steps: int | None = None, model: str | None = None, judge: str | None = None,
             overrides: list[str] = (), progress: bool = True,
             on_event: Callable[[str, str, int, int], None] | None = None) -> Report:
    """Run (or continue) the demo study in ``out`` and write its report; returns the report.
    Raises DemoError naming the runs that failed (the report of the others is written)."""
    study = demo_study(out, seeds, steps, model, judge, overrides)
    result = run_sweep(study, progress=progress, on_event=on_event)
    report = build_report(study.output_dir, study=study.name)
    if result.failed or result.blocked:
        lines = [f"{n}: {e}" for n, e in result.failed.items()]
        lines += [f"{n}: blocked, needs {need}" for n, need in result.blocked.items()]
        raise DemoError("demo runs did not finish (report of the others: "
                        f"{report.html}):\n  " + "\n  ".join(lines))
    return report
