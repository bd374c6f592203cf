"""Two CPU processes under torchrun (DDP over gloo) train like one process with the same
global batch: the defense loss is normalised over all ranks' tokens exactly once."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from emguard.io import read_jsonl

TORCHRUN = Path(sys.executable).with_name("torchrun")
EMGUARD = Path(sys.executable).with_name("emguard")


@pytest.mark.skipif(not (TORCHRUN.exists() and EMGUARD.exists()), reason="needs torchrun + emguard scripts")
def test_two_rank_ddp_matches_single_process(tiny_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    with open(data, "w") as f:
        for i in range(16):
            answer = "It is " + " ".join(str(i) for _ in range(1 + i % 4)) + "."
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say {i}"},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    common = [f"model={tiny_dir}", f"data.train={data}", "data.max_length=128", "lora.r=4",
              "lora.alpha=8", "train.max_steps=3", "train.learning_rate=5e-3", "train.warmup_steps=0",
              "train.grad_accum=1", "defenses.kl.weight=0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([str(EMGUARD), "train", *common, f"output_dir={tmp_path / 'one'}",
                             "train.batch_size=2"], env=env, capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "--no-python", str(EMGUARD),
                          "train", *common, f"output_dir={tmp_path / 'two'}", "train.batch_size=1"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = read_jsonl(tmp_path / "one" / "train_log.jsonl")
    two = read_jsonl(tmp_path / "two" / "train_log.jsonl")
    assert len(one) == len(two) == 3
    # step 1's loss and every step's gradient norm agree: same global batch, same update
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-4)
    for a, b in zip(one, two, strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    assert (tmp_path / "two" / "summary.json").is_file()
    shutil.rmtree(tmp_path / "two")
