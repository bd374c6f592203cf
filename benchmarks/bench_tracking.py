"""What experiment tracking costs a training step: TensorBoard on against off, in one run.

Trains the same short run (the embedded SmolLM2-135M-Instruct, or ``--tiny``) with
``train.report_to: []`` and ``[tensorboard]``, alternating, ``--repeats`` times each, with
a log line every step (tracking's worst case). A callback times every optimizer step; the
first ``--warmup`` steps of a run are left out. Reported per setting: the median and the
fastest step (noise on a shared machine only adds time), and the ratio on/off of the
medians. Issue 24's target: no measurable cost when off (off is the plain Trainer path),
and a small one when on.

    python benchmarks/bench_tracking.py [--steps 8] [--repeats 2] [--tiny]

Writes benchmarks/results/tracking.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_result  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "tracking.json"


def step_times(report_to: list[str], args, work: Path) -> list[float]:
    """Seconds per optimizer step of one fresh run (warm-up steps left out)."""
    from transformers import TrainerCallback

    from emguard.config import load_run_config
    from emguard.train import train

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.started = [], None

        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.started)

    out = work / f"run-{'-'.join(report_to) or 'off'}-{time.time_ns()}"
    model = args.tiny_dir if args.tiny else "smollm2-135m"
    cfg = load_run_config(None, [
        f"model={model}", f"output_dir={out}", "data.train=builtin:insecure-code",
        "data.max_length=512", "data.skip_invalid=true", f"train.max_steps={args.steps}",
        "train.batch_size=2",
        "train.grad_accum=1", "train.warmup_steps=0", "train.logging_steps=1",
        f"train.save_steps={args.steps + 1}", "defenses.kl.weight=1.0",
        f"train.report_to={report_to}".replace("'", "")])
    timer = Timer()
    train(cfg, callbacks=[timer])
    shutil.rmtree(out, ignore_errors=True)
    return timer.times[args.warmup:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.tiny:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from tiny import save_tiny_model

            args.tiny_dir = save_tiny_model(work / "tiny")
        times = {"off": [], "tensorboard": []}
        for _ in range(args.repeats):  # alternating: drift on the machine hits both alike
            times["off"] += step_times([], args, work)
            times["tensorboard"] += step_times(["tensorboard"], args, work)
    rows = {k: {"median_sec_per_step": statistics.median(v), "min_sec_per_step": min(v),
                "steps_timed": len(v)} for k, v in times.items()}
    ratio = rows["tensorboard"]["median_sec_per_step"] / rows["off"]["median_sec_per_step"]
    print("| report_to | median s/step | fastest s/step | steps timed |\n|---|---:|---:|---:|")
    for k, r in rows.items():
        print(f"| {k} | {r['median_sec_per_step']:.3f} | {r['min_sec_per_step']:.3f} | "
              f"{r['steps_timed']} |")
    print(f"\ntensorboard / off (medians): {ratio:.3f}")
    args.tiny_dir = str(getattr(args, "tiny_dir", ""))
    write_result(args.out, "tracking", args, {"rows": rows, "ratio_tensorboard_to_off": ratio,
                                              "model": "tiny" if args.tiny else "smollm2-135m"})


if __name__ == "__main__":
    main()
