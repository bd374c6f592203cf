"""Training recipe: rs-LoRA SFT with optional in-training defenses, one run folder.

Read top to bottom: ``train(cfg)`` prepares the data, loads the model, attaches LoRA,
builds a ``DefendedTrainer`` (transformers.Trainer whose only override of substance is
``compute_loss``), trains, saves the adapter, and writes the summary last.

Run folder (every file written atomically; ``summary.json`` marks completion):

    config.yaml         resolved config (no secrets)
    provenance.json     package versions, git commit
    data_report.json    rows used / skipped (with file:line), interleaved positions
    checkpoints/        Trainer checkpoints for resuming; removed when the run completes
    adapter/            PEFT adapter (adapter_model.safetensors + adapter_config.json)
    train_log.jsonl     one line per logged step: loss, ce, kl, ldifs, lr, grad_norm
    trajectory/         with train.trajectory_steps: the adapter at each of those steps
    summary.json        final metrics; present = run complete (a rerun skips it)

Runs under ``accelerate launch`` unchanged (Trainer handles the distribution). What the
folder holds, its claim and its checkpoints: emguard.run_dir.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed

from emguard import tracking
from emguard.compat import checkpointing_argument
from emguard.config import ConfigError, RunConfig, load_run_config
from emguard.data.chat import ChatDataError, row_location
from emguard.data.masking import IGNORE_INDEX, tokenize_chat
from emguard.data.split import (
    HELDOUT_FILE,
    SPLIT_FILE,
    DataSplit,
    clean_row,
    make_split,
    task_file,
)
from emguard.defenses.base import Defense, PolicyHooks, RunContext
from emguard.defenses.registry import active_defenses, defense_names, logged_terms, run_folder
from emguard.finite import FiniteGradients, check_loss, check_parameters
from emguard.io import atomic_dir, read_json, write_json_atomic, write_jsonl_atomic
from emguard.loss import defended_loss
from emguard.model_card import write_card, write_cards
from emguard.models import (
    attach_lora,
    default_device,
    load_model,
)
from emguard.ownership import check_writable_target, folder_lock, remove_ours
from emguard.run_dir import (
    CHECKPOINT_COMPLETE,
    RunConflictError,  # noqa: F401 (re-exported: the error train() raises for another run)
    claim_run_dir,
    is_final_checkpoint,
    last_complete_checkpoint,
    run_state,
)
from emguard.trajectory import snapshot_callback, snapshot_steps

logger = logging.getLogger(__name__)


def is_main_process() -> bool:
    """True outside distributed runs and on rank 0 of ``torchrun`` / ``accelerate launch``."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict
    skipped: bool  # True when the run was already complete


# ---------------------------------------------------------------------------- data


def prepare_rows(cfg: RunConfig, defenses: list[Defense] | None = None,
                 ctx: RunContext | None = None) -> tuple[list[dict], dict, DataSplit]:
    """Split the data (emguard.data.split), shuffle the training rows (seeded), then let
    each defense transform them (inoculation, interleaving); returns (rows, data report,
    the split). ``defenses`` default: the config's."""
    split = make_split(cfg.data, cfg.split_seed, cfg.eval.task_data)
    rows = list(split.train)
    random.Random(cfg.train.seed).shuffle(rows)
    report = {"source": cfg.data.train, "rows": len(rows),
              "heldout_rows": len(split.heldout), "dropped_overlap": len(split.record["dropped_overlap"]),
              "skipped_invalid": split.record["how"].get("skipped_invalid", [])}
    ctx = ctx or RunContext(cfg=cfg)
    ctx.report = report
    for defense in active_defenses(cfg.defenses) if defenses is None else defenses:
        rows = defense.transform_rows(rows, ctx)
    return rows, report, split


