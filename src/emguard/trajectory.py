"""Trajectories: the judge-free measures of a run read along its training steps.

EMA grows late (it appears after the narrow task has converged), so *when* a measure
moves matters as much as where a run ends. A run with ``train.trajectory_steps: [10, 20,
40]`` keeps its adapter at those optimizer steps; evaluation scores each kept adapter
with the run's judge-free measures (preference margin and shift, drift KL, held-out NLL),
and the report plots them against the step. The final step is the run itself.

    RUN/trajectory/step-00010/         adapter kept at step 10 (safetensors), written
                                       atomically during training
    RUN/eval/trajectory/step-00010/general/   an eval folder (emguard.evaluate) of that
    RUN/eval/trajectory/step-00010/indomain/  adapter, judge-free only (no sampled answers)

Snapshots are written by rank 0 as training passes each step; a resumed run re-creates
only the steps after its checkpoint (training is deterministic, so a rewritten snapshot
equals the one it replaces). An evaluated snapshot is never scored twice: its eval folders
cache their results under a key of adapter hash, pairs and questions, like any evaluation.
"""

from __future__ import annotations

from pathlib import Path

from emguard.data.split import HELDOUT_FILE
from emguard.evaluate import ModelHolder, run_eval
from emguard.io import atomic_dir, read_json

SNAPSHOT_DIR = "trajectory"  # in the run folder: one adapter folder per kept step
EVAL_PART = "trajectory"  # in RUN/eval/: one pair of eval folders per kept step


def step_dir_name(step: int) -> str:
    return f"step-{step:05d}"


def snapshot_steps(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, adapter folder) of every complete snapshot of a run, by step."""
    root = Path(run_dir) / SNAPSHOT_DIR
    if not root.is_dir():
        return []
    out = []
    for p in root.glob("step-*"):
        step = p.name.removeprefix("step-")
        if p.is_dir() and step.isdigit() and (p / "adapter_config.json").is_file():
            out.append((int(step), p))
    return sorted(out)


def snapshot_callback(run_dir: Path, steps: list[int]):
    """A ``TrainerCallback`` that saves the adapter at the listed optimizer steps into
    ``run_dir/trajectory/step-N``.

    Only the trainable (adapter) weights are saved, atomically, so a process killed while
    saving leaves no half-written snapshot. Steps at or past the run's last step are not
    snapshots: the run's own adapter is that point. (Built here, not at import, so the
    report reads trajectories without importing transformers.)"""
    from transformers import TrainerCallback

    from emguard.finite import check_parameters

    wanted = set(steps)

    class SnapshotCallback(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if step in wanted and step < state.max_steps and model is not None:
                check_parameters(model, f"{run_dir}: the step-{step} snapshot")
                with atomic_dir(Path(run_dir) / SNAPSHOT_DIR / step_dir_name(step)) as tmp:
                    model.save_pretrained(tmp, safe_serialization=True)
                    (tmp / "README.md").unlink(missing_ok=True)  # PEFT's blank template
            return control

    return SnapshotCallback()


def evaluate_trajectory(run_dir: Path, cfg, settings, info: dict, domain: str | None,
                        device: str | None = None, progress: bool = True,
                        force: bool = False) -> dict[int, dict]:
    """Judge-free measures of every snapshot of the run: {step: {part: metrics}}.

    ``settings`` is the run's eval block: the same preference pairs, general questions
    (drift KL), held-out rows and batch size as the run's final evaluation, with no
    sampled answers and no judge, so every point of a trajectory reads the same items."""
    out: dict[int, dict] = {}
    held = Path(run_dir) / HELDOUT_FILE
    for step, adapter in snapshot_steps(run_dir):
        where = Path(run_dir) / "eval" / EVAL_PART / step_dir_name(step)
        model = ModelHolder(cfg.model, adapter, device)  # loaded once per step, on first use
        common = dict(device=device, progress=progress, force=force, model=model,
                      run={**info, "step": step})
        out[step] = {}
        try:
            if settings.general_questions:
                out[step]["general"] = run_eval(
                    cfg.model, adapter, settings.trajectory_pass(settings.general_questions, True),
                    where / "general", **common)
            if settings.indomain and held.is_file():
                out[step]["indomain"] = run_eval(
                    cfg.model, adapter, settings.trajectory_pass(str(held), False, domain),
                    where / "indomain", **common)
        finally:
            model.release()
    return out


def trajectory_results(run_dir: Path) -> dict[int, dict[str, dict]]:
    """{step: {part: judge_free.json}} of every evaluated snapshot (for the report)."""
    root = Path(run_dir) / "eval" / EVAL_PART
    out: dict[int, dict[str, dict]] = {}
    if not root.is_dir():
        return out
    for p in sorted(root.glob("step-*")):
        step = p.name.removeprefix("step-")
        if not step.isdigit():
            continue
        parts = {part: read_json(p / part / "judge_free.json") for part in ("general", "indomain")
                 if (p / part / "metrics.json").is_file() and (p / part / "judge_free.json").is_file()}
        if parts:
            out[int(step)] = parts
    return out
