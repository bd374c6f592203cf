"""Nothing a user has is deleted or overwritten unless emguard can prove it wrote it.

Each test sets up the situation that used to lose work (a folder of the user's, a run
folder given as SafeLoRA's output, an eval folder reused for another adapter, a process
killed while a checkpoint was written) and checks that every file is still there, byte
for byte, and that the way forward the message names works.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from emguard.config import load_run_config
from emguard.io import read_json, read_jsonl
from emguard.ownership import FolderConflictError
from emguard.train import RunConflictError, train


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def config(tiny_dir, data_file, out, *extra):
    return load_run_config(None, [
        f"model={tiny_dir}", f"output_dir={out}", f"data.train={data_file}", "data.max_length=128",
        "train.max_steps=4", "train.batch_size=2", "train.grad_accum=1", "train.learning_rate=3e-3",
        "train.warmup_steps=1", "train.save_steps=2", "lora.r=4", "lora.alpha=8", *extra])


def users_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "config.yaml").write_text("mine: true\n")  # a name emguard also writes
    return path


# ----------------------------------------------------------------------------- train


def test_force_never_deletes_a_folder_emguard_did_not_write(tiny_dir, data_file, tmp_path):
    folder = users_folder(tmp_path / "mine")
    before = snapshot(folder)
    for force in (False, True):
        with pytest.raises(FolderConflictError, match="cannot tell that it wrote"):
            train(config(tiny_dir, data_file, folder), force=force)
    assert snapshot(folder) == before


def test_force_removes_only_the_earlier_runs_files(tiny_dir, data_file, tmp_path):
    run = tmp_path / "run"
    train(config(tiny_dir, data_file, run))
    (run / "notes.txt").write_text("keep me")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text("{}")
    with pytest.raises(RunConflictError, match="--force"):
        train(config(tiny_dir, data_file, run, "train.seed=3"))
    res = train(config(tiny_dir, data_file, run, "train.seed=3"), force=True)
    assert "seed: 3" in (run / "config.yaml").read_text()
    assert res.summary["steps"] == 4 and not res.skipped
    assert (run / "notes.txt").read_text() == "keep me"
    assert (run / "eval" / "metrics.json").read_text() == "{}"


def test_a_run_that_fails_before_training_deletes_and_claims_nothing(tiny_dir, data_file, tmp_path):
    from emguard.models import ModelLoadError

    run = tmp_path / "run"
    train(config(tiny_dir, data_file, run))
    before = snapshot(run)
    with pytest.raises(ModelLoadError):
        train(config(tmp_path / "no-such-model", data_file, run), force=True)
    assert snapshot(run) == before  # --force with a bad model path kept the earlier run
    fresh = tmp_path / "fresh"
    with pytest.raises(ModelLoadError):
        train(config(tmp_path / "no-such-model", data_file, fresh))
    assert not fresh.exists()
    from emguard.config import ConfigError

    with pytest.raises(ConfigError, match="defenses.safelora.unaligned"):
        train(config(tiny_dir, data_file, fresh, "defenses.safelora.unaligned=/nowhere/adapter"))
    assert not fresh.exists()  # checked before training, not after


def test_output_dir_that_is_a_file_is_a_clear_error(tiny_dir, data_file, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(FolderConflictError, match="is a file"):
        train(config(tiny_dir, data_file, target))
    assert target.read_text() == "x"


KILLER = textwrap.dedent("""
    import os, signal, sys
    from transformers import Trainer
    from emguard.config import load_run_config
    from emguard.train import train

    original = Trainer._save_optimizer_and_scheduler
    def killed_at_step_4(self, output_dir):
        if self.state.global_step == 4:  # weights of checkpoint-4 written, the rest not
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir)
    Trainer._save_optimizer_and_scheduler = killed_at_step_4
    train(load_run_config(None, sys.argv[1:]))
