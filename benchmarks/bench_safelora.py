"""SafeLoRA at Qwen2.5-7B shapes: our factored projection vs the dense formula C = V V^T / ||V||^2.

Per layer type (q, k, v, o, gate, up, down; r = 32, rs-LoRA alpha 64) the factored step runs in a
fresh subprocess; the dense formula runs for two layers only (q_proj and one MLP layer, gate_proj,
whose C is 18944^2 floats = 1.4 GB): 82 GB of dense C for the whole model does not fit here.

Measured: wall time (one thread by default, the same for both sides), extra peak memory beyond
the inputs (A, B, V) as ru_maxrss after the step minus RSS before it (torch allocations are
invisible to tracemalloc), the analytic bytes of the dense C, and the max relative difference
max|x - ref| / max|ref| of C W against the dense fp32 result and against a float64 reference.

    python benchmarks/bench_safelora.py [--threads 1] [--skip-dense-mlp]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, KV, LAYERS, RANK, ALPHA = 3584, 18944, 512, 28, 32, 64
SHAPES = {  # (d_out, d_in) of Qwen2.5-7B's LoRA targets
    "q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN), "gate_proj": (INTERMEDIATE, HIDDEN),
    "up_proj": (INTERMEDIATE, HIDDEN), "down_proj": (HIDDEN, INTERMEDIATE),
}
DENSE_LAYERS = ("q_proj", "gate_proj")
RESULTS = Path(__file__).parent / "results" / "safelora.json"


def _inputs(layer: str):
    """Deterministic A (r, d_in), B (d_out, r), V (d_out, d_in), float32, scaled like real weights."""
    import torch

    d_out, d_in = SHAPES[layer]
    g = torch.Generator().manual_seed(sum(map(ord, layer)))
    A = torch.randn(RANK, d_in, generator=g).mul_(1 / math.sqrt(d_in))  # in place: no temporaries
    B = torch.randn(d_out, RANK, generator=g).mul_(0.01)
    V = torch.randn(d_out, d_in, generator=g).mul_(0.002)
    return A, B, V, ALPHA / math.sqrt(RANK)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so earlier transients do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _factored(A, B, V, scale):
    from emguard.defenses.safelora import project_lora_pair

    B_new, cos, _ = project_lora_pair(A, B, V, scale, tau=1.0)  # tau=1: always project
    return B_new, cos


def _dense(A, B, V, scale):
    """The paper's formula with C formed: (C W (d_out, d_in), cosine)."""
    import torch

    from emguard.defenses.safelora import sq_frobenius  # fp32 vector_norm is ~1 % off here

    W = scale * B @ A
    C = V @ V.T / sq_frobenius(V)
    CW = C @ W
    cos = float((W * CW).sum(dtype=torch.float64) / math.sqrt(sq_frobenius(W) * sq_frobenius(CW)))
    return CW, cos


def _float64_reference(A, B, V, scale):
    """C W in float64 via the factored identity (exact algebra; no C)."""
    A, B, V = A.double(), B.double(), V.double()
    return scale * (V @ (V.T @ B)) @ A / (V * V).sum()


def _rel(x, ref) -> float:
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max())


def worker(method: str, layer: str, threads: int) -> dict:
    """Run one method on one layer in this (fresh) process; return its measurements."""
    import torch

    torch.set_num_threads(threads)
    A, B, V, scale = _inputs(layer)
    _factored(A[:, :8], B[:8], V[:8, :8], scale)  # load BLAS / lazy modules outside the timing
    peak_reset = _reset_peak()
    before = _rss()
    start = time.perf_counter()
    out, cos = (_factored if method == "factored" else _dense)(A, B, V, scale)
    seconds = time.perf_counter() - start
    row = {"method": method, "layer": layer, "shape": SHAPES[layer], "seconds": seconds,
           "extra_peak_bytes": max(0, _peak() - before), "peak_reset": peak_reset, "cosine": cos}
    if method == "dense":
        B_new, cos_f = _factored(A, B, V, scale)
        ours = scale * B_new @ A
        ref64 = _float64_reference(A, B, V, scale)
        row.update(rel_diff_factored_vs_dense=_rel(ours, out), cos_abs_diff=abs(cos_f - cos),
                   rel_diff_factored_vs_float64=_rel(ours, ref64),
                   rel_diff_dense_vs_float64=_rel(out, ref64))
    return row


