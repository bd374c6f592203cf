"""SafeLoRA: the factored projection against the dense formula C = V V^T / ||V||_F^2 (float64),
hand-worked edge cases, and end to end on tiny saved checkpoints loaded back with PEFT."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from emguard.defenses.safelora import (
    REPORT_NAME,
    LowRankDelta,
    SafeLoRAConfig,
    SafeLoRAError,
    apply_safelora,
    group_lora_keys,
    lora_scale,
    project_lora_pair,
    sq_frobenius,
)

PREFIX = "base_model.model."


def dense_reference(A, B, V, scale):
    """(C W, cos_F(W, C W)) in float64 with the d_out x d_out matrix C formed explicitly."""
    A, B, V = A.double(), B.double(), V.double()
    W = scale * B @ A
    C = V @ V.T / (V * V).sum()
    CW = C @ W
    cos = (W * CW).sum() / (torch.linalg.norm(W) * torch.linalg.norm(CW))
    return CW, float(cos)


def rel_diff(x, ref):
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max())


def _random_layer(d_out, d_in, r, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g),
            torch.randn(d_out, d_in, generator=g))


# ----------------------------------------------------------------------------- pure math


@pytest.mark.parametrize("d_out,d_in,r", [(48, 32, 4), (32, 80, 8), (64, 64, 1), (20, 24, 16)])
def test_factored_projection_equals_dense_formula(d_out, d_in, r):
    A, B, V = _random_layer(d_out, d_in, r, seed=d_out + d_in + r)
    scale = 2.5
    CW, cos_ref = dense_reference(A, B, V, scale)
    B_new, cos, projected = project_lora_pair(A, B, V, scale, tau=1.0)
    assert projected and cos < 1.0
    assert rel_diff(scale * B_new.double() @ A.double(), CW) < 1e-5
    assert abs(cos - cos_ref) < 1e-5 * cos_ref
    assert B_new.shape == B.shape and B_new.dtype == B.dtype


def test_low_rank_alignment_vector_equals_its_dense_form():
    A, B, _ = _random_layer(40, 24, 4, seed=1)
    g = torch.Generator().manual_seed(2)
    Bm, Am, sm = torch.randn(40, 3, generator=g), torch.randn(3, 24, generator=g), -1.7
    V_dense = sm * Bm @ Am
    CW, cos_ref = dense_reference(A, B, V_dense, 0.5)
    B_new, cos, projected = project_lora_pair(A, B, LowRankDelta(Bm, Am, sm), 0.5, tau=1.0)
    assert projected
    assert rel_diff(0.5 * B_new.double() @ A.double(), CW) < 1e-5
    assert abs(cos - cos_ref) < 1e-5 * cos_ref
    assert math.isclose(LowRankDelta(Bm, Am, sm).sq_norm(), float((V_dense.double() ** 2).sum()),
                        rel_tol=1e-6)


def test_bf16_input_keeps_dtype_and_matches_dense():
    A, B, V = _random_layer(32, 32, 4, seed=3)
    A, B, V = A.bfloat16(), B.bfloat16(), V.bfloat16()
    CW, _ = dense_reference(A, B, V, 1.0)
    B_new, _, projected = project_lora_pair(A, B, V, 1.0, tau=1.0)
    assert projected and B_new.dtype == torch.bfloat16
    assert rel_diff(B_new.double() @ A.double(), CW) < 1e-2  # bf16 output rounding only


def test_hand_worked_cosine_one_half_is_left_alone_at_tau_one_half():
    # V = e1 e1^T, so C = e1 e1^T (||V|| = 1); W = ones(4) e1^T: C W keeps 1 of 4 equal rows,
    # cos = ||C W|| / ||W|| = 1 / 2 exactly in floating point.
    V = torch.zeros(4, 4)
    V[0, 0] = 1.0
    B, A = torch.ones(4, 1), torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert dense_reference(A, B, V, 1.0)[1] == 0.5
    B_new, cos, projected = project_lora_pair(A, B, V, 1.0, tau=0.5)
    assert cos == 0.5 and not projected and B_new is B
    B_new, cos, projected = project_lora_pair(A, B, V, 1.0, tau=math.nextafter(0.5, 1.0))
    assert projected and torch.equal(B_new, torch.tensor([[1.0], [0.0], [0.0], [0.0]]))


def test_tau_is_strict_on_a_random_layer():
    A, B, V = _random_layer(24, 16, 4, seed=5)
    _, cos, projected = project_lora_pair(A, B, V, 3.0, tau=0.0)
    assert not projected and 0.0 < cos < 1.0
    B_same, cos2, projected = project_lora_pair(A, B, V, 3.0, tau=cos)
    assert cos2 == cos and not projected and B_same is B
    _, _, projected = project_lora_pair(A, B, V, 3.0, tau=math.nextafter(cos, 2.0))
    assert projected


def test_zero_delta_zero_alignment_and_orthogonal_delta():
    A, B, V = _random_layer(8, 6, 2, seed=7)
    B0 = torch.zeros_like(B)
    B_new, cos, projected = project_lora_pair(A, B0, V, 1.0, tau=1.0)
    assert math.isnan(cos) and not projected and B_new is B0
    B_new, cos, projected = project_lora_pair(A, B, torch.zeros_like(V), 1.0, tau=1.0)
    assert math.isnan(cos) and not projected and B_new is B
    # W orthogonal to V's column space: C W = 0, cosine taken as 0 -> projected to zero.
    V1 = torch.zeros(8, 6)
    V1[0, 0] = 2.0
    B_orth = torch.zeros(8, 2)
    B_orth[1:, :] = B[1:, :]
    B_new, cos, projected = project_lora_pair(A, B_orth, V1, 1.0, tau=0.3)
    assert cos == 0.0 and projected and torch.count_nonzero(B_new) == 0


def test_alignment_norm_is_accurate_on_a_large_matrix():
    # a plain float32 vector_norm over this many elements drifts by ~1e-3 on CPU
    X = torch.randn(2048, 4096, generator=torch.Generator().manual_seed(9))
    exact = float((X.double() ** 2).sum())
    assert abs(sq_frobenius(X) / exact - 1) < 1e-10


def test_shape_mismatch_is_an_error():
    A, B, V = _random_layer(8, 6, 2, seed=8)
    with pytest.raises(SafeLoRAError, match=r"V \(6, 8\)"):
        project_lora_pair(A, B, V.T, 1.0, tau=0.3)


def test_group_lora_keys_pairs_passes_biases_and_rejects_duplicates():
    keys = [f"{PREFIX}model.layers.0.q_proj.lora_A.weight", f"{PREFIX}model.layers.0.q_proj.lora_B.weight",
            f"{PREFIX}model.layers.0.q_proj.lora_B.bias", f"{PREFIX}lm_head.weight"]
    pairs, passthrough = group_lora_keys(keys)
    assert pairs == {"model.layers.0.q_proj": (keys[0], keys[1])}
    assert passthrough == [keys[2], keys[3]]
    with pytest.raises(SafeLoRAError, match="appears twice"):
        group_lora_keys(keys + [keys[1]])
    with pytest.raises(SafeLoRAError, match="'model.layers.0.q_proj' has no lora_B"):
        group_lora_keys(keys[:1])
    with pytest.raises(SafeLoRAError, match="DoRA"):
        group_lora_keys([f"{PREFIX}model.layers.0.q_proj.lora_magnitude_vector"])


def test_config_block_validates():
    assert SafeLoRAConfig(aligned="a", unaligned="b").tau == 0.3
    with pytest.raises(SafeLoRAError, match="tau"):
        SafeLoRAConfig(aligned="a", unaligned="b", tau=1.5)
    with pytest.raises(SafeLoRAError, match="unaligned"):
        SafeLoRAConfig(aligned="a", unaligned="")


# ----------------------------------------------------------------------------- tiny checkpoints


def _tiny(seed, layers=2):
    from tiny import tiny_model

    return tiny_model(layers=layers, seed=seed)


def _adapter(model, out, seed, **lora):
    """Attach LoRA, give every lora_B random non-zero values, save; return the PeftModel."""
    from emguard.models import attach_lora

    peft_model = attach_lora(model, **lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out)
    return peft_model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny import save_tiny_model

    root = tmp_path_factory.mktemp("safelora")
    save_tiny_model(root / "base", layers=2, seed=0)
    save_tiny_model(root / "instruct", layers=2, seed=1)
    _adapter(_tiny(seed=1), root / "adapter", seed=11, r=4, alpha=8)
    return root


def _layers(adapter_dir):
    """{module: (A, B, scale)} of a saved adapter without rank/alpha patterns."""
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
    out = {}
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX):-len(".lora_A.weight")]
            out[module] = (A, tensors[key.replace("lora_A", "lora_B")], scale)
    return out


def _expected(adapter_dir, deltas):
    """{module: (C W, W, cos)} densely, for the adapter's layers that have a V in ``deltas``."""
    exp = {}
    for module, (A, B, s) in _layers(adapter_dir).items():
        if module in deltas:
            CW, cos = dense_reference(A, B, deltas[module], s)
            exp[module] = (CW, s * B.double() @ A.double(), cos)
    return exp