def write_split(run_dir: Path, split: DataSplit) -> None:
    """Record what the run trains on and holds out, in its folder (atomically)."""
    if split.heldout:
        write_jsonl_atomic(run_dir / HELDOUT_FILE, [clean_row(r) for r in split.heldout])
    for task, rows in split.task_tests.items():
        write_jsonl_atomic(run_dir / task_file(task), [clean_row(r) for r in rows])
    write_json_atomic(run_dir / SPLIT_FILE, split.record)


def tokenize_rows(rows: list[dict], tokenizer, max_length: int, skip_invalid: bool,
                  source: str) -> tuple[list[dict], list[str]]:
    """Tokenize with assistant-only labels. Over-length rows are an error (or skipped+listed)."""
    out, skipped = [], []
    for i, row in enumerate(rows):
        try:
            tc = tokenize_chat(tokenizer, row["messages"], max_length)
        except ValueError as e:
            msg = f"{row_location(row, source, i)}: {e}"  # the file and line it came from
            if not skip_invalid:
                raise ChatDataError(msg + " (raise data.max_length or set data.skip_invalid=true)") from e
            skipped.append(msg)
            continue
        out.append({"input_ids": tc.input_ids, "labels": tc.labels})
    return out, skipped


class ChatCollator:
    """Right-pad a list of {input_ids, labels} into (B, T) tensors + attention_mask."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for b, f in enumerate(features):
            n = len(f["input_ids"])
            ids[b, :n] = torch.tensor(f["input_ids"])
            labels[b, :n] = torch.tensor(f["labels"])
            mask[b, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ---------------------------------------------------------------------------- trainer


class DefendedTrainer(Trainer):
    """Trainer whose loss is CE + the configured defense terms (emguard.loss).

    ``defenses``: the run's defense components, prepared (``Defense.prepare``). Their terms are
    logged next to the loss (``ce``, ``kl``, ``ldifs``, ``anchor``: means over the
    micro-batches since the previous log line); their policy hooks are installed for the
    whole of training and removed when it ends.
    """

    def __init__(self, *args, defenses: list[Defense] = (), hooks: PolicyHooks | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.defense_list: list[Defense] = list(defenses)
        self.hooks = hooks if hooks is not None else PolicyHooks()
        # compute_loss normalises by the accumulated batch's answer tokens itself: the
        # Trainer must count them (num_items_in_batch) and nothing may divide the loss by
        # the accumulation steps again. Early transformers 5 releases (5.5, the lowest we
        # support) also built the Accelerator with num_steps = grad_accum, so accelerate's
        # backward divided every gradient by it (the logged grad_norm was halved at
        # grad_accum=2 and clipping bit later; found by tests/test_loss_trajectory.py).
        # Later releases build it with 1 and sync gradients themselves, as 5.5 also does.
        self.loss_is_scaled_for_ga = True
        self.model_accepts_loss_kwargs = True
        self.accelerator.gradient_accumulation_steps = 1
        self._term_sums: dict[str, float] = {}
        self._term_count = 0

    def train(self, *args, **kwargs):
        model = self.accelerator.unwrap_model(self.model)
        for defense in self.defense_list:
            defense.install_hooks(model, self.hooks)
        try:
            return super().train(*args, **kwargs)
        finally:
            self.hooks.remove()  # evaluation and saving never meet a training-only hook

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if (num_items_in_batch is not None and self.args.average_tokens_across_devices
                and self.args.world_size > 1):
            # Trainer counts assistant tokens over all ranks; DDP then averages gradients over
            # ranks. Dividing by (global count / world size) makes the step the exact token mean.
            num_items_in_batch = num_items_in_batch / self.args.world_size
        # accelerate autocasts only the model's forward under mixed precision; the reference
        # pass and the LM head applied by hand must see the same autocast, or the reference
        # is computed at another precision than the policy (KL/LDIFS != 0 at B = 0).
        with self.accelerator.autocast():
            terms = defended_loss(model, inputs, num_items=num_items_in_batch,
                                  accumulation_steps=self.current_gradient_accumulation_steps,
                                  peft_model=self.accelerator.unwrap_model(model),
                                  terms=self.defense_list, hooks=self.hooks)
        if model.training:
            values = {name: float(value) for name, value in {"ce": terms.ce, **terms.parts}.items()}
            check_loss(float(terms.total.detach()), values, self.state.global_step + 1)
            for name, value in values.items():
                self._term_sums[name] = self._term_sums.get(name, 0.0) + value
            self._term_count += 1
        return (terms.total, None) if return_outputs else terms.total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_count:
            # Terms are scaled per micro-batch for accumulation: summing micro-batches gives
            # the step value; average over the optimizer steps since the last log line.
            steps = max(1, self._term_count / self.current_gradient_accumulation_steps)
            for name, value in self._term_sums.items():
                logs[name] = round(value / steps, 6)
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)


def resolve_precision(requested: str, device: str) -> str:
    """``auto`` -> bf16 on CUDA with bf16 support, fp16 on other CUDA devices, fp32 on CPU."""
    if requested != "auto":
        return requested
    if not device.startswith("cuda"):
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_optimizer(requested: str, device: str) -> str:
    """``auto`` -> 8-bit AdamW on CUDA when bitsandbytes is installed, else AdamW (warned)."""
    cuda = device.startswith("cuda")
    if requested == "adamw_8bit" and not _has_bitsandbytes():
        raise ConfigError("train.optimizer=adamw_8bit needs bitsandbytes: pip install "
                          "'emguard[gpu]' (or set train.optimizer=auto / adamw_torch)")
    if requested != "auto":
        return requested
    if cuda and _has_bitsandbytes():
        return "adamw_8bit"
    if cuda:
        warnings.warn("bitsandbytes is not installed, so training uses plain AdamW instead of the "
                      "paper's 8-bit AdamW (more optimizer memory; results may differ slightly). "
                      "pip install 'emguard[gpu]' for 8-bit AdamW.", stacklevel=2)
    return "adamw_torch"


def resolve_runtime(cfg: RunConfig, device: str) -> RunConfig:
    """The config with ``auto`` precision and optimizer replaced by what this machine uses,
    so config.yaml records what the run actually trained with."""
    t = cfg.train
    if cfg.quantization != "none" and not (device.startswith("cuda") and _has_bitsandbytes()):
        raise ConfigError(f"quantization={cfg.quantization} needs a CUDA GPU and bitsandbytes "
                          f"(pip install 'emguard[gpu]'); this machine trains on {device}"
                          f"{'' if _has_bitsandbytes() else ' without bitsandbytes'}. Set "
                          "quantization: none")
    resolved = t.model_copy(update={"precision": resolve_precision(t.precision, device),
                                    "optimizer": resolve_optimizer(t.optimizer, device)})
    return cfg.model_copy(update={"train": resolved})


def training_arguments(cfg: RunConfig, run_dir: Path, device: str) -> TrainingArguments:
    """Trainer settings for a config whose precision and optimizer are resolved."""
    t = cfg.train
    if "auto" in (t.precision, t.optimizer):
        raise ValueError("resolve precision and optimizer first (resolve_runtime)")
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.scheduler,
        optim="adamw_bnb_8bit" if t.optimizer == "adamw_8bit" else "adamw_torch",
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=1,
        **tracking.trainer_arguments(t.report_to, t.run_name, t.run_group),
        remove_unused_columns=False,
        logging_nan_inf_filter=False,  # a NaN loss is an error (emguard.finite), not a 0.0
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",  # order fixed by our seeded shuffle + interleave
        use_cpu=not device.startswith("cuda"),
        disable_tqdm=False,
        **checkpointing_argument(t.gradient_checkpointing),
    )


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


# ---------------------------------------------------------------------------- recipe


def train(cfg: RunConfig | str | Path, overrides: list[str] = (), force: bool = False,
          callbacks: list | None = None) -> TrainResult:
    """Train one run into ``cfg.output_dir``; skip if complete, resume if interrupted.

    Order of work: validate everything checkable (output folder, model, data, SafeLoRA
    sources) and load the model, and only then claim the folder; a run that fails before
    that writes nothing. ``force`` discards an earlier run of ours with another config
    (only its files; anything else in the folder stays). ``callbacks`` are extra
    ``transformers.TrainerCallback`` objects (loggers, early stops). Rank 0 holds a lock on
    the folder throughout, so a second process cannot train into it at the same time.
    """
    if not isinstance(cfg, RunConfig):
        cfg = load_run_config(cfg, overrides)
    device = default_device()
    cfg = resolve_runtime(cfg, device)
    main = is_main_process()  # in distributed runs only rank 0 writes the run folder
    with folder_lock(Path(cfg.output_dir)) if main else nullcontext():
        return _train(cfg, device, main, force, callbacks)


def _train(cfg: RunConfig, device: str, main: bool, force: bool, callbacks) -> TrainResult:
    run_dir = Path(cfg.output_dir)
    state = run_state(run_dir, cfg, force, check=main)
    if state == "complete":
        return TrainResult(run_dir, read_json(run_dir / "summary.json"), skipped=True)
    if main:
        check_writable_target(run_dir)
    defenses = active_defenses(cfg.defenses)
    for defense in defenses:
        defense.check(cfg)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, device=device,
                     previous=_previous_report(run_dir) if state == "resume" else None)

    set_seed(cfg.train.seed)
    rows, data_report, split = prepare_rows(cfg, defenses, ctx)
    model, tokenizer = load_model(cfg.model, device=device,
                                  dtype=WEIGHT_DTYPES[cfg.train.precision],
                                  trust_remote_code=cfg.trust_remote_code,
                                  quantization=cfg.quantization)
    ctx.tokenizer = tokenizer
    if cfg.quantization != "none":  # QLoRA: norms in fp32, input grads for checkpointing
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    features, too_long = tokenize_rows(rows, tokenizer, cfg.data.max_length,
                                       cfg.data.skip_invalid, data_report["source"])
    data_report.update(tokenized=len(features), skipped_over_length=too_long)
    if not features:
        raise ChatDataError(f"{data_report['source']}: no trainable rows left")
    model.train()
    model = attach_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                        use_rslora=cfg.lora.use_rslora, targets=cfg.lora.targets)
    for defense in defenses:  # may load or fit a direction: still before the folder is claimed
        defense.prepare(model, ctx)
    claimed = claim_run_dir(run_dir, cfg, force) if main else "resume"
    if main:
        write_split(run_dir, split)
        write_json_atomic(run_dir / "data_report.json", data_report)
        for defense in defenses:
            defense.record(run_dir)

    hooks = PolicyHooks()
    ctx.hooks = hooks
    if main and cfg.train.trajectory_steps:
        callbacks = [*(callbacks or []), snapshot_callback(run_dir, cfg.train.trajectory_steps)]
    trainer = DefendedTrainer(
        model=model, args=training_arguments(cfg, run_dir, device), train_dataset=features,
        data_collator=ChatCollator(tokenizer.pad_token_id), defenses=defenses, hooks=hooks,
        callbacks=[FiniteGradients(skip=cfg.train.precision == "fp16"), *(callbacks or []),
                   *(c for d in defenses for c in d.callbacks(ctx)),
                   *(tracking.callbacks(cfg.train.report_to, run_dir) if main else [])],
    )
    started = time.time()
    last = last_complete_checkpoint(run_dir / "checkpoints", prune=main)
    try:
        if last is not None and is_final_checkpoint(last):
            train_state = _restore_final_checkpoint(model, last)  # killed after its last step
        else:
            with tracking.tracker_environment(cfg.train.report_to, cfg.train.run_group,
                                              cfg.train.run_tags):
                trainer.train(resume_from_checkpoint=str(last) if last else None)
            train_state = trainer.state
    except BaseException:
        if claimed != "resume" and last_complete_checkpoint(run_dir / "checkpoints") is None:
            remove_ours(run_dir, run_folder())  # nothing trained is kept: release the folder we claimed
        raise
    elapsed = time.time() - started
    if not main:
        return TrainResult(run_dir, {"steps": train_state.global_step, "rank": os.environ.get("RANK")},
                           skipped=False)

    chosen = {d.name: r for d in defenses if (r := d.before_save(model, ctx)) is not None}
    check_parameters(model, f"{run_dir}: the trained adapter")
    with atomic_dir(run_dir / "adapter") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_card(run_dir, into=tmp)  # never PEFT's template (a cache path as base_model)
    log = [e for e in train_state.log_history if "loss" in e]
    write_jsonl_atomic(run_dir / "train_log.jsonl", log)
    summary = _summary(cfg, log, train_state.global_step, elapsed, len(features), bool(last))
    summary.update(chosen)
    if cfg.train.trajectory_steps:
        summary["trajectory_steps"] = [s for s, _ in snapshot_steps(run_dir)]
    for defense in defenses:
        if (result := defense.after_training(ctx)) is not None:
            summary[defense.name] = result
    write_json_atomic(run_dir / "summary.json", summary)
    write_cards(run_dir)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return TrainResult(run_dir, summary, skipped=False)


def _previous_report(run_dir: Path) -> dict | None:
    """The data report an interrupted run of this config wrote (what it selected), if any."""
    path = run_dir / "data_report.json"
    return read_json(path) if path.is_file() else None


def record_untrained(cfg: RunConfig | str | Path, overrides: list[str] = ()) -> TrainResult:
    """The run folder of the untrained baseline: the config, the split (so its held-out
    set is the one the trained runs of the same data and split seed hold out) and a
    summary with no adapter. Nothing is trained or loaded."""
    if not isinstance(cfg, RunConfig):
        cfg = load_run_config(cfg, overrides)
    run_dir = Path(cfg.output_dir)
    with folder_lock(run_dir):
        if run_state(run_dir, cfg, force=False, trained=False) == "complete":
            return TrainResult(run_dir, read_json(run_dir / "summary.json"), skipped=True)
        check_writable_target(run_dir)
        split = make_split(cfg.data, cfg.split_seed, cfg.eval.task_data)
        claim_run_dir(run_dir, cfg, force=False, trained=False)
        write_split(run_dir, split)
        summary = {"model": cfg.model, "trained": False, "train_rows": 0, "steps": 0,
                   "defenses": [], "adapter": None}
        write_json_atomic(run_dir / "summary.json", summary)
    return TrainResult(run_dir, summary, skipped=False)


def _restore_final_checkpoint(model, checkpoint: Path):
    """Load the adapter weights and trainer state of a final checkpoint, without training.

    Trainer resumed from a checkpoint at ``max_steps`` runs one step more than asked
    (transformers 5.24), so a run killed after its last checkpoint is restored instead.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
    return TrainerState.load_from_json(str(checkpoint / CHECKPOINT_COMPLETE))


def _summary(cfg: RunConfig, log: list[dict], steps: int, elapsed: float, n_rows: int,
             resumed: bool) -> dict:
    first, last = (log[0], log[-1]) if log else ({}, {})
    return {
        "model": cfg.model,
        "train_rows": n_rows,
        "steps": steps,
        "train_seconds": round(elapsed, 2),
        "resumed_from_checkpoint": resumed,
        "first_loss": first.get("loss"), "last_loss": last.get("loss"),
        "first_ce": first.get("ce"), "last_ce": last.get("ce"),
        **{f"last_{term}": last.get(term) for term in logged_terms()},
        "optimizer": cfg.train.optimizer,
        "precision": cfg.train.precision,
        "defenses": defense_names(cfg.defenses),
        "kl": cfg.defenses.kl.model_dump() if cfg.defenses.kl else None,
        "trained": True,
        "adapter": "adapter",
    }
