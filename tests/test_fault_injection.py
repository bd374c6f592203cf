"""kill -9 at each stage of train -> safelora -> eval -> judge, then rerun: nothing finished
is lost and the result equals an uninterrupted run.

Each fault is a real SIGKILL of a real `emguard` CLI process, delivered from inside it at
a chosen point: the N-th call of a named function (mid-step, while the adapter is being
saved, before the summary, while SafeLoRA writes, between generation chunks, between
judge batches). The rerun and the uninterrupted reference run in this process.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from emguard.config import load_run_config
from emguard.io import read_json, read_jsonl
from emguard.train import train

KILL_AT = textwrap.dedent("""
    import importlib, os, signal, sys
    target, nth = sys.argv[1], int(sys.argv[2])
    module, _, attr = target.partition(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = 0

    def kill_on_nth_call(*args, **kwargs):
        global calls
        calls += 1
        if calls == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, kill_on_nth_call)
    from emguard.cli import app
    app(sys.argv[3:])
""")


def run_killed(target: str, nth: int, args: list[str], env_extra: dict | None = None) -> None:
    """Run ``emguard ARGS`` and SIGKILL it on the nth call of ``target`` (module:attr)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-c", KILL_AT, target, str(nth), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (target, proc.returncode, proc.stderr[-3000:])


def tensors(path: Path) -> dict:
    return load_file(path / "adapter_model.safetensors")


def same_tensors(a: dict, b: dict, tol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(
        float((a[k] - b[k]).abs().max()) <= tol * (1 + float(b[k].abs().max())) for k in a)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny import save_tiny_model

    root = tmp_path_factory.mktemp("faults")
    save_tiny_model(root / "model")
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(16)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def train_args(world: Path, out: Path, *extra: str) -> list[str]:
    return [f"model={world / 'model'}", f"data.train={world / 'train.jsonl'}", "data.max_length=128",
            "train.max_steps=6", "train.batch_size=2", "train.grad_accum=1",
            "train.learning_rate=3e-3", "train.warmup_steps=1", "train.save_steps=2",
            "lora.r=4", "lora.alpha=8", "defenses.kl.weight=0.1", f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def reference(world):
    return train(load_run_config(None, train_args(world, world / "reference"))).run_dir


@pytest.mark.parametrize("target, nth", [
    ("emguard.train:DefendedTrainer.compute_loss", 6),   # mid-training, after checkpoint-2
    ("emguard.train:atomic_dir", 1),                      # while the adapter is saved
    ("emguard.train:_summary", 1),                        # adapter saved, summary not yet
])
def test_train_killed_then_rerun_equals_uninterrupted(world, reference, tmp_path, target, nth):
    run = tmp_path / "run"
    run_killed(target, nth, ["train", *train_args(world, run)])
    assert not (run / "summary.json").exists()
    result = train(load_run_config(None, train_args(world, run)))
    log, ref_log = read_jsonl(run / "train_log.jsonl"), read_jsonl(reference / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 7)) and result.summary["steps"] == 6
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref_log], rel=1e-5)
    assert same_tensors(tensors(run / "adapter"), tensors(reference / "adapter"))


def test_safelora_killed_while_writing_then_rerun(world, reference, tmp_path):
    from emguard.defenses.safelora import apply_safelora

    args = ["--adapter", str(reference / "adapter"), "--aligned", str(world / "model"),
            "--unaligned", str(reference / "adapter"), "--tau", "0.9"]
    misaligned = train(load_run_config(None, train_args(world, tmp_path / "mis", "train.seed=4")))
    args[5] = str(misaligned.run_dir / "adapter")
    out = tmp_path / "projected"
    run_killed("emguard.defenses.safelora:save_file", 1,
               ["safelora", *args, "--out", str(out), "--quiet"])
    assert not out.exists()  # nothing half-written where the adapter belongs
    apply_safelora(reference / "adapter", out, aligned=str(world / "model"),
                   unaligned=args[5], tau=0.9, progress=False)
    apply_safelora(reference / "adapter", tmp_path / "uninterrupted", aligned=str(world / "model"),
                   unaligned=args[5], tau=0.9, progress=False)
    assert same_tensors(tensors(out), tensors(tmp_path / "uninterrupted"), tol=0)
    assert read_json(out / "safelora_report.json")["layers"] == \
        read_json(tmp_path / "uninterrupted" / "safelora_report.json")["layers"]


def eval_args(world: Path, adapter: Path, out: Path) -> list[str]:
    return ["eval", "--model", str(world / "model"), "--adapter", str(adapter), "--questions",
            "builtin:general-questions", "--samples", "10", "max_new_tokens=3",
            "batch_size=4", "judge_free=false", "--judge", f"local:{world / 'model'}",
            "--out", str(out)]


def run_eval_in_process(world: Path, adapter: Path, out: Path, cache: Path) -> dict:
    from emguard.evaluate import EvalPass, run_eval

    settings = EvalPass(questions="builtin:general-questions", judge=f"local:{world / 'model'}",
                        samples=10, max_new_tokens=3, batch_size=4, judge_free=False,
                        judge_cache=str(cache))
    return run_eval(str(world / "model"), adapter, settings, out, progress=False)


@pytest.mark.parametrize("target, nth", [
    ("emguard.generate:generate_items", 2),                        # one chunk of answers done
    ("emguard.judge.local_judge:LocalJudge.number_logprobs", 2),  # one batch of verdicts done
])
def test_eval_killed_then_rerun_keeps_finished_work(world, reference, tmp_path, target, nth):
    out, cache = tmp_path / "eval", tmp_path / "judge.sqlite"
    want = run_eval_in_process(world, reference / "adapter", tmp_path / "ref", tmp_path / "ref.sqlite")
    run_killed(target, nth, [*eval_args(world, reference / "adapter", out), f"judge_cache={cache}"])
    if "generate" in target:
        kept = read_jsonl(out / "generations.partial.jsonl")
        assert 0 < len(kept) < want["n_generations"]
    else:
        assert (out / "generations.jsonl").is_file() and cache.is_file()
        from emguard.judge.cache import JudgeCache

        assert len(JudgeCache(cache)) > 0  # verdicts judged before the kill were kept
    got = run_eval_in_process(world, reference / "adapter", out, cache)
    strip = ("gen_key",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in read_jsonl(out / "generations.jsonl")] \
        == [{k: v for k, v in r.items() if k not in strip} for r in read_jsonl(tmp_path / "ref" / "generations.jsonl")]
    assert read_jsonl(out / "judgments.jsonl") == read_jsonl(tmp_path / "ref" / "judgments.jsonl")
    assert got["llm_judge"] == want["llm_judge"]
