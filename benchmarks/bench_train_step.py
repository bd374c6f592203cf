"""Training-step cost of each defense, as ratios to plain SFT measured in one run.

Each configuration runs in its own subprocess (fresh peak-RSS counter): load the model,
attach rs-LoRA, run warm-up steps, then time `--steps` optimizer steps of forward +
backward + AdamW on the same fixed batch, each alone. Reported: seconds per step (the
fastest timed step, since noise on a shared machine only adds time; the mean is kept as
``mean_sec_per_step``), peak RSS, and the
ratios to SFT; DESIGN §8 targets: KL/SFT and LDIFS/SFT close to one extra no-grad forward,
KL+LDIFS <= KL * 1.10, peak memory with KL <= SFT * 1.15. "kl_unchunked" (one log-softmax
over all positions) shows what chunking saves. "kl_naive" is the common public approach
(TRL's ref_model pattern): a second full frozen copy of the model and the KL over the full
(B, T, V) logits of both, written as one would by hand; issue 13's peer for KL.

    python benchmarks/bench_train_step.py                 # tiny-but-wide model, fast
    python benchmarks/bench_train_step.py --embedded      # SmolLM2-135M-Instruct
    python benchmarks/bench_train_step.py --shape qwen2.5-7b --dtype bf16 --seq 512   # GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

from record import settings_of

CONFIGS = ["sft", "kl", "ldifs", "kl+ldifs", "kl_unchunked", "kl_naive", "forward_only"]
RESULTS = Path(__file__).parent / "results" / "train_step.json"


def child(config: str, embedded: bool, steps: int, batch: int, seq: int, shape: str | None = None,
          dtype: str = "fp32", chunk_size: int = 1024, warmup: int = 2) -> dict:
    import resource

    import torch

    from emguard.defenses.kl import KLSettings
    from emguard.defenses.ldifs import LDIFSSettings
    from emguard.defenses.registry import DefenseSettings, active_defenses
    from emguard.loss import defended_loss
    from emguard.models import attach_lora, load_model

    torch.manual_seed(0)
    torch.set_num_threads(2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if embedded:
        model, _ = load_model("smollm2-135m", device=device, dtype=torch_dtype)
    elif shape:  # random weights of a real architecture's shape, created on the device
        sys.path.insert(0, str(Path(__file__).parent))
        from shapes import random_model

        model = random_model(shape, torch_dtype, device)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=768,
                                             num_hidden_layers=10, num_attention_heads=4,
                                             num_key_value_heads=2))
    model = model.to(device)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if config == "kl_naive" else None
    model = attach_lora(model)
    model.train()
    vocab = model.get_base_model().config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # second half = "assistant" tokens
    batch_in = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    kl = KLSettings(weight=0.1, chunk_size=10**9 if config == "kl_unchunked" else chunk_size)
    kwargs = {"sft": {}, "kl": {"kl": kl}, "kl_unchunked": {"kl": kl},
              "ldifs": {"ldifs": LDIFSSettings(weight=1.0)},
              "kl+ldifs": {"kl": kl, "ldifs": LDIFSSettings(weight=1.0)}, "forward_only": {},
              "kl_naive": {}}[config]
    terms = active_defenses(DefenseSettings(**kwargs))
    for term in terms:
        term.prepare(model, None)  # LDIFS resolves its layers on this model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def naive_kl_loss():
        """CE + 0.1 * KL(p_theta || p_ref) per assistant token, from full (B, T, V) logits."""
        logits = model(input_ids=ids, attention_mask=batch_in["attention_mask"]).logits
        with torch.no_grad():
            ref_logits = ref(input_ids=ids, attention_mask=batch_in["attention_mask"]).logits
        target = labels[:, 1:]
        mask = target != -100
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(),
                                               ignore_index=-100)
        logp = logits[:, :-1].float().log_softmax(-1)
        logq = ref_logits[:, :-1].float().log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T-1)
        return ce + 0.1 * kl[mask].mean()

    def step():
        if config == "kl_naive":
            opt.zero_grad()
            naive_kl_loss().backward()
            opt.step()
            return
        if config == "forward_only":  # the cost of one extra no-grad reference forward
            with torch.no_grad(), model.disable_adapter():
                model(input_ids=ids, attention_mask=batch_in["attention_mask"])
            return
        opt.zero_grad()
        defended_loss(model, batch_in, terms=terms).total.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):  # each step timed alone: on a shared machine noise only adds time
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    # CPU: peak RSS of the process (includes the runtime); CUDA: peak allocated tensor memory
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"config": config, "device": device, "sec_per_step": min(times),
            "mean_sec_per_step": sum(times) / steps, "peak_rss_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedded", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--shape", help="random weights of a real shape (benchmarks/shapes.py), "
                                    "e.g. qwen2.5-7b")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--chunk-size", type=int, default=1024, help="KL positions per chunk")
    ap.add_argument("--out", type=Path, help="result JSON (default: benchmarks/results/...)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["ldifs", "kl+ldifs", "kl_unchunked", "kl_naive"],
                    help="leave out these configs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.embedded, a.steps, a.batch, a.seq, a.shape, a.dtype,
                               a.chunk_size, a.warmup)))
        return
    result = run_all(a)
    out = a.out or RESULTS.with_name(f"train_step{'_embedded' if a.embedded else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def run_all(a: argparse.Namespace) -> dict:
    """Every config in its own subprocess; print the table; return rows + checks."""
    rows = []
    for config in [c for c in CONFIGS if c not in a.skip]:
        cmd = [sys.executable, __file__, "--child", config, "--steps", str(a.steps),
               "--warmup", str(a.warmup),
               "--batch", str(a.batch), "--seq", str(a.seq), "--dtype", a.dtype,
               "--chunk-size", str(a.chunk_size)]
        cmd += (["--embedded"] if a.embedded else []) + (["--shape", a.shape] if a.shape else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    by = {r["config"]: r for r in rows}
    sft, kl = by["sft"], by["kl"]
    for r in rows:
        r["time_vs_sft"] = r["sec_per_step"] / sft["sec_per_step"]
        r["rss_vs_sft"] = r["peak_rss_mb"] / sft["peak_rss_mb"]
    checks = {
        "extra_forward_share_of_sft_step": by["forward_only"]["sec_per_step"] / sft["sec_per_step"],
        "kl_overhead_minus_one_forward": (kl["sec_per_step"] - sft["sec_per_step"]
                                          - by["forward_only"]["sec_per_step"]) / sft["sec_per_step"],
        "kl_peak_rss_vs_sft": kl["peak_rss_mb"] / sft["peak_rss_mb"],
    }
    if "kl+ldifs" in by:
        checks["kl+ldifs_vs_kl"] = by["kl+ldifs"]["sec_per_step"] / kl["sec_per_step"]
    if "kl_naive" in by:
        naive = by["kl_naive"]
        checks["kl_time_vs_naive_kl"] = kl["sec_per_step"] / naive["sec_per_step"]
        checks["kl_peak_vs_naive_kl"] = kl["peak_rss_mb"] / naive["peak_rss_mb"]
        checks["kl_extra_peak_vs_naive_extra_peak"] = (
            (kl["peak_rss_mb"] - sft["peak_rss_mb"]) / max(naive["peak_rss_mb"] - sft["peak_rss_mb"], 1e-9))
    if "kl_unchunked" in by:
        checks["unchunked_kl_peak_rss_vs_chunked"] = by["kl_unchunked"]["peak_rss_mb"] / kl["peak_rss_mb"]
    print(f"{'config':<14}{'s/step':>10}{'x SFT':>8}{'peak RSS MB':>14}{'x SFT':>8}")
    for r in rows:
        print(f"{r['config']:<14}{r['sec_per_step']:>10.3f}{r['time_vs_sft']:>8.2f}"
              f"{r['peak_rss_mb']:>14.0f}{r['rss_vs_sft']:>8.2f}")
    for k, v in checks.items():
        print(f"{k}: {v:.3f}")
    settings = settings_of(a)
    return {"settings": settings, "rows": rows, "checks": checks}


if __name__ == "__main__":
    main()
