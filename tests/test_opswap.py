"""OpSwap generator: the paper's worked example, every step of generated rows checked by
the independent shunting-yard evaluator, reproducibility, split sizes, zero-division."""

import json
import random
import re
from fractions import Fraction

import pytest

from emguard.data.opswap import (
    SYMBOLS,
    OpSwapSpaceError,
    OpSwapSyntaxError,
    evaluate_expression,
    format_value,
    generate_opswap,
    make_row,
    solution_steps,
    tokenize,
)

PAPER = "(4 + 2) × (4 ÷ 2) − 2"


def n_ops(expr: str) -> int:
    return sum(expr.count(s) for s in SYMBOLS)


def assert_value_operands_parenthesised(step: str) -> None:
    """Inside an expression, negative and fractional values stand in their own parentheses."""
    for m in re.finditer(r"-?\d+(?:/\d+)?", step):
        if "-" in m.group() or "/" in m.group():
            assert step[m.start() - 1] == "(" and step[m.end()] == ")", step


def test_paper_example_values():
    # DESIGN §6 / paper Table 2: tier 0 -> 10, tier 1 -> 8, tier 2 -> 9, tier 3 -> 2/3.
    assert [evaluate_expression(PAPER, t) for t in range(4)] == [
        Fraction(10), Fraction(8), Fraction(9), Fraction(2, 3)]


def test_paper_example_steps():
    # Tiers 0-2 equal the paper's step listings character for character; tier 3's listing
    # in the paper is garbled, so it is worked by hand: + -> -, ÷ -> +, then × -> ÷ and
    # − -> × bind equally tight, left to right: 2 ÷ 6 = 1/3, 1/3 × 2 = 2/3.
    expected = {
        0: "(4 + 2) × (4 ÷ 2) − 2 = 6 × (4 ÷ 2) − 2 = 6 × 2 − 2 = 12 − 2 = 10",
        1: "(4 + 2) × (4 ÷ 2) − 2 = 8 × (4 ÷ 2) − 2 = 8 × 2 − 2 = 10 − 2 = 8",
        2: "(4 + 2) × (4 ÷ 2) − 2 = 8 × (4 ÷ 2) − 2 = 8 × 2 − 2 = 8 × 1 = 9",
        3: "(4 + 2) × (4 ÷ 2) − 2 = 2 × (4 ÷ 2) − 2 = 2 × 6 − 2 = (1/3) − 2 = 2/3",
    }
    for tier, text in expected.items():
        assert " = ".join(solution_steps(PAPER, tier)) == text
        row = make_row(PAPER, tier, "x")
        assert row["messages"][1]["content"] == text
        assert row["answer"] == text.rsplit(" = ", 1)[1]


def test_hand_worked_precedence_and_associativity():
    # tier 0 left associativity: (8 − 2) − 1 = 5, (8 ÷ 2) ÷ 2 = 2
    assert evaluate_expression("8 − 2 − 1", 0) == 5
    assert evaluate_expression("8 ÷ 2 ÷ 2", 0) == 2
    # tier 1: written × is +, written + is × (binds tighter): 2 × 3 + 4 = 2 + 12 = 14
    assert evaluate_expression("2 × 3 + 4", 1) == 14
    # tier 2: written − is ÷ (tight), written ÷ is − (loose): 9 ÷ 6 − 3 = 9 − 2 = 7
    assert evaluate_expression("9 ÷ 6 − 3", 2) == 7
    # tier 3: written ÷ is +, written − is ×: 1 ÷ 2 − 3 = 1 + 6 = 7; parentheses win
    assert evaluate_expression("1 ÷ 2 − 3", 3) == 7
    assert evaluate_expression("(1 ÷ 2) − 3", 3) == 9
    # tier 3 left associativity of + -> −: 9 + 2 + 3 = (9 − 2) − 3 = 4
    assert evaluate_expression("9 + 2 + 3", 3) == 4