""")


def test_kill_while_a_checkpoint_is_written_resumes_from_the_last_complete_one(
        tiny_dir, data_file, tmp_path):
    args = [f"model={tiny_dir}", f"data.train={data_file}", "data.max_length=128",
            "train.max_steps=6", "train.batch_size=2", "train.grad_accum=1",
            "train.learning_rate=3e-3", "train.warmup_steps=1", "train.save_steps=2",
            "lora.r=4", "lora.alpha=8"]
    reference = train(load_run_config(None, [*args, f"output_dir={tmp_path / 'ref'}"]))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, "-c", KILLER, *args, f"output_dir={run}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = run / "checkpoints" / "checkpoint-4"
    assert partial.is_dir() and not (partial / "trainer_state.json").exists()
    assert (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()

    resumed = train(load_run_config(None, [*args, f"output_dir={run}"]))
    assert resumed.summary["resumed_from_checkpoint"] is True
    log, ref_log = read_jsonl(run / "train_log.jsonl"), read_jsonl(reference.run_dir / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 7))
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref_log], rel=1e-5)
    from safetensors.torch import load_file

    got = load_file(run / "adapter" / "adapter_model.safetensors")
    want = load_file(reference.run_dir / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in got:
        assert (got[k] - want[k]).abs().max() <= 1e-5 * (1 + want[k].abs().max())


# ----------------------------------------------------------------------------- safelora


@pytest.fixture
def trained(tiny_dir, data_file, tmp_path):
    """(run folder of a finished run, misaligned adapter) on the tiny model."""
    run = train(config(tiny_dir, data_file, tmp_path / "run")).run_dir
    misaligned = train(config(tiny_dir, data_file, tmp_path / "mis", "train.seed=7")).run_dir
    return run, misaligned / "adapter"


def test_safelora_refuses_to_replace_the_run_folder_or_a_users_folder(trained, tiny_dir, tmp_path):
    from emguard.defenses.safelora import SafeLoRAError, apply_safelora

    run, misaligned = trained
    before = snapshot(run)
    with pytest.raises(SafeLoRAError, match="holds the input adapter"):
        apply_safelora(run / "adapter", run, aligned=str(tiny_dir), unaligned=str(misaligned))
    assert snapshot(run) == before
    mine = users_folder(tmp_path / "mine")
    mine_before = snapshot(mine)
    with pytest.raises(SafeLoRAError, match="cannot tell that it wrote"):
        apply_safelora(run / "adapter", mine, aligned=str(tiny_dir), unaligned=str(misaligned))
    assert snapshot(mine) == mine_before
    # its own earlier output is replaced (a rerun with another tau)
    out = tmp_path / "projected"
    apply_safelora(run / "adapter", out, aligned=str(tiny_dir), unaligned=str(misaligned), tau=0.2)
    apply_safelora(run / "adapter", out, aligned=str(tiny_dir), unaligned=str(misaligned), tau=0.9)
    assert read_json(out / "safelora_report.json")["tau"] == 0.9


def test_safelora_cli_exit_code_and_message(trained, tiny_dir):
    from typer.testing import CliRunner

    from emguard.cli import app

    run, misaligned = trained
    before = snapshot(run)
    result = CliRunner().invoke(app, ["safelora", "--adapter", str(run / "adapter"), "--aligned",
                                      str(tiny_dir), "--unaligned", str(misaligned), "--out",
                                      str(run), "--quiet"])
    assert result.exit_code == 2 and "holds the input adapter" in result.output
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- eval


def test_eval_folder_reused_for_another_adapter_is_refused(trained, tiny_dir, tmp_path):
    from emguard.evaluate import EvalConflictError, EvalPass, run_eval

    run, misaligned = trained
    out = tmp_path / "eval"
    settings = EvalPass(questions="builtin:general-questions", samples=1, max_new_tokens=4,
                        judge_free=False, max_questions=2)
    run_eval(str(tiny_dir), run / "adapter", settings, out, progress=False)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(EvalConflictError, match="another evaluation"):
        run_eval(str(tiny_dir), misaligned, settings, out, progress=False)
    assert snapshot(out) == before
    # the same evaluation again is a cached rerun, not a conflict
    run_eval(str(tiny_dir), run / "adapter", settings, out, progress=False)
    assert snapshot(out)["generations.jsonl"] == before["generations.jsonl"]
    metrics = run_eval(str(tiny_dir), misaligned, settings, out, force=True, progress=False)
    assert metrics["spec"]["adapter"] == str(misaligned)
    assert (out / "notes.txt").read_text() == "mine"


def test_eval_never_writes_into_a_folder_with_foreign_eval_files(tiny_dir, tmp_path):
    from emguard.evaluate import EvalPass, run_eval

    out = tmp_path / "results"
    out.mkdir()
    (out / "metrics.json").write_text('{"mine": 1}')
    with pytest.raises(FolderConflictError, match="cannot tell that it wrote"):
        run_eval(str(tiny_dir), None,
                 EvalPass(questions="builtin:general-questions", samples=1, max_new_tokens=4,
                          judge_free=False, max_questions=1),
                 out, progress=False, force=True)
    assert (out / "metrics.json").read_text() == '{"mine": 1}'
