"""Mistakes found before the expensive step, with a message that names cause and fix;
and folder locks that keep two processes out of each other's output."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from emguard.config import ConfigError, load_run_config
from emguard.models import ModelLoadError, check_device
from emguard.ownership import FolderConflictError, folder_lock, lock_path
from emguard.train import train


def config(tiny_dir, data_file, out, *extra):
    return load_run_config(None, [
        f"model={tiny_dir}", f"output_dir={out}", f"data.train={data_file}", "data.max_length=128",
        "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1", "lora.r=4", "lora.alpha=8",
        *extra])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="no CUDA device is available.*--device cpu"):
        check_device("cuda")
    with pytest.raises(ModelLoadError, match="not a device"):
        check_device("gpu0")
    assert check_device("cpu") == "cpu" and check_device(None) == "cpu"


def test_impossible_ldifs_layers_fail_before_the_folder_is_claimed(tiny_dir, data_file, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"defenses.ldifs.layers: .*\[9\].*4 layers"):
        train(config(tiny_dir, data_file, run, "defenses.ldifs.layers=[2,9]"))
    with pytest.raises(ConfigError, match="defenses.ldifs.layer_every: .*selects no layer"):
        train(config(tiny_dir, data_file, run, "defenses.ldifs.layer_every=7"))
    assert not run.exists()


def test_eval_checks_device_adapter_and_task_names_before_anything(tiny_dir, tmp_path):
    from emguard.evaluate import EvalPass, run_eval

    out = tmp_path / "eval"
    kw = dict(samples=1, max_new_tokens=2, judge_free=False)
    for bad, message in (("opswap:7", "OpSwap tier must be one of"), ("gsm8k", "unknown benign task")):
        with pytest.raises(ValueError, match=message):
            run_eval(str(tiny_dir), None, EvalPass(tasks=["opswap:1", bad], **kw), out,
                     progress=False)
    with pytest.raises(ModelLoadError, match="not a PEFT adapter directory"):
        run_eval(str(tiny_dir), tmp_path / "nowhere", EvalPass(**kw), out, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            run_eval(str(tiny_dir), None, EvalPass(**kw), out, device="cuda", progress=False)
    assert not out.exists()


def test_adapter_of_another_base_model_names_that_model(tmp_path):
    from tiny import save_tiny_model

    from emguard.models import attach_lora, load_adapter, load_model

    small = save_tiny_model(tmp_path / "small", hidden=32)
    wide = save_tiny_model(tmp_path / "wide", hidden=48)
    model, _ = load_model(str(wide), device="cpu")
    attach_lora(model, r=2, alpha=4).save_pretrained(tmp_path / "adapter")
    base, _ = load_model(str(small), device="cpu")
    with pytest.raises(ModelLoadError, match=f"trained on '{wide}'.*--model"):
        load_adapter(base, tmp_path / "adapter")


HOLDER = textwrap.dedent("""
    import sys, time
    from emguard.ownership import folder_lock
    with folder_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def hold_lock(folder: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_cannot_train_or_evaluate_into_a_locked_folder(tiny_dir, data_file,
                                                                       tmp_path):
    from emguard.evaluate import EvalPass, run_eval

    run = tmp_path / "run"
    holder = hold_lock(run, 60)
    try:
        with pytest.raises(FolderConflictError, match="another emguard process is writing"):
            train(config(tiny_dir, data_file, run))
        with pytest.raises(FolderConflictError, match="another emguard process is writing"):
            run_eval(str(tiny_dir), None,
                     EvalPass(samples=1, max_new_tokens=2, judge_free=False), run,
                     progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert not run.exists()
    # the lock died with its process (kill -9): the folder is free again
    assert train(config(tiny_dir, data_file, run)).summary["steps"] == 2


def test_folder_lock_waits_for_the_holder_and_never_touches_the_folder(tmp_path):
    folder = tmp_path / "a" / "b"
    holder = hold_lock(folder, 1.5)
    start = time.monotonic()
    with folder_lock(folder, wait=30):
        waited = time.monotonic() - start
    holder.wait()
    assert waited > 0.5  # it waited for the other process, then got the lock
    assert not folder.exists() and not folder.parent.exists()  # nothing made beside it
    assert lock_path(folder) != lock_path(tmp_path / "a" / "c")


@pytest.mark.e2e
def test_two_processes_materialising_the_embedded_model_at_once(tmp_path):
    """Both get the same complete checkpoint: the second waits for the first's lock."""
    script = "from emguard.models import model_dir; print(model_dir('smollm2-135m'))"
    env = {**__import__("os").environ, "EMGUARD_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    dirs = {o.strip().splitlines()[-1] for o, _ in outs}
    assert len(dirs) == 1
    folder = Path(dirs.pop())
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers
