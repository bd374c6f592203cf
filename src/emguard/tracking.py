"""Experiment trackers: the Trainer's own integrations, switched on by ``train.report_to``.

``tensorboard``, ``trackio``, ``wandb`` and ``mlflow`` receive every logged scalar: ``loss``,
``ce``, each defense's term (``kl``, ``ldifs``, ``anchor``, ...: DefendedTrainer puts them
next to the loss), ``learning_rate`` and ``grad_norm``. The run is named
``train.run_name`` and grouped by ``train.run_group`` with ``train.run_tags`` (a sweep
sets study/domain/arm/seed), so a study's runs group by arm in the tracker's UI.

TensorBoard writes into the run folder (``RUN/tensorboard/``, removed with the run by
``--force``); evaluation adds its judge-free and judged numbers there at the run's last
step (``log_evaluation``). The hosted trackers get the training scalars; their group and
tags are passed through their environment variables for the duration of training.
Nothing is reported unless ``report_to`` names a tracker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from emguard.eval_log import EvalLog, EvalLogError, read_eval_log
from emguard.io import read_json

TB_DIR = "tensorboard"


def trainer_report_to(report_to: list[str]) -> list[str]:
    """What the Trainer's own ``report_to`` gets: TensorBoard is added by emguard itself
    (``callbacks``), so that it writes into the run folder, not the checkpoints folder."""
    return [r for r in report_to if r != "tensorboard"]


def trainer_arguments(report_to: list[str], run_name: str | None, group: str | None) -> dict:
    """The tracker settings of ``TrainingArguments``: report_to, run_name, and trackio's
    project (the group's first part: the study) where this transformers has it."""
    from transformers import TrainingArguments

    out = {"report_to": trainer_report_to(report_to), "run_name": run_name}
    if group and "project" in TrainingArguments.__dataclass_fields__:
        out["project"] = group.split("/")[0]
    return out


def callbacks(report_to: list[str], run_dir: Path) -> list:
    """Tracker callbacks emguard builds itself: TensorBoard into ``RUN/tensorboard``."""
    if "tensorboard" not in report_to:
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(Path(run_dir) / TB_DIR)))]


@contextmanager
def tracker_environment(report_to: list[str], group: str | None, tags: list[str]
                        ) -> Iterator[None]:
    """Group and tags for the hosted trackers, through the variables they read (W&B:
    ``WANDB_RUN_GROUP``, ``WANDB_TAGS``; MLflow: the tags as ``MLFLOW_TAGS``), restored
    after. (trackio takes its project from the training arguments: ``trainer_arguments``.)"""
    values: dict[str, str] = {}
    if "wandb" in report_to:
        values.update({"WANDB_RUN_GROUP": group or "", "WANDB_TAGS": ",".join(tags)})
    if "mlflow" in report_to and tags:
        import json

        values["MLFLOW_TAGS"] = json.dumps({f"tag{i}": t for i, t in enumerate(tags)})
    values = {k: v for k, v in values.items() if v}  # trackio: TrainingArguments.project
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def log_evaluation(run_dir: Path, report_to: list[str], points: dict[int, dict[str, float]]
                   ) -> bool:
    """Write a run's evaluation numbers (``eval/NAME``, ``points``: step -> scalars: the
    kept snapshots and the last step) into its TensorBoard log; False when TensorBoard is
    not one of its trackers."""
    if "tensorboard" not in report_to or not any(points.values()):
        return False
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(Path(run_dir) / TB_DIR))
    try:
        for step, scalars in sorted(points.items()):
            for name, value in scalars.items():
                writer.add_scalar(f"eval/{name}", value, step)
    finally:
        writer.close()
    return True


def log_run_evaluation(run_dir: Path, report_to: list[str], steps: int) -> bool:
    """``log_evaluation`` of everything a run folder's evaluation holds: each scored
    snapshot at its step and the run itself at its last step ``steps``."""
    root = Path(run_dir) / "eval"
    points = {int(p.name.removeprefix("step-")): evaluation_scalars(p)
              for p in sorted((root / "trajectory").glob("step-*"))
              if p.name.removeprefix("step-").isdigit()}
    points[steps] = evaluation_scalars(root)
    return log_evaluation(run_dir, report_to, points)


def evaluation_scalars(eval_dir: Path) -> dict[str, float]:
    """The judge-free and judged summary numbers of an evaluation folder (``RUN/eval`` or a
    snapshot's ``RUN/eval/trajectory/step-N``), by name."""
    out: dict[str, float] = {}
    general = judge_free_of(eval_dir, "general")
    shifts = preference_shifts(general)
    if shifts:
        out["preference_shift"] = sum(shifts) / len(shifts)
    nll = (judge_free_of(eval_dir, "indomain").get("heldout_nll") or {}).get("nll_mean")
    if nll is not None:
        out["heldout_nll"] = nll
    drift = (general.get("drift") or {}).get("kl_mean")
    if drift is not None:
        out["drift_kl"] = drift
    for part in ("general", "indomain"):
        log = eval_log_of(eval_dir, part)
        overall = log.llm_judge.overall if log is not None and log.llm_judge else None
        for key in ("pct_misaligned", "pct_incoherent"):
            if overall is not None and getattr(overall, key) is not None:
                out[f"{part}_{key}"] = getattr(overall, key)
    return out


def judge_free_of(eval_dir: Path, part: str) -> dict:
    """``EVAL_DIR/PART/judge_free.json`` ({} when absent or unreadable)."""
    path = Path(eval_dir) / part / "judge_free.json"
    try:
        return read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def eval_log_of(eval_dir: Path, part: str) -> EvalLog | None:
    """``EVAL_DIR/PART/metrics.json`` as a validated EvalLog (None when absent, unreadable or
    of a format this version does not read: trackers and cards show what they can)."""
    path = Path(eval_dir) / part / "metrics.json"
    try:
        return read_eval_log(path) if path.is_file() else None
    except EvalLogError:
        return None


def preference_shifts(general: dict) -> list[float]:
    """Per pair, the margin minus the base model's (nats per token), from a general part's
    judge_free.json; pairs missing either margin are left out."""
    pairs = (general.get("preference") or {}).get("pairs") or []
    return [p["margin"] - p["reference_margin"] for p in pairs
            if p.get("margin") is not None and p.get("reference_margin") is not None]