def _pair_deltas(world):
    aligned, base = load_file(world / "instruct/model.safetensors"), load_file(world / "base/model.safetensors")
    return {k.removesuffix(".weight"): aligned[k].double() - base[k].double() for k in aligned}


def _check_output(out_dir, adapter_dir, expected, tau):
    report = json.loads((out_dir / REPORT_NAME).read_text())
    rows = {row["name"]: row for row in report["layers"]}
    assert len(rows) == len(report["layers"]) == len(expected)  # each layer exactly once
    new, old = load_file(out_dir / "adapter_model.safetensors"), load_file(adapter_dir / "adapter_model.safetensors")
    assert list(new) == list(old)
    scales = {m: s for m, (_, _, s) in _layers(adapter_dir).items()}
    for module, (CW, _, cos) in expected.items():
        row, a_key = rows[module], f"{PREFIX}{module}.lora_A.weight"
        b_key = a_key.replace("lora_A", "lora_B")
        assert row["scale"] == scales[module]
        assert row["cosine"] == pytest.approx(cos, rel=1e-5)
        assert row["projected"] == (cos < tau)
        assert new[a_key].numpy().tobytes() == old[a_key].numpy().tobytes()
        if row["projected"]:
            assert rel_diff(scales[module] * new[b_key].double() @ new[a_key].double(), CW) < 1e-5
        else:
            assert new[b_key].numpy().tobytes() == old[b_key].numpy().tobytes()
    assert report["n_projected"] == sum(cos < tau for _, _, cos in expected.values())
    assert report["share_projected"] == pytest.approx(report["n_projected"] / len(expected))
    return report


