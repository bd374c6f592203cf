"""Plain SFT throughput: emguard's trainer against TRL's ``SFTTrainer`` (completion-only
loss) on the same model, rows, row order, batch, rs-LoRA adapter, optimizer and steps.

Each side runs in its own subprocess: emguard through ``emguard.train.train`` (the path a
user runs, run folder included), TRL through ``SFTTrainer`` with the same rows given as
prompt/completion conversations (TRL's completion-only loss, the equivalent of emguard's
assistant-only labels). Timed: the optimizer steps after the first ``--skip`` (warm-up),
by the same TrainerCallback on both sides. Tokens per step are the padded batch's real
tokens (prompt + answer), identical on both sides when the tokenisations agree, which the
JSON records (first-step loss of each side, which must agree too). DESIGN §8 target:
emguard tokens/s >= TRL's (ratio >= 1.0).

    python benchmarks/bench_trl.py               # embedded SmolLM2-135M-Instruct
    python benchmarks/bench_trl.py --quick       # tiny random model, seconds
Needs TRL: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def step_timer():
    """A TrainerCallback recording the wall time at the end of every optimizer step in
    ``.ends`` (built on call, so the parent process never imports transformers)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepTimer()


def run_config(model: str, steps: int, batch: int, out: Path):
    from emguard.config import load_run_config

    return load_run_config(None, [f"model={model}", f"output_dir={out}",
                                  "data.train=builtin:insecure-code", f"train.max_steps={steps}",
                                  f"train.batch_size={batch}", "train.grad_accum=1",
                                  f"train.save_steps={steps + 100}", "train.precision=fp32",
                                  "train.optimizer=adamw_torch"])


def child(side: str, model: str, steps: int, batch: int, skip: int) -> dict:
    import torch

    from emguard.models import load_tokenizer
    from emguard.train import prepare_rows, tokenize_rows

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_config(model, steps, batch, Path(tmp) / "run")
        rows, _, _ = prepare_rows(cfg)
        tok = load_tokenizer(model)
        features, _ = tokenize_rows(rows, tok, cfg.data.max_length, False, "bench")
        timer = step_timer()
        first_loss = (_emguard(cfg, timer) if side == "emguard"
                      else _trl(cfg, rows, tok, timer))
    seen = features[skip * batch:steps * batch]
    tokens = sum(len(f["input_ids"]) for f in seen)
    sec = timer.ends[-1] - timer.ends[skip - 1]
    return {"side": side, "steps_timed": steps - skip, "tokens": tokens, "seconds": sec,
            "tokens_per_s": tokens / sec, "first_loss": first_loss}


def _emguard(cfg, timer) -> float:
    from emguard.train import train

    result = train(cfg, callbacks=[timer])
    log = [json.loads(line) for line in (result.run_dir / "train_log.jsonl").read_text().splitlines()]
    return log[0]["loss"]


def _trl(cfg, rows: list[dict], tok, timer) -> float:
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from emguard.models import attach_lora, load_model

    set_seed(cfg.train.seed)  # as emguard's train(): same LoRA initialisation
    model, _ = load_model(cfg.model, device="cpu")
    model.train()
    model = attach_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                        use_rslora=cfg.lora.use_rslora, targets=cfg.lora.targets)
    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}
                              for r in rows])
    t = cfg.train
    args = SFTConfig(output_dir=str(Path(cfg.output_dir).parent / "trl"), max_steps=t.max_steps,
                     per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=1,
                     learning_rate=t.learning_rate, warmup_steps=t.warmup_steps,
                     weight_decay=t.weight_decay, lr_scheduler_type=t.scheduler, seed=t.seed,
                     data_seed=t.seed, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True, max_length=cfg.data.max_length, completion_only_loss=True,
                     packing=False, train_sampling_strategy="sequential",
                     # TRL defaults to these two; emguard's run (and a fair peer) uses neither
                     gradient_checkpointing=t.gradient_checkpointing, bf16=False,
                     dataloader_num_workers=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         callbacks=[timer])
    trainer.train()
    return next(e["loss"] for e in trainer.state.log_history if "loss" in e)


def run(args: argparse.Namespace) -> dict:
    if importlib.util.find_spec("trl") is None:
        print("TRL is not installed: pip install -e '.[bench]'  (skipped)")
        return {"skipped": "trl not installed"}
    import trl

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.shape:
            import torch
            from shapes import save_random_model

            model = str(save_random_model(Path(tmp) / "model", args.shape, torch.float32, "cpu"))
        rows = {}
        for side in ("emguard", "trl"):
            cmd = [sys.executable, __file__, "--child", side, "--model", model, "--steps",
                   str(args.steps), "--batch", str(args.batch), "--skip", str(args.skip)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
            rows[side] = json.loads(out.stdout.strip().splitlines()[-1])
            r = rows[side]
            print(f"  {side:<8}{r['tokens_per_s']:>10.1f} tokens/s  ({r['steps_timed']} steps, "
                  f"{r['seconds']:.1f} s, first loss {r['first_loss']:.4f})", flush=True)
    checks = {"emguard_vs_trl_tokens_per_s": rows["emguard"]["tokens_per_s"] / rows["trl"]["tokens_per_s"],
              "first_loss_abs_diff": abs(rows["emguard"]["first_loss"] - rows["trl"]["first_loss"])}
    return {"trl_version": trl.__version__, "rows": rows, "checks": checks}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shape", help="random model of this shape (benchmarks/shapes.py) instead")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps not timed")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="tiny random model, 6 steps")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "trl.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.steps, args.batch, args.skip)))
        return {}
    if args.quick:
        args.shape, args.steps = "tiny", 6
    print(f"SFT throughput vs TRL SFTTrainer: {args.shape or args.model}, batch {args.batch}, "
          f"{args.steps} steps ({args.skip} untimed)")
    result = run(args)
    for k, v in result.get("checks", {}).items():
        print(f"  {k}: {v:.4f}")
    from record import write_result

    return write_result(args.out, "trl", args, result)


if __name__ == "__main__":
    main()
