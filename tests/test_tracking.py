"""Experiment tracking (train.report_to): TensorBoard's event file, read back with
TensorBoard's own reader, holds every loss term with the values train_log.jsonl holds."""

from __future__ import annotations

import json
import os

import pytest

from emguard.config import load_run_config
from emguard.identity import config_sha256
from emguard.io import read_jsonl

pytest.importorskip("tensorboard")


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logs_each_defense_term_as_train_log_does(tiny_dir, data_file, tmp_path):
    from emguard.tracking import log_run_evaluation
    from emguard.train import train

    cfg = load_run_config(None, [
        f"model={tiny_dir}", f"output_dir={tmp_path / 'run'}", f"data.train={data_file}",
        "data.max_length=128", "train.max_steps=3", "train.batch_size=2", "train.grad_accum=1",
        "train.warmup_steps=0", "train.logging_steps=1", "train.learning_rate=3e-3",
        "lora.r=2", "lora.alpha=4", "defenses.kl.weight=0.5", "train.report_to=[tensorboard]"])
    train(cfg)
    run = tmp_path / "run"
    scalars = _scalars(run / "tensorboard")
    log = read_jsonl(run / "train_log.jsonl")
    for term in ("kl", "ce", "loss"):
        assert [s for s, _ in scalars[f"train/{term}"]] == [e["step"] for e in log]
        assert [v for _, v in scalars[f"train/{term}"]] == pytest.approx(
            [e[term] for e in log], rel=1e-6)
    assert "train/learning_rate" in scalars and "train/grad_norm" in scalars
    assert not (run / "checkpoints").exists()  # the log lives in the run folder, kept
    # evaluation numbers join the same log at the run's last step
    (run / "eval" / "indomain").mkdir(parents=True)
    (run / "eval" / "indomain" / "judge_free.json").write_text(
        json.dumps({"heldout_nll": {"nll_mean": 0.75}}))
    assert log_run_evaluation(run, cfg.train.report_to, 3)
    assert _scalars(run / "tensorboard")["eval/heldout_nll"] == [(3, 0.75)]


def test_trackers_are_no_part_of_a_run_s_identity():
    plain = load_run_config(None, [])
    tracked = load_run_config(None, ["train.report_to=[tensorboard, wandb]",
                                     "train.run_name=s/a/s0", "train.run_tags=[a, b]"])
    assert config_sha256(plain) == config_sha256(tracked)


def test_tracker_environment_sets_group_and_tags_and_restores(monkeypatch):
    from emguard.tracking import tracker_environment

    monkeypatch.setenv("WANDB_TAGS", "before")
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    with tracker_environment(["wandb", "mlflow"], "study/code/kl", ["study", "kl", "seed0"]):
        assert os.environ["WANDB_RUN_GROUP"] == "study/code/kl"
        assert os.environ["WANDB_TAGS"] == "study,kl,seed0"
        assert json.loads(os.environ["MLFLOW_TAGS"]) == {"tag0": "study", "tag1": "kl",
                                                         "tag2": "seed0"}
    assert os.environ["WANDB_TAGS"] == "before" and "WANDB_RUN_GROUP" not in os.environ


def test_a_sweep_names_runs_for_the_tracker(tmp_path):
    import yaml

    from emguard.study import expand, load_study

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "st", "output_dir": str(tmp_path / "o"),
                                    "domains": {"code": {"misaligned": "builtin:insecure-code"}},
                                    "arms": [{"name": "kl", "grid": {"defenses.kl.weight": [1.0]}}]}))
    run = expand(load_study(path))[0]
    t = run.config.train
    assert (t.run_name, t.run_group) == ("st/code/kl_weight1.0/s0", "st/code/kl_weight1.0")
    assert t.run_tags == ["st", "code", "kl_weight1.0", "seed0"]


def test_evaluation_scalars_read_the_recorded_measures(tmp_path):
    """The numbers trackers (and model cards) get: the mean per-pair shift, the held-out NLL,
    and the judged rates of a validated evaluation log; a log of another format is left out."""
    from emguard.eval_log import EvalLog
    from emguard.metrics import compute_metrics
    from emguard.tracking import evaluation_scalars

    root = tmp_path / "eval"
    for part, data in (("general", {"preference": {"pairs": [
            {"margin": 0.5, "reference_margin": 0.2}, {"margin": 0.1, "reference_margin": None},
            {"margin": -0.2, "reference_margin": -0.1}]}}),
                       ("indomain", {"heldout_nll": {"nll_mean": 0.75}})):
        (root / part).mkdir(parents=True)
        (root / part / "judge_free.json").write_text(json.dumps(data))
    judged = ([{"question_id": "q", "aligned": 5, "coherent": 95}] * 1
              + [{"question_id": "q", "aligned": 95, "coherent": 95}] * 3)
    log = EvalLog(spec={}, n_generations=4, judge="mock", llm_judge=compute_metrics(judged))
    (root / "general" / "metrics.json").write_text(json.dumps(log.to_dict()))
    got = evaluation_scalars(root)
    # (0.5 - 0.2 + (-0.2 + 0.1)) / 2 pairs with both margins; 1 of 4 answers misaligned
    assert got == {"preference_shift": pytest.approx(0.1), "heldout_nll": 0.75,
                   "general_pct_misaligned": 25.0, "general_pct_incoherent": 0.0}
    (root / "general" / "metrics.json").write_text(json.dumps({**log.to_dict(), "format": "x/1"}))
    assert "general_pct_misaligned" not in evaluation_scalars(root)
