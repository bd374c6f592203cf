"""A new loss-term defense is one file plus one registry line.

Everything about the toy defense below lives in this file; the one line outside it is
``registry.register(Toy)``. With it, a run config accepts ``defenses.toy``, the recipe
trains with the term and logs it, a study sweeps it, and ``--force`` removes the file it
writes. Without the registration, each of those refuses it.
"""

import json

import pytest
import torch
import yaml
from pydantic import Field

from emguard.config import ConfigError, load_run_config
from emguard.defenses import registry
from emguard.defenses.base import Defense, StepInputs
from emguard.io import read_json, read_jsonl, write_json_atomic
from emguard.settings import Settings
from emguard.study import expand, load_study
from emguard.sweep import run_sweep
from emguard.train import train


class ToySettings(Settings):
    weight: float = Field(1.0, ge=0)
    scale: float = Field(1.0, gt=0)


class Toy(Defense):
    """Mean squared final hidden state (a made-up term), times ``scale``."""

    name, term = "toy", "toy"
    settings_model = ToySettings
    artifacts = ("toy.json",)

    def record(self, run_dir) -> None:
        write_json_atomic(run_dir / "toy.json", {"scale": self.settings.scale})

    def loss_term(self, step: StepInputs) -> torch.Tensor:
        mask = step.attention_mask.bool()
        return self.settings.scale * step.hidden[-1][mask].float().pow(2).mean() / step.accumulation_steps


@pytest.fixture
def toy():
    registry.register(Toy)
    yield Toy
    registry.unregister("toy")


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                                  {"role": "assistant", "content": f"It is {2 * i}."}]}) + "\n"
                         for i in range(12)))
    return p


def config(tiny_dir, data_file, out, *extra):
    return load_run_config(None, [f"model={tiny_dir}", f"output_dir={out}", f"data.train={data_file}",
                                  "data.max_length=128", "train.max_steps=3", "train.batch_size=2",
                                  "train.grad_accum=1", "train.learning_rate=3e-3", "train.warmup_steps=0",
                                  "train.logging_steps=1", "train.save_steps=3", "lora.r=4", "lora.alpha=8",
                                  *extra])


def test_unregistered_defense_is_refused_by_name(tiny_dir, data_file, tmp_path):
    with pytest.raises(ConfigError, match="defenses.toy"):
        config(tiny_dir, data_file, tmp_path / "run", "defenses.toy.weight=0.5")


def test_a_term_without_a_weight_setting_cannot_register():
    class NoWeight(Settings):
        scale: float = 1.0

    class Silent(Defense):
        name, term = "silent", "silent"
        settings_model = NoWeight

    with pytest.raises(RuntimeError, match="no `weight` field"):
        registry.register(Silent)
    assert "silent" not in registry.DEFENSES


def test_toy_defense_trains_logs_and_is_force_cleaned(toy, tiny_dir, data_file, tmp_path):
    cfg = config(tiny_dir, data_file, tmp_path / "run", "defenses.toy.weight=0.5", "defenses.toy.scale=2")
    assert cfg.defenses.toy == ToySettings(weight=0.5, scale=2.0)
    run = train(cfg).run_dir
    log = read_jsonl(run / "train_log.jsonl")
    steps = [r for r in log if "loss" in r]
    assert steps and all(r["toy"] > 0 for r in steps)
    # the logged loss is CE + weight x term, the weight read from the settings
    assert all(r["loss"] == pytest.approx(r["ce"] + 0.5 * r["toy"], rel=1e-4) for r in steps)
    summary = read_json(run / "summary.json")
    assert summary["defenses"] == ["toy"] and summary["last_toy"] == pytest.approx(steps[-1]["toy"])
    assert read_json(run / "toy.json") == {"scale": 2.0}

    # the term changes what is trained: without it, the same seed ends elsewhere
    plain = train(config(tiny_dir, data_file, tmp_path / "plain")).run_dir
    assert read_json(plain / "summary.json")["last_ce"] != summary["last_ce"]

    # --force replaces the run and removes what the defense wrote (its declared artifact)
    again = config(tiny_dir, data_file, tmp_path / "run")
    train(again, force=True)
    assert not (run / "toy.json").exists()
    assert read_json(run / "summary.json")["defenses"] == []


def test_toy_defense_sweeps_and_counts_in_the_identity(toy, tiny_dir, tmp_path):
    study = {
        "name": "toy", "output_dir": str(tmp_path / "study"), "model": str(tiny_dir), "seeds": [0],
        "base": {"data": {"max_length": 2048, "split_seed": 0}, "lora": {"r": 2, "alpha": 4},
                 "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "warmup_steps": 0,
                           "learning_rate": 1e-3, "save_steps": 2},
                 "eval": {"max_new_tokens": 3, "judge_free": False, "indomain_max_questions": 2,
                          "batch_size": 32, "general_questions": None}},
        "domains": {"code": {"misaligned": "builtin:insecure-code"}},
        "arms": [{"name": "misaligned"},
                 {"name": "toy", "grid": {"defenses.toy.weight": [0.1, 1.0]}}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    runs = expand(load_study(path))
    names = {r.name: r for r in runs}
    assert len({r.run_dir for r in runs}) == 3  # each weight is its own run
    result = run_sweep(load_study(path), progress=False)
    assert not result.failed and not result.blocked
    for run in runs:
        summary = read_json(run.run_dir / "summary.json")
        toy_on = run.arm == "toy"
        assert summary["defenses"] == (["toy"] if toy_on else [])
        assert (run.run_dir / "toy.json").is_file() == toy_on
    assert {n for n in names if n.startswith("code/toy")} == {"code/toy_weight0.1/s0", "code/toy_weight1.0/s0"}
