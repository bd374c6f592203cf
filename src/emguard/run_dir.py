"""A training run's folder: which run it holds (finished, interrupted, another config's),
claiming it for a run (emguard.ownership.claim), and the Trainer checkpoints it resumes
from. The recipe (emguard.train) asks; nothing here loads a model.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from emguard.config import ConfigError, RunConfig, dump_run_config, load_run_config
from emguard.defenses.registry import run_folder
from emguard.identity import config_sha256, training_identity
from emguard.io import provenance, read_json, write_json_atomic, write_text_atomic
from emguard.ownership import FolderConflictError, check_claim, claim

logger = logging.getLogger("emguard.train")  # the recipe's log, as before the split

WHAT = "this run (output_dir)"  # what the run folder is for, in a refusal
CHECKPOINT_COMPLETE = "trainer_state.json"  # Trainer writes it last into checkpoint-N


class RunConflictError(FolderConflictError):
    """The output folder holds a run of ours with a different config."""


def same_training(saved: Path, cfg: RunConfig) -> bool:
    """True when the config.yaml at ``saved`` trains what ``cfg`` trains (the ``eval``
    block and the output folder play no part). Compared as written, credentials redacted
    (emguard.redact), so a redacted value in config.yaml still matches its config."""
    if not saved.is_file():
        return False
    try:
        written = RunConfig.model_validate(yaml.safe_load(dump_run_config(cfg)))
        return training_identity(load_run_config(saved)) == training_identity(written)
    except (ConfigError, ValueError):
        return False


def _another_run(run_dir: Path) -> RunConflictError:
    return RunConflictError(
        f"{run_dir} holds a run with a different config ({run_dir / 'config.yaml'}); choose "
        "another output_dir, or pass --force to discard that run (only its files are removed)")


def run_state(run_dir: Path, cfg: RunConfig, force: bool, check: bool = True,
              trained: bool = True) -> str:
    """"complete" (same config, summary written), "resume", "new" or "replace" (force).

    Raises RunConflictError / FolderConflictError for a folder that holds another config
    (without ``force``) or files emguard did not write. ``trained=False``: the caller
    records the untrained baseline, which is not the trained run of the same config (and
    the other way round). Writes nothing. ``check=False`` (non-main ranks) only looks for
    completion; rank 0 owns the folder.
    """
    saved = run_dir / "config.yaml"
    same = same_training(saved, cfg)
    if same and (run_dir / "summary.json").is_file():
        recorded = read_json(run_dir / "summary.json").get("trained", True)
        if recorded != trained:
            if not check:
                return "resume"
            if not force:
                held = "a trained run" if recorded else "the untrained baseline"
                raise RunConflictError(
                    f"{run_dir} holds {held} of this config, not "
                    f"{'the untrained baseline' if recorded else 'a trained run'}; choose "
                    "another output_dir, or pass --force to discard it (only its files are removed)")
            same = False
    if not check:
        return "complete" if same and (run_dir / "summary.json").is_file() else "resume"
    # a matching config proves a run written before markers (same); writable: checked by
    # the caller once a finished run is ruled out (it is skipped even in a read-only folder)
    other = None if same or not saved.is_file() else (lambda: _another_run(run_dir))
    state = check_claim(run_dir, run_folder(), WHAT, same=same, conflict=other, force=force,
                        writable=False)
    if same:
        return "complete" if (run_dir / "summary.json").is_file() else "resume"
    return "replace" if state == "ours" and other is not None else "new"


def claim_run_dir(run_dir: Path, cfg: RunConfig, force: bool, trained: bool = True) -> str:
    """Make ``run_dir`` this run's folder (marker, config.yaml, provenance.json); return
    its state before ("new", "resume" or "replace").

    Called after the model has loaded; an earlier run of ours with another config is
    removed here (``force``), file by file, never the folder itself."""
    state = run_state(run_dir, cfg, force, trained=trained)
    config_text = dump_run_config(cfg)
    with claim(run_dir, run_folder(), what=WHAT, force=force, same=state == "resume",
               conflict=(lambda: _another_run(run_dir)) if state == "replace" else None,
               marker={"config_sha256": config_sha256(cfg)}) as claimed:
        if state == "replace":
            logger.warning("--force: removed the earlier run's %s from %s",
                           ", ".join(claimed.removed), run_dir)
        if state != "resume":
            write_text_atomic(run_dir / "config.yaml", config_text)
            write_json_atomic(run_dir / "provenance.json", provenance())
    return state


# ----------------------------------------------------------------------------- checkpoints


def last_complete_checkpoint(ckpt_dir: Path, prune: bool = True) -> Path | None:
    """The newest checkpoint that was written to the end, or None.

    A process killed while Trainer wrote ``checkpoint-N`` leaves it without
    ``trainer_state.json``; such a folder is treated as absent and (``prune``) removed -
    it lies inside our own run folder - so training resumes from the newest complete one.
    """
    if not ckpt_dir.is_dir():
        return None
    ckpts = sorted((p for p in ckpt_dir.glob("checkpoint-*")
                    if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    complete = [p for p in ckpts if (p / CHECKPOINT_COMPLETE).is_file()]
    newest = complete[0] if complete else None
    if prune:
        for p in ckpts:
            if p is not newest and not (p / CHECKPOINT_COMPLETE).is_file():
                logger.warning("removing incomplete checkpoint %s (interrupted while saved)", p)
                shutil.rmtree(p, ignore_errors=True)
    return newest


def is_final_checkpoint(checkpoint: Path) -> bool:
    """True for a checkpoint written at the run's last step (its trainer_state says so)."""
    state = read_json(checkpoint / CHECKPOINT_COMPLETE)
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]
