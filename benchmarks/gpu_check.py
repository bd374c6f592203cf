"""Device check: the whole GPU path on a machine without hub access, in a few minutes.

Builds a random-initialised model of a real shape with the embedded tokenizer (no
download), then runs the CLI as a user would and records every stage:

  1. emguard train   plain SFT on builtin:insecure-code        -> the "misaligned" adapter
  2. emguard train   KL + LDIFS + interleave + SafeLoRA (all defenses, unaligned = 1.)
  3. emguard safelora  the defended adapter, from the command line
  4. emguard eval    judge-free measures, the local digit-tree judge, OpSwap tier 1
  5. bench_train_step.py at --bench-shape (default Qwen2.5-7B) in bf16, per --bench-seq
  6. bench_generate.py at --gen-shape (default Qwen2.5-0.5B, issue 13's reference) in bf16:
     the old generation path against merged / batch-64 decoding and the sampler's share

and writes one JSON (--out/gpu_check.json): versions, device, per stage the command,
exit code, seconds and a summary (or the error's last lines), and the step-cost table.
On CPU, ``--shape tiny --bench-shape tiny`` runs the same path in about a minute (a test
does). See docs/benchmarks.md for how to run it on a GPU and the numbers recorded there.

    python benchmarks/gpu_check.py --out runs/gpu_check                       # GPU
    python benchmarks/gpu_check.py --shape tiny --bench-shape tiny --out /tmp/gc  # CPU
    python benchmarks/gpu_check.py --export-tokenizer .gpu_assets/tokenizer   # to carry
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def versions() -> dict:
    from importlib import metadata

    import torch

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "emguard"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    out["bf16_supported"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return out


def stage(name: str, cmd: list[str], log_dir: Path, results: dict, env: dict) -> bool:
    """Run one CLI stage; record command, exit code, seconds, and its log's tail on failure."""
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    log = log_dir / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    entry = {"cmd": cmd, "rc": rc, "seconds": round(time.perf_counter() - start, 2)}
    if rc != 0:
        entry["error_tail"] = log.read_text(errors="replace")[-3000:]
        print(entry["error_tail"], flush=True)
    results["stages"][name] = entry
    print(f"   rc={rc} in {entry['seconds']} s", flush=True)
    return rc == 0


def read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    ap.add_argument("--shape", default="qwen2.5-0.5b", help="model of the pipeline stages")
    ap.add_argument("--bench-shape", default="qwen2.5-7b", help="model of the step benchmark")
    ap.add_argument("--bench-seq", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--bench-batch", type=int, default=4)
    ap.add_argument("--bench-steps", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--gen-shape", default="qwen2.5-0.5b", help="model of the generation benchmark")
    ap.add_argument("--gen-answers", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the embedded one)")
    ap.add_argument("--export-tokenizer", type=Path, help="only save the embedded tokenizer here")
    a = ap.parse_args()

    from shapes import export_tokenizer, save_random_model

    if a.export_tokenizer:
        print(f"tokenizer saved to {export_tokenizer(a.export_tokenizer)}")
        return
    import torch

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.out / "work"
    if work.exists():  # our own scratch folder from an earlier check
        shutil.rmtree(work)
    work.mkdir()
    results: dict = {"versions": versions(), "settings": {k: str(v) for k, v in vars(a).items()},
                     "stages": {}}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "EMGUARD_CACHE": str(work / "cache")}
    emguard = [sys.executable, "-m", "emguard.cli"]

    start = time.perf_counter()
    model = save_random_model(work / "model", a.shape, dtype, "cuda" if cuda else "cpu", a.tokenizer)
    if cuda:
        torch.cuda.empty_cache()
    results["stages"]["build_model"] = {"shape": a.shape, "dtype": str(dtype),
                                        "seconds": round(time.perf_counter() - start, 2), "rc": 0}
    common = [f"model={model}", "data.train=builtin:insecure-code", "data.max_length=1024",
              f"train.max_steps={a.train_steps}", "train.batch_size=4", "train.grad_accum=1",
              "train.save_steps=1000", "train.logging_steps=1"]
    mis, defended = work / "misaligned", work / "defended"
    ok = stage("train_sft", [*emguard, "train", *common, f"output_dir={mis}"], work, results, env)
    ok = ok and stage("train_all_defenses", [
        *emguard, "train", *common, f"output_dir={defended}", "defenses.kl.weight=0.1",
        "defenses.ldifs.weight=1.0", "defenses.interleave.fraction=0.05",
        f"defenses.safelora.unaligned={mis / 'adapter'}", "defenses.safelora.tau=0.3",
    ], work, results, env)
    if ok:
        for name, run in (("train_sft", mis), ("train_all_defenses", defended)):
            results["stages"][name]["summary"] = read(run / "summary.json")
            results["stages"][name]["log"] = [json.loads(line) for line in
                                              (run / "train_log.jsonl").read_text().splitlines()]
        ok = stage("safelora", [*emguard, "safelora", "--adapter", str(defended / "adapter"),
                                "--aligned", str(model), "--unaligned", str(mis / "adapter"),
                                "--out", str(work / "safelora_cli"), "--quiet"], work, results, env)
        if ok:
            report = read(work / "safelora_cli" / "safelora_report.json")
            results["stages"]["safelora"]["share_projected"] = report.get("share_projected")
        ok = stage("eval", [
            *emguard, "eval", "--model", str(model), "--adapter", str(defended / "adapter"),
            "--questions", "builtin:general-questions", "max_questions=3", "--samples", "2",
            "max_new_tokens=32", "drift_max_new_tokens=16", "--judge", f"local:{model}",
            f"judge_cache={work / 'judge.sqlite'}", "--task", "opswap:1",
            "task_questions=4", "task_samples=2", "--out", str(work / "eval"),
        ], work, results, env) and ok
        if (work / "eval" / "metrics.json").is_file():
            m = read(work / "eval" / "metrics.json")
            results["stages"]["eval"]["metrics"] = {k: m.get(k) for k in
                                                    ("n_generations", "judge", "llm_judge",
                                                     "judge_free", "tasks")}

    results["bench"] = {}
    for seq in a.bench_seq:
        out = work / f"bench_seq{seq}.json"
        cmd = [sys.executable, str(HERE / "bench_train_step.py"), "--shape", a.bench_shape,
               "--dtype", "bf16" if cuda else "fp32", "--seq", str(seq),
               "--batch", str(a.bench_batch), "--steps", str(a.bench_steps), "--out", str(out)]
        if stage(f"bench_seq{seq}", cmd, work, results, env):
            results["bench"][str(seq)] = read(out)
    out = work / "bench_generate.json"
    cmd = [sys.executable, str(HERE / "bench_generate.py"), "--shape", a.gen_shape,
           "--dtype", "bf16" if cuda else "fp32", "--answers", str(a.gen_answers),
           "--tokens", str(a.gen_tokens), "--out", str(out)]
    if a.tokenizer:
        cmd += ["--tokenizer", str(a.tokenizer)]
    if stage("bench_generate", cmd, work, results, env):
        results["generate"] = read(out)
    results["ok"] = all(s.get("rc") == 0 for s in results["stages"].values())
    (a.out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {a.out / 'gpu_check.json'}; all stages ok: {results['ok']}")
    sys.exit(0 if results["ok"] else 1)


if __name__ == "__main__":
    main()
