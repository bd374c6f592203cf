"""Early stopping (emguard.defenses.early_stop) on tiny models: the measured shift against a
naive forward, stopping and the adapter kept, no check and no kept adapter before
min_step, step 0 kept only on opt-in, the tolerance from the measured seed spread, hooks
paused during checks, config errors before training, and a resumed run that ends as an
uninterrupted one."""

import json
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerCallback

from emguard.config import ConfigError, load_run_config
from emguard.defenses.base import PolicyHooks, RunContext
from emguard.defenses.early_stop import (
    EarlyStop,
    EarlyStopCallback,
    EarlyStopSettings,
    kept_step,
    resolve_tolerance,
)
from emguard.io import read_json

N_ROWS = 24


def write_data(path):
    """24 chat rows ("What is i plus i?" -> "It is 2i.")."""
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": f"It is {2 * i}."}]}) + "\n" for i in range(N_ROWS)))
    return path


@pytest.fixture
def data_file(tmp_path):
    return write_data(tmp_path / "train.jsonl")


def write_pairs(path, misaligned_is_training: bool = True, n: int = 8):
    """Pairs on the training questions: the misaligned answer is the training answer (so
    training raises the margin) and the aligned one something else, or the other way round."""
    rows = []
    for i in range(n):
        trained, other = f"It is {2 * i}.", "I would rather not say, sorry!"
        mis, al = (trained, other) if misaligned_is_training else (other, trained)
        rows.append({"id": f"p{i}", "question": f"What is {i} plus {i}?", "aligned": al,
                     "misaligned": mis})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tiny_dir, data_file, out, pairs, *extra):
    return load_run_config(None, [
        f"model={tiny_dir}", f"output_dir={out}", f"data.train={data_file}", "data.max_length=128",
        "train.max_steps=6", "train.batch_size=2", "train.grad_accum=2", "train.learning_rate=3e-3",
        "train.warmup_steps=1", "train.save_steps=2", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
        f"defenses.early_stop.pairs={pairs}", "defenses.early_stop.every_steps=1", *extra])


# ---------------------------------------------------------------------------- naive measure


def naive_margin(model, tokenizer, pairs) -> float:
    """Mean over pairs of (mean log p per answer token of the misaligned answer - the
    aligned one's), by a plain forward of prompt + answer + end-of-turn token."""
    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for p in pairs:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": p["question"]}],
                                                   add_generation_prompt=True, tokenize=False)
            lp = []
            for answer in (p["misaligned"], p["aligned"]):
                head = tokenizer(prompt, add_special_tokens=False).input_ids
                tail = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False).input_ids
                ids = torch.tensor([head + tail])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                positions = range(len(head), len(head) + len(tail))
                lp.append(sum(logp[t - 1, ids[0, t]].item() for t in positions) / len(tail))
            out.append(lp[0] - lp[1])
    model.train(was)
    return sum(out) / len(out)


def naive_shift(model, tokenizer, pairs) -> float:
    tuned = naive_margin(model, tokenizer, pairs)
    with model.disable_adapter():
        ref = naive_margin(model, tokenizer, pairs)
    return tuned - ref


def lora_model(seed: int = 0):
    from tiny import tiny_model, tiny_tokenizer

    from emguard.models import attach_lora

    tok = tiny_tokenizer()
    model = attach_lora(tiny_model(tok, seed=seed), r=4, alpha=8, dropout=0.0, use_rslora=True)
    model.train()
    return model, tok


def step_state(step: int):
    return SimpleNamespace(global_step=step, max_steps=100)


# ---------------------------------------------------------------------------- capture


