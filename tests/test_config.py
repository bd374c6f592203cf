from pathlib import Path

import pytest
import yaml

from emguard.config import ConfigError, RunConfig, dump_run_config, load_run_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_paper_table7():
    c = RunConfig()
    assert (c.lora.r, c.lora.alpha, c.lora.use_rslora, c.lora.dropout) == (32, 64, True, 0.0)
    assert set(c.lora.targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    t = c.train
    assert (t.learning_rate, t.batch_size, t.grad_accum, t.warmup_steps, t.weight_decay, t.seed,
            t.epochs, t.scheduler) == (1e-4, 4, 4, 5, 0.01, 0, 1.0, "linear")
    assert c.data.max_length == 2048
    d = c.defenses
    assert d.kl is None and d.ldifs is None and d.interleave is None and d.safelora is None


def test_unknown_and_ill_typed_fields_are_all_named_with_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: 0.1\n  batch_size: many\ndefenses:\n  kl: {weight: -1}\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(p)
    msg = str(e.value)
    assert str(p) in msg
    assert "train.lr: unknown field" in msg
    assert "train.batch_size" in msg and "defenses.kl.weight" in msg


def test_overrides_apply_and_validate(tmp_path):
    c = load_run_config(None, ["train.max_steps=7", "defenses.kl.weight=0.3", "model=x/y"])
    assert c.train.max_steps == 7 and c.defenses.kl.weight == 0.3 and c.model == "x/y"
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_run_config(None, ["train.max_steps=lots"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_run_config(None, ["nonsense"])


def test_resolved_config_round_trips(tmp_path):
    c = load_run_config(None, ["defenses.ldifs.layers=[5,10]", "defenses.interleave.fraction=0.2"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_run_config(c))
    assert load_run_config(p) == c


def test_every_shipped_config_validates():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files, "configs/ holds the example run configs"
    for f in files:
        load_run_config(f)  # raises ConfigError naming the file on any problem
        assert isinstance(yaml.safe_load(f.read_text()), dict)


def test_values_that_would_do_something_else_are_errors():
    from emguard.config import ConfigError, load_run_config

    with pytest.raises(ConfigError, match="train.max_steps: .*0 steps would still run one step"):
        load_run_config(None, ["train.max_steps=0"])
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_run_config(None, ["train.max_steps=-2"])
    assert load_run_config(None, ["train.max_steps=-1"]).train.max_steps == -1


def test_lora_target_typo_is_an_error_not_a_smaller_adapter():
    from tiny import tiny_model

    from emguard.models import ModelLoadError, attach_lora

    with pytest.raises(ModelLoadError, match=r"\['q_prj'\] match no module.*q_proj"):
        attach_lora(tiny_model(), r=2, alpha=4, targets=["q_prj", "v_proj"])
    model = attach_lora(tiny_model(), r=2, alpha=4, targets=["q_proj", "v_proj"])
    names = {n.split(".")[-4] for n, _ in model.named_parameters() if "lora_A" in n}
    assert names == {"q_proj", "v_proj"}


def test_eval_rejects_sample_counts_below_one(tmp_path):
    from emguard.evaluate import run_eval

    for kw in ({"samples": 0}, {"samples": -2}, {"task_samples": 0}):
        with pytest.raises(ValueError, match="must be at least 1"):
            run_eval("unused-model", None, "builtin:general-questions", "none",
                     out_dir=tmp_path / "e", **{"samples": None, **kw})
    assert not (tmp_path / "e").exists()
