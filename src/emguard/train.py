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
    summary.json        final metrics; present = run complete (a rerun skips it)

Runs under ``accelerate launch`` unchanged (Trainer handles the distribution).
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed

from emguard.config import RunConfig, dump_run_config, load_run_config
from emguard.data.chat import ChatDataError, load_chat_dataset
from emguard.data.masking import IGNORE_INDEX, tokenize_chat
from emguard.defenses.interleave import interleave, load_safe_rows
from emguard.io import (
    atomic_dir,
    provenance,
    read_json,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from emguard.loss import defended_loss
from emguard.models import attach_lora, default_device, load_model


def is_main_process() -> bool:
    """True outside distributed runs and on rank 0 of ``torchrun`` / ``accelerate launch``."""
    return int(os.environ.get("RANK", "0")) == 0


class RunConflictError(RuntimeError):
    """The output folder holds a run with a different config."""


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict
    skipped: bool  # True when the run was already complete


# ---------------------------------------------------------------------------- data


def prepare_rows(cfg: RunConfig) -> tuple[list[dict], dict]:
    """Load, validate, shuffle (seeded) and optionally interleave the training rows."""
    ds = load_chat_dataset(cfg.data.train, skip_invalid=cfg.data.skip_invalid,
                           max_rows=cfg.data.max_rows, seed=cfg.train.seed)
    rows = list(ds.rows)
    random.Random(cfg.train.seed).shuffle(rows)
    report = {"source": ds.source, "rows": len(rows), "skipped_invalid": ds.skipped}
    inter = cfg.defenses.interleave
    if inter is not None:
        safe = load_safe_rows(inter.source, seed=cfg.train.seed)
        rows, positions = interleave(rows, safe, inter.fraction, seed=cfg.train.seed)
        report["interleave"] = {"source": inter.source, "fraction": inter.fraction,
                                "safe_rows": len(positions), "positions": positions}
    return rows, report


def tokenize_rows(rows: list[dict], tokenizer, max_length: int, skip_invalid: bool,
                  source: str) -> tuple[list[dict], list[str]]:
    """Tokenize with assistant-only labels. Over-length rows are an error (or skipped+listed)."""
    out, skipped = [], []
    for i, row in enumerate(rows):
        try:
            tc = tokenize_chat(tokenizer, row["messages"], max_length)
        except ValueError as e:
            msg = f"{source} row {row.get('id', i)}: {e}"
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

    The defense terms are logged next to the loss as ``ce``, ``kl``, ``ldifs`` (means
    over the micro-batches since the previous log line).
    """

    def __init__(self, *args, defenses=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.defenses = defenses
        self.loss_is_scaled_for_ga = True
        self._term_sums: dict[str, float] = {}
        self._term_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kl = self.defenses.kl if self.defenses else None
        ldifs = self.defenses.ldifs if self.defenses else None
        if (num_items_in_batch is not None and self.args.average_tokens_across_devices
                and self.args.world_size > 1):
            # Trainer counts assistant tokens over all ranks; DDP then averages gradients over
            # ranks. Dividing by (global count / world size) makes the step the exact token mean.
            num_items_in_batch = num_items_in_batch / self.args.world_size
        terms = defended_loss(model, inputs, kl=kl, ldifs=ldifs, num_items=num_items_in_batch,
                              accumulation_steps=self.current_gradient_accumulation_steps,
                              peft_model=self.accelerator.unwrap_model(model))
        if model.training:
            for name in ("ce", "kl", "ldifs"):
                value = getattr(terms, name)
                if value is not None:
                    self._term_sums[name] = self._term_sums.get(name, 0.0) + float(value)
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


def training_arguments(cfg: RunConfig, run_dir: Path, device: str) -> TrainingArguments:
    t = cfg.train
    cuda = device.startswith("cuda")
    precision = t.precision if t.precision != "auto" else ("bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32")
    optim = t.optimizer
    if optim == "auto":
        optim = "adamw_8bit" if cuda and _has_bitsandbytes() else "adamw_torch"
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
        optim="adamw_bnb_8bit" if optim == "adamw_8bit" else "adamw_torch",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=1,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",  # order fixed by our seeded shuffle + interleave
        activation_checkpointing=t.gradient_checkpointing,
        use_cpu=not cuda,
        disable_tqdm=False,
    )


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


# ---------------------------------------------------------------------------- recipe


def train(cfg: RunConfig | str | Path, overrides: list[str] = (), force: bool = False,
          callbacks: list | None = None) -> TrainResult:
    """Train one run into ``cfg.output_dir``; skip if complete, resume if interrupted.

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects (loggers, early stops).
    """
    if not isinstance(cfg, RunConfig):
        cfg = load_run_config(cfg, overrides)
    run_dir = Path(cfg.output_dir)
    config_text = dump_run_config(cfg)
    main = is_main_process()  # in distributed runs only rank 0 writes the run folder
    if not _claim_run_dir(run_dir, config_text, force, check=main):
        return TrainResult(run_dir, read_json(run_dir / "summary.json"), skipped=True)
    if main:
        write_text_atomic(run_dir / "config.yaml", config_text)
        write_json_atomic(run_dir / "provenance.json", provenance())

    set_seed(cfg.train.seed)
    device = default_device()
    model, tokenizer = load_model(cfg.model, device=device, dtype=torch.float32 if device == "cpu" else None,
                                  trust_remote_code=cfg.trust_remote_code)
    rows, data_report = prepare_rows(cfg)
    features, too_long = tokenize_rows(rows, tokenizer, cfg.data.max_length,
                                       cfg.data.skip_invalid, data_report["source"])
    data_report.update(tokenized=len(features), skipped_over_length=too_long)
    if not features:
        raise ChatDataError(f"{data_report['source']}: no trainable rows left")
    if main:
        write_json_atomic(run_dir / "data_report.json", data_report)

    model.train()
    model = attach_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                        use_rslora=cfg.lora.use_rslora, targets=cfg.lora.targets)
    trainer = DefendedTrainer(
        model=model, args=training_arguments(cfg, run_dir, device), train_dataset=features,
        data_collator=ChatCollator(tokenizer.pad_token_id), defenses=cfg.defenses,
        callbacks=callbacks,
    )
    started = time.time()
    last = _last_checkpoint(run_dir / "checkpoints")
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    elapsed = time.time() - started
    if not main:
        return TrainResult(run_dir, {"steps": result.global_step, "rank": os.environ.get("RANK")},
                           skipped=False)

    with atomic_dir(run_dir / "adapter") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    log = [e for e in trainer.state.log_history if "loss" in e]
    write_jsonl_atomic(run_dir / "train_log.jsonl", log)
    summary = _summary(cfg, log, result, elapsed, len(features), bool(last))
    if cfg.defenses.safelora is not None:
        summary["safelora"] = _apply_safelora(cfg, run_dir)
    write_json_atomic(run_dir / "summary.json", summary)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return TrainResult(run_dir, summary, skipped=False)


def _claim_run_dir(run_dir: Path, config_text: str, force: bool, check: bool = True) -> bool:
    """False if the run is already complete with this config; error if it holds another config.

    ``check=False`` (non-main ranks) only looks for completion; rank 0 owns the folder."""
    saved = run_dir / "config.yaml"
    if not check:
        return not (run_dir / "summary.json").is_file()
    if saved.is_file() and saved.read_text(encoding="utf-8") != config_text:
        if not force:
            raise RunConflictError(
                f"{run_dir} holds a run with a different config ({saved}); choose another "
                "output_dir or pass --force to discard it")
        shutil.rmtree(run_dir)
    elif force and run_dir.exists():
        shutil.rmtree(run_dir)
    return not (run_dir / "summary.json").is_file()


def _last_checkpoint(ckpt_dir: Path) -> Path | None:
    if not ckpt_dir.is_dir():
        return None
    ckpts = sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir()),
                   key=lambda p: int(p.name.split("-")[-1]))
    return ckpts[-1] if ckpts else None


def _summary(cfg: RunConfig, log: list[dict], result, elapsed: float, n_rows: int, resumed: bool) -> dict:
    first, last = (log[0], log[-1]) if log else ({}, {})
    return {
        "model": cfg.model,
        "train_rows": n_rows,
        "steps": result.global_step,
        "train_seconds": round(elapsed, 2),
        "resumed_from_checkpoint": resumed,
        "first_loss": first.get("loss"), "last_loss": last.get("loss"),
        "first_ce": first.get("ce"), "last_ce": last.get("ce"),
        "last_kl": last.get("kl"), "last_ldifs": last.get("ldifs"),
        "defenses": [name for name in ("kl", "ldifs", "interleave", "safelora")
                     if getattr(cfg.defenses, name) is not None],
        "kl": cfg.defenses.kl.model_dump() if cfg.defenses.kl else None,
        "adapter": "adapter",
    }


def _apply_safelora(cfg: RunConfig, run_dir: Path) -> dict:
    from emguard.defenses.safelora import apply_safelora

    s = cfg.defenses.safelora
    report = apply_safelora(run_dir / "adapter", run_dir / "adapter_safelora",
                            aligned=s.aligned or cfg.model, unaligned=s.unaligned, tau=s.tau)
    return {"adapter": "adapter_safelora", "tau": s.tau,
            "share_projected": getattr(report, "share_projected", None)}