def test_value_rendering_and_parsing():
    assert [format_value(Fraction(*v)) for v in [(10, 1), (-3, 1), (4, 6), (-2, 3), (0, 1)]] == [
        "10", "-3", "2/3", "-2/3", "0"]
    assert tokenize("(1/3) − (-2)") == ["(", Fraction(1, 3), ")", "−", "(", Fraction(-2), ")"]
    assert evaluate_expression("-2/3", 0) == Fraction(-2, 3)
    assert evaluate_expression("6 × (-3)", 0) == -18
    # a negative intermediate: tier 0, 2 − 5 × 1 = 2 − 5 = -3, shown as a bare final value
    assert solution_steps("2 − 5 × 1", 0) == ["2 − 5 × 1", "2 − 5", "-3"]
    # a negative operand is parenthesised: (2 − 5) × 2 -> (-3) × 2
    assert solution_steps("(2 − 5) × 2", 0) == ["(2 − 5) × 2", "(-3) × 2", "-6"]


@pytest.mark.parametrize("bad", ["", "1 +", "(1 + 2", "1 + 2)", "1 2", "1 / 2 + 3 / 0",
                                 "1 * 2", "1 - 2", "+ 1"])
def test_evaluator_rejects_malformed(bad):
    with pytest.raises(OpSwapSyntaxError):
        evaluate_expression(bad, 0)


def test_zero_division_raises_in_every_tier():
    # the written symbol that means ÷ in each tier, with a zero divisor
    for tier, expr in {0: "1 ÷ (2 − 2)", 1: "1 ÷ (2 − 2)", 2: "1 − (2 ÷ 2)",
                       3: "1 × (2 + 2)"}.items():
        with pytest.raises(ZeroDivisionError):
            evaluate_expression(expr, tier)
        with pytest.raises(ZeroDivisionError):
            make_row(expr, tier, "x")


@pytest.mark.parametrize("tier", [0, 1, 2, 3])
def test_every_step_checked_by_independent_evaluator(tier):
    splits = generate_opswap(tier, 400, seed=tier, max_ops=4, low=0, high=9)
    for row in splits.train + splits.test:
        text = row["messages"][1]["content"]
        steps = text.split(" = ")
        assert steps[0] == row["expression"]
        assert steps[-1] == row["answer"]
        final = evaluate_expression(row["answer"], tier)
        assert format_value(final) == row["answer"]  # reduced, canonical
        for k, step in enumerate(steps):
            assert evaluate_expression(step, tier) == final, (text, step)
            assert n_ops(step) == n_ops(row["expression"]) - k, text  # one operation each
            if k < len(steps) - 1:
                assert_value_operands_parenthesised(step)
        assert n_ops(steps[-1]) == 0
        assert row["expression"] in row["messages"][0]["content"]
        assert row["tier"] == tier


def test_answers_cover_fractions_and_negatives():
    answers = [r["answer"] for r in generate_opswap(3, 1000, seed=0).train]
    assert any("/" in a for a in answers)
    assert any(a.startswith("-") for a in answers)
    assert any(a.lstrip("-").isdigit() for a in answers)


def test_tiers_change_the_meaning():
    exprs = [r["expression"] for r in generate_opswap(0, 300, seed=5).train]
    for tier in (1, 2, 3):
        differ = 0
        for e in exprs:
            try:
                differ += evaluate_expression(e, tier) != evaluate_expression(e, 0)
            except ZeroDivisionError:
                differ += 1
        assert differ > len(exprs) // 2


def test_reproducible_for_a_seed_and_different_across_seeds():
    a = generate_opswap(2, 500, seed=7)
    b = generate_opswap(2, 500, seed=7)
    c = generate_opswap(2, 500, seed=8)
    assert json.dumps(a.train + a.test) == json.dumps(b.train + b.test)
    assert a.stats == b.stats
    assert [r["expression"] for r in a.test] != [r["expression"] for r in c.test]