def _spawn(method: str, layer: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, layer, "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{method}/{layer} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(threads: int, skip_dense_mlp: bool, out: Path = RESULTS,
         layers: list[str] | None = None) -> dict:
    from tqdm import tqdm

    from emguard.io import provenance, write_json_atomic

    dense_layers = [x for x in DENSE_LAYERS if not (skip_dense_mlp and x == "gate_proj")]
    layers = layers or list(SHAPES)
    jobs = ([("factored", layer) for layer in layers]
            + [("dense", layer) for layer in dense_layers if layer in layers])
    rows = [_spawn(m, layer, threads) for m, layer in tqdm(jobs, desc="bench_safelora")]
    factored = {r["layer"]: r for r in rows if r["method"] == "factored"}
    comparisons = []
    for dense in (r for r in rows if r["method"] == "dense"):
        ours = factored[dense["layer"]]
        d_out = dense["shape"][0]
        comparisons.append({
            "layer": dense["layer"], "shape": dense["shape"],
            "factored_seconds": ours["seconds"], "dense_seconds": dense["seconds"],
            "time_ratio_dense_over_factored": dense["seconds"] / ours["seconds"],
            "factored_extra_peak_bytes": ours["extra_peak_bytes"],
            "dense_extra_peak_bytes": dense["extra_peak_bytes"],
            "memory_ratio_dense_over_factored": dense["extra_peak_bytes"] / max(ours["extra_peak_bytes"], 1),
            "dense_C_bytes_analytic": 4 * d_out * d_out,
            **{k: dense[k] for k in dense if k.startswith(("rel_diff", "cos_abs"))},
        })
    whole = None  # the whole-model estimate needs every layer type
    if len(factored) == len(SHAPES):
        whole = {"layers": LAYERS,
                 "factored_seconds_estimate": LAYERS * sum(r["seconds"] for r in factored.values()),
                 "dense_C_bytes_analytic": LAYERS * sum(4 * s[0] ** 2 for s in SHAPES.values())}
    result = {"benchmark": "safelora", "rank": RANK, "alpha": ALPHA, "threads": threads,
              "rows": rows, "comparisons": comparisons, "whole_model": whole, "provenance": provenance()}
    write_json_atomic(out, result)
    _print(factored, comparisons, whole, out)
    return result


def _print(factored: dict, comparisons: list[dict], whole: dict | None, out: Path) -> None:
    mib = 2**20
    print(f"\nfactored SafeLoRA step, Qwen2.5-7B shapes, r={RANK}")
    print(f"{'layer':<10} {'d_out x d_in':>14} {'seconds':>9} {'extra MiB':>10}")
    for layer, r in factored.items():
        print(f"{layer:<10} {r['shape'][0]:>6} x {r['shape'][1]:<6} {r['seconds']:>9.4f} "
              f"{r['extra_peak_bytes'] / mib:>10.1f}")
    print("\nfactored vs dense C (same inputs, same threads)")
    print(f"{'layer':<10} {'t dense/ours':>12} {'mem dense/ours':>15} {'dense MiB':>10} "
          f"{'ours MiB':>9} {'rel diff':>9} {'ours vs f64':>11} {'dense vs f64':>12}")
    for c in comparisons:
        print(f"{c['layer']:<10} {c['time_ratio_dense_over_factored']:>12.1f} "
              f"{c['memory_ratio_dense_over_factored']:>15.1f} {c['dense_extra_peak_bytes'] / mib:>10.1f} "
              f"{c['factored_extra_peak_bytes'] / mib:>9.1f} {c['rel_diff_factored_vs_dense']:>9.1e} "
              f"{c['rel_diff_factored_vs_float64']:>11.1e} {c['rel_diff_dense_vs_float64']:>12.1e}")
    if whole is None:
        print(f"results: {out}")
        return
    print(f"\nwhole model ({whole['layers']} layers): factored ~{whole['factored_seconds_estimate']:.1f} s "
          f"(beside loading weights); dense C would need {whole['dense_C_bytes_analytic'] / 1e9:.1f} GB")
    print(f"results: {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-dense-mlp", action="store_true",
                        help="skip the 1.4 GB dense C of gate_proj (minutes on one thread)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--layers", nargs="*", choices=list(SHAPES), help="only these layer types")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "LAYER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, threads=args.threads)))
    else:
        main(args.threads, args.skip_dense_mlp, args.out, args.layers)