def _tau_between(cosines):
    """A tau half-way between two neighbouring cosines: a mix of projected and kept layers."""
    c = sorted(cosines)
    mid = len(c) // 2
    return (c[mid - 1] + c[mid]) / 2


def test_model_pair_end_to_end_loads_in_peft_and_matches_dense_forward(world, tmp_path):
    from peft import PeftModel

    expected = _expected(world / "adapter", _pair_deltas(world))
    tau = _tau_between([cos for _, _, cos in expected.values()])
    report = apply_safelora(world / "adapter", tmp_path / "out", aligned=str(world / "instruct"),
                            unaligned=str(world / "base"), tau=tau, progress=False)
    saved = _check_output(tmp_path / "out", world / "adapter", expected, tau)
    assert 0 < report.n_projected < len(expected)
    assert saved["alignment"]["kind"] == "model_pair" and saved["tau"] == tau
    assert (tmp_path / "out/adapter_config.json").read_bytes() == (world / "adapter/adapter_config.json").read_bytes()

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    peft_model = PeftModel.from_pretrained(_tiny(seed=1), str(tmp_path / "out")).eval()
    original = PeftModel.from_pretrained(_tiny(seed=1), str(world / "adapter")).eval()
    reference = _tiny(seed=1)
    with torch.no_grad():
        for module, (CW, W, cos) in expected.items():
            weight = reference.get_submodule(module).weight
            weight += (CW if cos < tau else W).to(weight.dtype)
        logits = peft_model(ids).logits
        assert torch.allclose(logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
        assert (logits - original(ids).logits).abs().max() > 1e-3  # the projection did something


def test_every_layer_is_projected_exactly_once(world, tmp_path):
    deltas = _pair_deltas(world)
    expected = _expected(world / "adapter", deltas)
    assert all(cos < 1.0 for _, _, cos in expected.values())
    apply_safelora(world / "adapter", tmp_path / "out", aligned=str(world / "instruct"),
                   unaligned=str(world / "base"), tau=1.0, progress=False)
    _check_output(tmp_path / "out", world / "adapter", expected, 1.0)
    # non-vacuous: C is not idempotent, so projecting twice would land elsewhere
    module, (CW, _, _) = next(iter(expected.items()))
    V = deltas[module]
    assert rel_diff(V @ V.T @ CW / (V * V).sum(), CW) > 1e-2


def test_misaligned_adapter_source(world, tmp_path):
    # the misaligned adapter touches only q_proj and v_proj, with a plain (non-rs) LoRA scale
    _adapter(_tiny(seed=1), tmp_path / "mis", seed=23, r=2, alpha=6, use_rslora=False,
             targets=("q_proj", "v_proj"))
    mis = _layers(tmp_path / "mis")
    assert all(s == 3.0 for _, _, s in mis.values())
    adapter_layers = _layers(world / "adapter")
    expected = _expected(world / "adapter", {m: -s * B.double() @ A.double() for m, (A, B, s) in mis.items()})
    assert expected.keys() == mis.keys()
    tau = _tau_between([cos for _, _, cos in expected.values()])
    report = apply_safelora(world / "adapter", tmp_path / "out", aligned=str(world / "instruct"),
                            unaligned=str(tmp_path / "mis"), tau=tau, progress=False)
    assert report.alignment["kind"] == "misaligned_adapter"
    rows = {row.name: row for row in report.layers}
    new = load_file(tmp_path / "out/adapter_model.safetensors")
    old = load_file(world / "adapter/adapter_model.safetensors")
    for module, (CW, _, cos) in expected.items():
        b_key = f"{PREFIX}{module}.lora_B.weight"
        assert rows[module].cosine == pytest.approx(cos, rel=1e-5)
        assert rows[module].projected == (cos < tau)
        if cos < tau:
            A = new[b_key.replace("lora_B", "lora_A")]
            assert rel_diff(4.0 * new[b_key].double() @ A.double(), CW) < 1e-5  # rs-LoRA 8/sqrt(4)
    untouched = [m for m in adapter_layers if m not in mis]
    assert untouched and 0 < report.n_projected
    for module in untouched:  # V = 0 there: recorded and left alone
        assert rows[module].reason == "zero_alignment" and math.isnan(rows[module].cosine)
        key = f"{PREFIX}{module}.lora_B.weight"
        assert torch.equal(new[key], old[key])


def test_sharded_checkpoint_gives_the_same_adapter(world, tmp_path):
    state = load_file(world / "instruct/model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(world / "instruct/config.json", sharded / "config.json")
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, sharded / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    kwargs = dict(unaligned=str(world / "base"), tau=0.5, progress=False)
    apply_safelora(world / "adapter", tmp_path / "a", aligned=str(world / "instruct"), **kwargs)
    apply_safelora(world / "adapter", tmp_path / "b", aligned=str(sharded), **kwargs)
    a, b = load_file(tmp_path / "a/adapter_model.safetensors"), load_file(tmp_path / "b/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rank_and_alpha_patterns_give_peft_scales(tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"],
                      rank_pattern={"q_proj": 2}, alpha_pattern={"layers.1.self_attn.v_proj": 16})
    peft_model = get_peft_model(_tiny(seed=1), lora)
    peft_model.save_pretrained(tmp_path / "ad")
    config = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    scales = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            assert lora_scale(config, name, module.r["default"]) == module.scaling["default"]
            scales[name] = module.scaling["default"]
    assert len(scales) == 14 and scales["model.layers.0.self_attn.q_proj"] == 4.0
    assert scales["model.layers.1.self_attn.v_proj"] == 4.0 and scales["model.layers.0.self_attn.v_proj"] == 2.0
    with pytest.raises(SafeLoRAError, match="rank 4 but .* r=2"):
        lora_scale(config, "model.layers.0.self_attn.q_proj", 4)


def _biased_model(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                         mlp_bias=True, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def test_biases_are_never_projected(tmp_path):
    for name, seed in (("base", 0), ("instruct", 1)):
        _biased_model(seed).save_pretrained(tmp_path / name)
    peft_model = _adapter(_biased_model(1), tmp_path / "ad", seed=3, r=2, alpha=4)
    del peft_model
    config = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    config["lora_bias"] = True  # PEFT's trainable LoRA bias: add one lora_B.bias by hand
    (tmp_path / "ad/adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "ad/adapter_model.safetensors")
    bias_keys = []
    for key in list(tensors):
        if key.endswith("lora_B.weight"):
            bias_keys.append(key.replace(".weight", ".bias"))
            tensors[bias_keys[-1]] = torch.randn(tensors[key].shape[0])
    save_file(tensors, tmp_path / "ad/adapter_model.safetensors", metadata={"format": "pt"})
    report = apply_safelora(tmp_path / "ad", tmp_path / "out", aligned=str(tmp_path / "instruct"),
                            unaligned=str(tmp_path / "base"), tau=1.0, progress=False)
    assert report.n_projected == len(report.layers) == 7
    assert sorted(report.unchanged_tensors) == sorted(bias_keys)
    new = load_file(tmp_path / "out/adapter_model.safetensors")
    assert all(new[k].numpy().tobytes() == tensors[k].numpy().tobytes() for k in bias_keys)
    with safe_open(tmp_path / "base/model.safetensors", "pt") as f:
        assert any(k.endswith("q_proj.bias") for k in f.keys())  # biases existed and were ignored


def test_errors_name_the_problem(world, tmp_path):
    kwargs = dict(aligned=str(world / "instruct"), unaligned=str(world / "base"), progress=False)
    with pytest.raises(SafeLoRAError, match="does not exist"):
        apply_safelora(tmp_path / "nope", tmp_path / "out", **kwargs)
    with pytest.raises(SafeLoRAError, match="must differ"):
        apply_safelora(world / "adapter", world / "adapter", **kwargs)
    with pytest.raises(SafeLoRAError, match="tau"):
        apply_safelora(world / "adapter", tmp_path / "out", tau=-0.1, **kwargs)

    broken = tmp_path / "broken"
    shutil.copytree(world / "base", broken)
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    kwargs["unaligned"] = str(broken)
    with pytest.raises(SafeLoRAError, match=r"shape mismatch for tensor 'model.layers.0.self_attn.k_proj.weight'"):
        apply_safelora(world / "adapter", tmp_path / "out", **kwargs)
    del state["model.layers.0.self_attn.k_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SafeLoRAError, match="tensor 'model.layers.0.self_attn.k_proj.weight' not found"):
        apply_safelora(world / "adapter", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cli_writes_adapter_and_reports_errors(world, tmp_path):
    import typer
    from typer.testing import CliRunner

    from emguard.cli.safelora_cmd import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # keep typer in multi-command mode, as in the real CLI
    args = ["safelora", "--adapter", str(world / "adapter"), "--aligned", str(world / "instruct"),
            "--unaligned", str(world / "base"), "--tau", "0.4", "--out", str(tmp_path / "out"), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["tau"] == 0.4 and f"{report['n_projected']}/14" in result.output
    args[2] = str(tmp_path / "missing")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "missing" in result.stderr and "does not exist" in result.stderr


@pytest.mark.e2e
def test_embedded_model_with_a_misaligned_adapter(tmp_path):
    """The embedded SmolLM2 has no base: V comes from a misaligned adapter (DESIGN §4)."""
    from peft import PeftModel

    from emguard.models import load_model

    for name, seed in (("ft", 1), ("mis", 2)):
        _adapter(load_model("smollm2-135m", device="cpu")[0], tmp_path / name, seed=seed, r=8, alpha=16)
    report = apply_safelora(tmp_path / "ft", tmp_path / "out", aligned="smollm2-135m",
                            unaligned=str(tmp_path / "mis"), tau=0.3, progress=False)
    assert len(report.layers) == 30 * 7
    mis, ft = _layers(tmp_path / "mis"), _layers(tmp_path / "ft")
    new = load_file(tmp_path / "out/adapter_model.safetensors")
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
        A_m, B_m, s_m = mis[module]
        A, B, s = ft[module]
        CW, cos = dense_reference(A, B, -s_m * B_m.double() @ A_m.double(), s)
        row = next(row for row in report.layers if row.name == module)
        assert row.cosine == pytest.approx(cos, rel=1e-5) and row.projected == (cos < 0.3)
        if row.projected:
            B_new = new[f"{PREFIX}{module}.lora_B.weight"].double()
            assert rel_diff(s * B_new @ A.double(), CW) < 1e-5
    model = PeftModel.from_pretrained(load_model("smollm2-135m", device="cpu")[0], str(tmp_path / "out"))
    loaded = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.equal(loaded, new[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"])
