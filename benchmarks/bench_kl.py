"""KL term alone: closed-form backward (emguard) vs autograd through checkpointed chunks.

Both compute the same per-token KL over (N, V) logits in chunks of positions and keep
only the logits between forward and backward. The baseline is what emguard used before
(and what a plain PyTorch implementation does): ``torch.utils.checkpoint`` per chunk,
whose backward recomputes the chunk's forward graph and differentiates it op by op.
Reported: seconds for forward + backward, and the ratio, measured in one run.

    python benchmarks/bench_kl.py                    # N=1024, V=49152 (SmolLM2 vocabulary)
    python benchmarks/bench_kl.py --vocab 152064 --device cuda --dtype bf16   # Qwen2.5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from record import settings_of
from torch.utils.checkpoint import checkpoint

from emguard.defenses.kl import kl_per_token

RESULTS = Path(__file__).parent / "results" / "kl.json"


def _chunk(policy: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    logp, logq = F.log_softmax(policy.float(), -1), F.log_softmax(ref.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def checkpointed_kl(policy: torch.Tensor, ref: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([checkpoint(_chunk, policy[s:s + chunk], ref[s:s + chunk], use_reentrant=False)
                      for s in range(0, policy.shape[0], chunk)])


def timed(fn, policy, ref, repeats: int, device: str) -> float:
    def once():
        p = policy.detach().requires_grad_(True)
        fn(p, ref).sum().backward()
        return p.grad

    once()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    g = torch.Generator().manual_seed(0)
    policy = (torch.randn(a.positions, a.vocab, generator=g) * 3).to(a.device, dtype)
    ref = (torch.randn(a.positions, a.vocab, generator=g) * 3).to(a.device, dtype)
    p1, p2 = policy.detach().requires_grad_(True), policy.detach().requires_grad_(True)
    kl_per_token(p1, ref, chunk_size=a.chunk).sum().backward()
    checkpointed_kl(p2, ref, a.chunk).sum().backward()
    max_grad_diff = float((p1.grad.float() - p2.grad.float()).abs().max())
    rows = {
        "closed_form": timed(lambda p, r: kl_per_token(p, r, chunk_size=a.chunk), policy, ref,
                             a.repeats, a.device),
        "checkpointed_autograd": timed(lambda p, r: checkpointed_kl(p, r, a.chunk), policy, ref,
                                       a.repeats, a.device),
    }
    ratio = rows["closed_form"] / rows["checkpointed_autograd"]
    print(f"{'implementation':<24}{'s fwd+bwd':>12}")
    for name, sec in rows.items():
        print(f"{name:<24}{sec:>12.4f}")
    print(f"closed_form / checkpointed: {ratio:.3f}   max |grad difference|: {max_grad_diff:.2e}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    settings = settings_of(a)
    a.out.write_text(json.dumps({"settings": settings, "seconds": rows, "ratio": ratio,
                                 "max_grad_diff": max_grad_diff}, indent=2) + "\n")


if __name__ == "__main__":
    main()