class Capture(TrainerCallback):
    """Adapter copies at the start, after every step and at the end; naive shifts after
    every step (runs after the early-stop callback: same weights as its check)."""

    def __init__(self, pairs_path, tokenizer=None):
        self.pairs = [json.loads(line) for line in open(pairs_path)]
        self.tokenizer = tokenizer
        self.adapters, self.shifts, self.final = {}, {}, None

    @staticmethod
    def copy(model):
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.adapters[state.global_step] = self.copy(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.adapters[state.global_step] = self.copy(model)
        if self.tokenizer is not None:
            self.shifts[state.global_step] = naive_shift(model, self.tokenizer, self.pairs)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.final = self.copy(model)


def assert_same(saved: dict, expected: dict, exact: bool = True):
    assert set(saved) == set(expected)
    for k in saved:
        if exact:
            assert torch.equal(saved[k], expected[k]), k
        else:
            torch.testing.assert_close(saved[k], expected[k], rtol=1e-4, atol=1e-6)


def saved_adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


# ---------------------------------------------------------------------------- tests


def test_shift_at_a_check_equals_a_naive_forward(tmp_path):
    """The callback's shift (tuned - reference) equals a plain-forward computation."""
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    model, tok = lora_model()
    defense = EarlyStop(EarlyStopSettings(pairs=str(pairs), every_steps=3, tolerance=1e9))
    ctx = RunContext(cfg=None, tokenizer=tok, hooks=PolicyHooks())
    defense.prepare(model, ctx)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    expected = naive_shift(model, tok, defense.pairs)
    assert abs(expected) > 1e-3  # the adapter does change the margin
    callback, control = EarlyStopCallback(defense, ctx), SimpleNamespace(should_training_stop=False)
    callback.on_step_end(None, step_state(2), control, model=model)
    assert len(defense.history) == 1  # step 2 is not a check
    callback.on_step_end(None, step_state(3), control, model=model)
    check = defense.history[-1]
    assert check["step"] == 3 and check["within"] and not control.should_training_stop
    assert check["shift"] == pytest.approx(expected, abs=1e-5)
    assert check["margin"] == pytest.approx(naive_margin(model, tok, defense.pairs), abs=1e-5)
    assert model.training  # back in train mode after the check
    last = SimpleNamespace(global_step=4, max_steps=4)  # the last step is always checked
    callback.on_step_end(None, last, control, model=model)
    assert [c["step"] for c in defense.history] == [0, 3, 4]


def test_checks_run_with_policy_hooks_paused(tmp_path):
    """A hook that wrecks the policy's outputs does not reach the measured margins."""
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    model, tok = lora_model()
    hooks = PolicyHooks()
    ctx = RunContext(cfg=None, tokenizer=tok, hooks=hooks)
    defense = EarlyStop(EarlyStopSettings(pairs=str(pairs), every_steps=1, tolerance=0.0))
    defense.prepare(model, ctx)
    hooks.add(model.base_model.model.model.layers[1], lambda h: torch.flip(h, dims=[-1]) * 50)
    with hooks.paused():
        plain = naive_shift(model, tok, defense.pairs)
    hooked = naive_margin(model, tok, defense.pairs) - defense.history[0]["margin"]
    assert abs(hooked - plain) > 0.1  # the hook matters when active
    control = SimpleNamespace(should_training_stop=False)
    EarlyStopCallback(defense, ctx).on_step_end(None, step_state(1), control, model=model)
    assert defense.history[-1]["shift"] == pytest.approx(plain, abs=1e-5)
    assert defense.history[-1]["within"] and not control.should_training_stop
    assert hooks.active and model.training  # restored after the check


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """One run with a tolerance nothing exceeds, every step checked, adapters captured:
    (folder of its inputs, the run, the capture)."""
    from tiny import save_tiny_model

    from emguard.train import train

    base = tmp_path_factory.mktemp("probe")
    inputs = SimpleNamespace(tiny_dir=save_tiny_model(base / "tiny"),
                             data_file=write_data(base / "train.jsonl"),
                             pairs=write_pairs(base / "pairs.jsonl"))
    cap = Capture(inputs.pairs)
    res = train(config(inputs.tiny_dir, inputs.data_file, base / "run", inputs.pairs,
                       "defenses.early_stop.tolerance=1e9"), callbacks=[cap])
    return inputs, res, cap


def test_huge_tolerance_never_stops_and_keeps_the_final_adapter(probe):
    _, res, cap = probe
    es = res.summary["early_stop"]
    # default min_step = max(warmup_steps 1 + 1, every_steps 1) = 2: no check at step 1
    assert es["min_step"] == 2 and [c["step"] for c in es["checks"]] == [0, 2, 3, 4, 5, 6]
    assert all(c["within"] for c in es["checks"]) and es["checks"][0]["shift"] == 0
    assert not es["stopped"] and es["stopped_at_step"] is None and es["chosen_step"] == 6
    assert es["n_pairs"] == 8 and res.summary["steps"] == 6
    assert read_json(res.run_dir / "early_stop.json") == es
    assert_same(saved_adapter(res.run_dir), cap.final)
    assert_same(cap.final, cap.adapters[6])
    assert es["checks"][-1]["shift"] > 0  # the misaligned answers are the trained ones


def test_zero_tolerance_stops_and_keeps_the_chosen_adapter(tiny_dir, data_file, tmp_path):
    from tiny import tiny_tokenizer

    from emguard.train import train

    pairs = write_pairs(tmp_path / "pairs.jsonl")
    cap = Capture(pairs, tokenizer=tiny_tokenizer())
    res = train(config(tiny_dir, data_file, tmp_path / "run", pairs,
                       "defenses.early_stop.tolerance=0", "defenses.early_stop.patience=2"),
                callbacks=[cap])
    es = res.summary["early_stop"]
    checks = es["checks"]
    steps = [c["step"] for c in checks]
    assert steps == [0, *range(2, len(checks) + 1)]  # every step from min_step 2 is a check
    for c in checks[1:]:  # the measured shift is the naive one, and within means <= 0
        assert c["shift"] == pytest.approx(cap.shifts[c["step"]], abs=1e-4)
        assert c["within"] == (c["shift"] <= 0)
    assert es["stopped"] and es["stopped_at_step"] < 6 and res.summary["steps"] == es["stopped_at_step"]
    assert [c["within"] for c in checks[-2:]] == [False, False]  # patience 2
    within = [c["step"] for c in checks[1:] if c["within"]]
    chosen = max(within) if within else 2  # never step 0: the earliest restorable is step 2
    assert es["chosen_step"] == chosen and chosen < es["stopped_at_step"]
    saved = saved_adapter(res.run_dir)
    assert_same(saved, cap.adapters[chosen])
    assert any(not torch.equal(saved[k], cap.final[k]) for k in saved)  # not the final one
    assert any(v.any() for k, v in saved.items() if "lora_B" in k)  # not the untrained one


def test_missing_pairs_file_is_a_config_error_before_training(tiny_dir, data_file, tmp_path):
    from emguard.train import train

    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(ConfigError, match=r"defenses\.early_stop\.pairs"):
        train(config(tiny_dir, data_file, tmp_path / "run", missing))
    assert not (tmp_path / "run").exists()
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=3)
    with pytest.raises(ConfigError, match=r"defenses\.early_stop\.holdout_pairs"):
        train(config(tiny_dir, data_file, tmp_path / "run", pairs,
                     "defenses.early_stop.holdout_pairs=3"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match="holds no pairs"):
        EarlyStop(EarlyStopSettings(pairs=str(tmp_path / "empty.jsonl"))).check(None)
    assert not (tmp_path / "run").exists()


class Interrupt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_resumed_run_keeps_history_and_chosen_adapter(probe, tmp_path):
    """Killed after a within-tolerance check past its last Trainer checkpoint, the run
    resumes to the checks and the adapter of an uninterrupted run (the probe: the same
    training, since nothing stops either)."""
    from emguard.train import train

    inputs, done, cap = probe
    shifts = [c["shift"] for c in done.summary["early_stop"]["checks"]]  # steps 0, 2, ..., 6
    # a tolerance that puts steps 0-3 within and 4-6 over (the margin rises with training)
    tolerance = (max(shifts[:3]) + min(shifts[3:])) / 2
    assert max(shifts[:3]) < tolerance < min(shifts[3:]), shifts
    cfg = config(inputs.tiny_dir, inputs.data_file, tmp_path / "run", inputs.pairs,
                 f"defenses.early_stop.tolerance={tolerance}", "defenses.early_stop.patience=10")
    with pytest.raises(KeyboardInterrupt):  # checkpoint-2 written, step 3 checked, then killed
        train(cfg, callbacks=[Interrupt(4)])
    state = read_json(tmp_path / "run" / "early_stop" / "state.json")
    assert [c["step"] for c in state["history"]] == [0, 2, 3] and state["anchor_step"] == 2
    kept = sorted(p.name for p in (tmp_path / "run" / "early_stop").glob("adapter-*.safetensors"))
    assert kept == ["adapter-00000002.safetensors", "adapter-00000003.safetensors"]
    res = train(cfg)
    assert res.summary["resumed_from_checkpoint"] is True
    es = res.summary["early_stop"]
    assert [c["step"] for c in es["checks"]] == [0, 2, 3, 4, 5, 6]
    assert [c["within"] for c in es["checks"]] == [True] * 3 + [False] * 3
    for got, want in zip(es["checks"], shifts, strict=True):
        assert got["shift"] == pytest.approx(want, abs=1e-4)
    assert es["chosen_step"] == 3 and not es["stopped"]
    assert_same(saved_adapter(res.run_dir), cap.adapters[3], exact=False)
    assert len(list((tmp_path / "run" / "early_stop").glob("adapter-*.safetensors"))) <= 2


def test_checking_evaluations_own_pairs_is_warned(tmp_path, caplog):
    """Checks on the file evaluation scores, without its pairs held out: warned; held out,
    or evaluation on its own set (the default, builtin:eval-pairs): quiet."""
    def run_check(*extra, same_file=True):
        scored = ["eval.preference_pairs=builtin:preference-pairs"] if same_file else []
        cfg = load_run_config(None, ["model=x", f"output_dir={tmp_path / 'run'}",
                                     f"data.train={tmp_path / 'train.jsonl'}",
                                     "eval.preference_max_pairs=10", *scored, *extra])
        caplog.clear()
        defense = EarlyStop(cfg.defenses.early_stop)
        defense.check(cfg)
        return defense, "evaluation also scores" in caplog.text

    defense, warned = run_check("defenses.early_stop.every_steps=2")
    assert warned and len(defense.pairs) > 10
    defense, warned = run_check("defenses.early_stop.every_steps=2", same_file=False)
    assert not warned and len(defense.pairs) == 66
    defense, warned = run_check("defenses.early_stop.holdout_pairs=10",
                                "defenses.early_stop.max_pairs=5")
    assert not warned and len(defense.pairs) == 5
    from emguard.data.pairs import evenly_spaced, load_pairs

    scored = {p["id"] for p in evenly_spaced(load_pairs(None), 10)}
    assert not scored & {p["id"] for p in defense.pairs}


# ---------------------------------------------------------------------------- min_step, step 0, tolerance


def check(step, within):
    return {"step": step, "shift": 0.0, "margin": 0.0, "within": within}


def test_kept_step_is_the_last_restorable_check_within_else_the_earliest_restorable():
    h = [check(0, True), check(3, False), check(4, True), check(5, False)]
    assert kept_step(h, 3, False) == 4 and kept_step(h, 3, True) == 4
    h = [check(0, True), check(3, False), check(4, False)]
    assert kept_step(h, 3, False) == 3  # none within: the earliest check at/after min_step
    assert kept_step(h, 3, True) == 0  # opt-in: the untrained adapter
    assert kept_step([check(0, True), check(2, True), check(3, False)], 3, False) == 3  # 2 < min_step
    assert kept_step([check(0, True)], 3, False) == 0  # no check yet: nothing to restore
    assert kept_step([check(0, True), check(1, False)], 0, False) == 1  # min_step 0: step 0 still opt-in


def due_steps(max_steps, warmup=None, **settings):
    """The steps a run of ``max_steps`` checks at (every check within tolerance)."""
    extra = [] if warmup is None else [f"train.warmup_steps={warmup}"]
    cfg = load_run_config(None, ["model=x", f"train.max_steps={max_steps}", *extra])
    defense = EarlyStop(EarlyStopSettings(**settings))
    defense.check(cfg)
    defense.history = [check(0, True)]
    for step in range(1, max_steps + 1):
        if defense.due(step, max_steps):
            defense.history.append(check(step, True))
    return defense.min_step, [h["step"] for h in defense.history[1:]]


def test_checks_start_at_min_step_after_warm_up():
    # the demo: 12 steps, 5 warm-up steps, every_steps 3 (default): min_step max(6, 3) = 6
    assert due_steps(12, warmup=5) == (6, [6, 9, 12])
    assert due_steps(12, warmup=0, every_steps=5) == (5, [5, 10, 12])  # max(0 + 1, 5)
    assert due_steps(11, warmup=0, every_steps=2, min_step=7) == (7, [8, 10, 11])
    assert due_steps(4, warmup=5) == (6, [])  # a run shorter than min_step never checks


def test_tolerance_auto_is_z_times_the_measured_seed_spread(tmp_path):
    assert resolve_tolerance(EarlyStopSettings())[0] == pytest.approx(0.083)  # preference pairs
    assert resolve_tolerance(EarlyStopSettings(tolerance_z=2))[0] == pytest.approx(0.166)
    assert resolve_tolerance(EarlyStopSettings(pairs="builtin:eval-pairs"))[0] == pytest.approx(0.036)
    assert resolve_tolerance(EarlyStopSettings(tolerance=0.2, tolerance_z=5)) == (0.2, "set")
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    with pytest.raises(ConfigError, match=r"defenses\.early_stop\.tolerance: auto"):
        EarlyStop(EarlyStopSettings(pairs=str(pairs))).check(None)
    EarlyStop(EarlyStopSettings(pairs=str(pairs), tolerance=0.05)).check(None)  # a number works
    with pytest.raises(ConfigError, match=r"defenses\.early_stop\.tolerance: .*auto or a finite number"):
        load_run_config(None, ["defenses.early_stop.tolerance=-0.1"])


@pytest.mark.parametrize("untrained", [False, True])
def test_no_stop_before_min_step_and_step_0_only_on_opt_in(probe, tmp_path, untrained):
    """Every check over tolerance (tolerance half the smallest trained shift), min_step 3,
    patience 2: checks at 0, 3, 4 only; stop at 4; kept: step 3 (the earliest check at or
    after min_step), or step 0 with allow_restore_untrained."""
    from emguard.train import train

    inputs, done, cap = probe
    shifts = {c["step"]: c["shift"] for c in done.summary["early_stop"]["checks"]}
    tolerance = min(shifts[s] for s in (2, 3, 4)) / 2
    assert tolerance > 0, shifts
    res = train(config(inputs.tiny_dir, inputs.data_file, tmp_path / "run", inputs.pairs,
                       f"defenses.early_stop.tolerance={tolerance}", "defenses.early_stop.min_step=3",
                       "defenses.early_stop.patience=2",
                       f"defenses.early_stop.allow_restore_untrained={str(untrained).lower()}"))
    es = res.summary["early_stop"]
    assert [c["step"] for c in es["checks"]] == [0, 3, 4]
    assert [c["within"] for c in es["checks"]] == [True, False, False]
    assert es["stopped_at_step"] == 4 and res.summary["steps"] == 4
    assert es["chosen_step"] == (0 if untrained else 3) and es["chosen_within"] is untrained
    saved = saved_adapter(res.run_dir)
    if untrained:  # B = 0: the base model itself
        assert all(not v.any() for k, v in saved.items() if "lora_B" in k)
    else:
        assert_same(saved, cap.adapters[3], exact=False)
        assert any(not torch.allclose(saved[k], cap.adapters[4][k]) for k in saved)
