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
    from emguard.study import expand, load_study

    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files, "configs/ holds the example run configs"
    for f in files:
        load_run_config(f)  # raises ConfigError naming the file on any problem
        assert isinstance(yaml.safe_load(f.read_text()), dict)
    studies = [f for root in (REPO / "configs", REPO / "src" / "emguard" / "configs")
               for f in sorted(root.rglob("*.yaml")) if "name:" in f.read_text()
               and "domains:" in f.read_text()]  # a study, not a run config
    names = {f.relative_to(REPO).as_posix() for f in studies}
    assert {"configs/paper/table3.yaml", "configs/studies/all_defenses.yaml",
            "configs/studies/regime.yaml", "src/emguard/configs/demo.yaml"} <= names
    for f in studies:
        assert expand(load_study(f)), f  # every run config of every study validates


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


def test_eval_rejects_bad_sample_counts_before_loading_anything(tmp_path):
    from emguard.evaluate import EvalPass, run_eval

    # refused when the evaluation pass is built (a ValidationError naming the field)
    cases = [({"samples": -2}, r"(?m)^samples\n.*greater than or equal to 0"),
             ({"task_samples": 0}, r"(?m)^task_samples\n.*greater than 0"),
             ({"samples": 0, "judge": "openai:gpt-4o-mini"}, "nothing to score")]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            run_eval("unused-model", None,
                     EvalPass(questions="builtin:general-questions", **kw), tmp_path / "e")
    assert not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------- user mistakes

@pytest.mark.parametrize("override, fragment", [
    ("train.learning_rate=[1,2", "the value is not valid YAML (while parsing a flow sequence"),
    ("a.b=: x", "the value is not valid YAML"),
    ("train.seed=2020-13-45", "the value is not valid YAML (a value YAML cannot construct"),
    ("train.seed=!!int x", "the value is not valid YAML"),
    ("train..seed=1", "the key 'train..seed' has an empty segment"),
    (".train=1", "has an empty segment"),
    ("train.=1", "has an empty segment"),
    (" =1", "has an empty key"),
])
def test_malformed_overrides_name_the_override(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_run_config(None, [override])
    assert str(e.value).startswith(f"override '{override}'") and fragment in str(e.value)


def test_override_below_a_value_is_an_error_not_a_silent_replacement(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: builtin:secure-code\ntrain:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"override 'data.max_rows=10': data is "
                                          r"'builtin:secure-code', not a section"):
        load_run_config(p, ["data.max_rows=10"])  # used to drop data: and load the default set
    with pytest.raises(ConfigError, match=r"train.max_steps is 5, not a section"):
        load_run_config(p, ["train.max_steps.x=1"])
    with pytest.raises(ConfigError, match=r"train.max_steps: Input should be a valid integer "
                                          r"\(from override 'train.max_steps.x=1'\)"):
        load_run_config(None, ["train.max_steps.x=1"])  # default value: pydantic names it
    c = load_run_config(None, ["defenses.kl=null", "defenses.kl.weight=0.5"])  # null: a new section
    assert c.defenses.kl.weight == 0.5


def test_ill_typed_override_names_field_and_override(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  batch_size: 2\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(p, ["train.batch_size=" + "many" * 100, "defenses.safelora.tau=0.5"])
    msg = str(e.value)
    assert msg.startswith(f"{p}: 2 problem(s)")
    assert "train.batch_size: Input should be a valid integer" in msg and "manymany...)" in msg
    assert "(from override 'train.batch_size=many" in msg
    assert ("defenses.safelora.unaligned: Field required (from override "
            "'defenses.safelora.tau=0.5')") in msg
    p.write_text("train:\n  batch_size: many\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(p, ["train.seed=3"])
    assert "train.batch_size" in str(e.value) and "from override" not in str(e.value)


@pytest.mark.parametrize("data, needle", [
    ("train:\n  seed: 1\n".encode("utf-16"), "is UTF-16-LE encoded"),
    ("train:\n  seed: 1\n".encode("utf-16-be"), "looks UTF-16-BE encoded"),
    ("model: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 10, line 1)"),
    (b"\x1f\x8b\x08\x00\x00\x00", "not a text file (binary data: NUL byte at offset 3"),
    (b"train:\n  seed: 2020-13-45\n", "not valid YAML (a value YAML cannot construct"),
    (b"train: [" * 1000, "not valid YAML (nested too deeply)"),
])
def test_config_files_in_other_encodings_or_unbuildable_yaml(tmp_path, data, needle):
    p = tmp_path / "c.yaml"
    p.write_bytes(data)
    with pytest.raises(ConfigError) as e:
        load_run_config(p)
    assert str(e.value).startswith(f"{p}: ") and needle in str(e.value)


def test_config_file_with_utf8_bom_loads(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"\xef\xbb\xbftrain:\n  seed: 3\n")
    assert load_run_config(p).train.seed == 3


def test_quantised_training_needs_cuda_and_bitsandbytes_and_says_so(tmp_path):
    from emguard.config import ConfigError, load_run_config
    from emguard.train import train

    cfg = load_run_config(None, ["quantization=4bit", f"output_dir={tmp_path / 'q'}"])
    with pytest.raises(ConfigError, match="quantization=4bit needs a CUDA GPU and bitsandbytes"):
        train(cfg)
    assert not (tmp_path / "q").exists()
    with pytest.raises(ConfigError, match="quantization"):
        load_run_config(None, ["quantization=3bit"])


def test_quantization_config_follows_qlora():
    import torch

    from emguard.models import quantization_config

    q = quantization_config("4bit", torch.bfloat16)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("8bit", torch.bfloat16).load_in_8bit
    assert quantization_config("none", torch.bfloat16) is None


def test_whole_numbers_are_strict_and_numbers_finite():
    from emguard.config import ConfigError, load_run_config

    with pytest.raises(ConfigError, match=r"train.batch_size: Input should be a valid integer"):
        load_run_config(None, ["train.batch_size=true"])  # YAML true is not 1
    with pytest.raises(ConfigError, match=r"train.grad_accum: Input should be a valid integer"):
        load_run_config(None, ["train.grad_accum=2.5"])
    with pytest.raises(ConfigError, match=r"train.learning_rate: Input should be a finite number"):
        load_run_config(None, ["train.learning_rate=.inf"])
    with pytest.raises(ConfigError, match=r"defenses.kl.weight: Input should be a finite number"):
        load_run_config(None, ["defenses.kl.weight=.nan"])
    # PyYAML reads 1e-4 (no dot) as a string; a float field still takes it as the number
    assert load_run_config(None, ["train.learning_rate=1e-4"]).train.learning_rate == 1e-4


def test_a_judge_needs_sampled_answers():
    ok = load_run_config(None, ["eval.general_samples=0", "eval.indomain_samples=0"])
    assert (ok.eval.general_samples, ok.eval.indomain_samples) == (0, 0)
    with pytest.raises(ConfigError, match="general_samples=0"):
        load_run_config(None, ["eval.general_samples=0", "eval.judge=openai:gpt-4o-mini"])
    with pytest.raises(ConfigError, match="eval.preference_max_pairs"):
        load_run_config(None, ["eval.preference_max_pairs=0"])