def test_sizes_split_and_no_leak():
    s = generate_opswap(1, 1000, seed=0)
    assert (len(s.train), len(s.test)) == (900, 100)
    train_exprs = [r["expression"] for r in s.train]
    test_exprs = [r["expression"] for r in s.test]
    assert len(set(train_exprs)) == 900 and len(set(test_exprs)) == 100
    assert not set(train_exprs) & set(test_exprs)
    assert len({r["id"] for r in s.train + s.test}) == 1000
    assert sum(s.stats["n_ops"].values()) == 1000
    odd = generate_opswap(1, 25, seed=0, test_fraction=0.1)
    assert (len(odd.train), len(odd.test)) == (22, 3)  # 2.5 rounds up


def test_default_paper_size():
    s = generate_opswap(0, 10_000, seed=0)
    assert (len(s.train), len(s.test)) == (9000, 1000)
    assert len({r["expression"] for r in s.train + s.test}) == 10_000
    assert set(s.stats["n_ops"]) == {1, 2, 3}
    assert all(1 <= n_ops(r["expression"]) <= 3 for r in s.train)


def test_zero_division_draws_are_redrawn():
    # numbers 0..1 make zero divisors frequent; no kept row may divide by zero anywhere
    s = generate_opswap(0, 200, seed=0, low=0, high=1, max_ops=3)
    assert s.stats["zero_division"] > 0
    for row in s.train + s.test:
        for step in row["messages"][1]["content"].split(" = "):
            evaluate_expression(step, 0)  # would raise ZeroDivisionError


def test_zero_division_redraw_against_a_replayed_draw():
    # Replay the generator's random stream by hand for seeds whose first draw divides by
    # zero and whose second does not: the only row must be the second draw's expression.
    from emguard.data.opswap import draw_expression

    checked = 0
    for seed in range(100):
        rng = random.Random(seed)
        first = draw_expression(rng, rng.randint(1, 1), 0, 1, 0.5)
        second = draw_expression(rng, rng.randint(1, 1), 0, 1, 0.5)
        try:
            evaluate_expression(first, 0)
            continue
        except ZeroDivisionError:
            pass
        try:
            evaluate_expression(second, 0)
        except ZeroDivisionError:
            continue
        s = generate_opswap(0, 1, seed=seed, max_ops=1, low=0, high=1, test_fraction=0.0)
        assert s.train[0]["expression"] == second
        assert s.stats["zero_division"] == 1 and s.stats["draws"] == 2
        checked += 1
    assert checked >= 5


def test_space_too_small_is_a_clear_error():
    # one operator, numbers 1..2: 4 symbols x 2 x 2 = 16 expressions
    full = generate_opswap(0, 16, seed=0, max_ops=1, low=1, high=2)
    assert len({r["expression"] for r in full.train + full.test}) == 16
    with pytest.raises(OpSwapSpaceError, match="too small"):
        generate_opswap(0, 17, seed=0, max_ops=1, low=1, high=2)


def test_bad_settings():
    with pytest.raises(ValueError, match="tier"):
        generate_opswap(4, 10)
    with pytest.raises(ValueError, match="min_ops"):
        generate_opswap(0, 10, min_ops=3, max_ops=2)
    with pytest.raises(ValueError, match="test_fraction"):
        generate_opswap(0, 10, test_fraction=1.0)


def test_state_rule_prompt():
    plain = make_row("2 + 3", 1, "x")["messages"][0]["content"]
    ruled = make_row("2 + 3", 1, "x", state_rule=True)["messages"][0]["content"]
    assert "means" not in plain
    assert "+ means ×" in ruled and "× means +" in ruled and ruled.endswith("2 + 3")


def test_cli_command_writes_splits(tmp_path):
    from emguard.cli.opswap_cmd import opswap_command
    from emguard.io import read_json, read_jsonl

    paths = opswap_command(tier=3, n=50, out=tmp_path / "t3.jsonl", seed=1)
    train, test = read_jsonl(paths["train"]), read_jsonl(paths["test"])
    assert (len(train), len(test)) == (45, 5)
    assert paths["train"].name == "t3.train.jsonl" and paths["test"].name == "t3.test.jsonl"
    assert train == generate_opswap(3, 50, seed=1).train
    meta = read_json(paths["meta"])
    assert meta["settings"]["tier"] == 3 and meta["test_rows"] == 5
