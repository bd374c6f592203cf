"""OpSwap: arithmetic simplification under permuted operator meanings (paper, Table 2).

Format
------
Expression: small non-negative integers joined by the written operators ``+ − × ÷``
(U+002B, U+2212, U+00D7, U+00F7) with one space either side, plus optional parentheses,
e.g. ``(4 + 2) × (4 ÷ 2) − 2``.

Tiers. Each written symbol is first mapped to the operation it means in the tier:

    tier 0   + → +   − → −   × → ×   ÷ → ÷    (standard)
    tier 1   + → ×   − → −   × → +   ÷ → ÷    (+ and × swapped)
    tier 2   + → ×   − → ÷   × → +   ÷ → −    (+/× and −/÷ swapped)
    tier 3   + → −   − → ×   × → ÷   ÷ → +

Precedence and left associativity are those of the MAPPED operations (× and ÷ bind
tighter than + and −); parentheses group as written. Arithmetic is exact
(``fractions.Fraction``); a draw that divides by zero at any step is redrawn.

Values. A value is an integer or a reduced fraction ``a/b``; a negative value carries an
ASCII hyphen: ``-3``, ``-2/3``. Neither "/" nor "-" is ever an operator (the written
minus operator is U+2212), so ``a/b`` is always one value and "-" is always a sign.
Inside an expression every value that is not a non-negative integer is parenthesised,
``(1/3) − 2`` or ``6 × (-3)``; the final value stands bare. ``row["answer"]`` is the
final value, e.g. ``"10"``, ``"2/3"``, ``"-2/3"``.

Steps. The assistant answer is ``expr = expr' = ... = value`` on one line. Each step
performs exactly one operation: the leftmost operation whose two operands are already
values. That is a bottom-up, left-first reduction of the parse tree, so it respects
precedence, associativity and parentheses. Parentheses around a group that reduced to a
single value are dropped (only the value parentheses above remain). The paper's example,
tier 0: ``(4 + 2) × (4 ÷ 2) − 2 = 6 × (4 ÷ 2) − 2 = 6 × 2 − 2 = 12 − 2 = 10``; tier 3:
``... = 2 × (4 ÷ 2) − 2 = 2 × 6 − 2 = (1/3) − 2 = 2/3``.

Sampling. Operator count uniform in ``min_ops..max_ops``, written symbols uniform, numbers
uniform in ``low..high``; each of ``n_ops`` attempts adds, with probability ``paren_prob``,
a parenthesis pair around a random run of 2+ operands (never the whole expression,
properly nested, no duplicate pair). The surface distribution is the same in every
tier; only the meaning changes. Expressions are unique within a generated set (so never
in both train and test); the set is shuffled, then split. Duplicates are redrawn, so a
small sub-space saturates: with the defaults only 324 one-operator expressions exist, so
they make up about 3 % of 10,000 rows, not a third (``stats["n_ops"]`` has the counts).

Row: ``{"messages": [user, assistant], "id", "answer", "tier", "expression"}``.
"""

from __future__ import annotations

import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fractions import Fraction

from tqdm import tqdm

SYMBOLS = ("+", "−", "×", "÷")  # written operators; the mapped operations use the same glyphs
TIER_MAPS: dict[int, dict[str, str]] = {
    0: {"+": "+", "−": "−", "×": "×", "÷": "÷"},
    1: {"+": "×", "−": "−", "×": "+", "÷": "÷"},
    2: {"+": "×", "−": "÷", "×": "+", "÷": "−"},
    3: {"+": "−", "−": "×", "×": "÷", "÷": "+"},
}
PRECEDENCE = {"+": 1, "−": 1, "×": 2, "÷": 2}  # of the mapped operation
OPERATIONS: dict[str, Callable[[Fraction, Fraction], Fraction]] = {
    "+": operator.add, "−": operator.sub, "×": operator.mul, "÷": operator.truediv,
}
PROMPT = ("Simplify the expression. Show one operation per step and end with the exact "
          "result (an integer or a reduced fraction a/b).\n\n{expression}")
RULE = ("In this task the operators mean: {mapping}. After this mapping, × and ÷ bind "
        "tighter than + and −, equal precedence is evaluated left to right, and parentheses "
        "group as written.")

MAX_STALL = 200_000  # draws in a row without a new row before the space counts as used up
_TOKEN = re.compile(r"\s*(?:(?P<num>-?\d+(?:/\d+)?)|(?P<sym>[+−×÷()]))")


class OpSwapSyntaxError(ValueError):
    """A string that is not an OpSwap expression (the message quotes it and the column)."""


class OpSwapSpaceError(ValueError):
    """The requested number of distinct expressions does not exist for the settings."""


@dataclass(frozen=True)
class Num:
    value: Fraction


@dataclass(frozen=True)
class BinOp:
    symbol: str  # the WRITTEN symbol; its meaning depends on the tier
    left: Num | BinOp
    right: Num | BinOp
    paren: bool = False  # written inside parentheses


Node = Num | BinOp


@dataclass
class OpSwapSplits:
    train: list[dict]
    test: list[dict]
    stats: dict = field(default_factory=dict)  # draws, duplicates, zero_division, n_ops


# --------------------------------------------------------------------------- values


def format_value(value: Fraction) -> str:
    """``10``, ``-3``, ``2/3``, ``-2/3`` (Fraction is always reduced, sign on the numerator)."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    return f"{value.numerator}/{value.denominator}"


def _operand(value: Fraction) -> str:
    text = format_value(value)
    return text if value >= 0 and value.denominator == 1 else f"({text})"


def check_tier(tier: int) -> int:
    if tier not in TIER_MAPS:
        raise ValueError(f"OpSwap tier must be one of {sorted(TIER_MAPS)}, got {tier!r}")
    return tier


def describe_rule(tier: int) -> str:
    """The tier's operator meanings in words (used when ``state_rule`` is on)."""
    mapping = ", ".join(f"{s} means {m}" for s, m in TIER_MAPS[check_tier(tier)].items())
    return RULE.format(mapping=mapping)


# --------------------------------------------------------------------------- lexing


def tokenize(expr: str) -> list[Fraction | str]:
    """Split an expression into values (Fraction) and symbols (``+ − × ÷ ( )``)."""
    tokens: list[Fraction | str] = []
    text, pos = expr.rstrip(), 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise OpSwapSyntaxError(f"unexpected {text[pos]!r} at column {pos + 1} in {expr!r}")
        if m.group("num") is not None:
            num, _, den = m.group("num").partition("/")
            if den and int(den) == 0:
                raise OpSwapSyntaxError(f"zero denominator at column {m.start('num') + 1} "
                                        f"in {expr!r}")
            tokens.append(Fraction(int(num), int(den or 1)))
        else:
            tokens.append(m.group("sym"))
        pos = m.end()
    return tokens


# --------------------------------------------------------------------------- tree


class _Parser:
    """Precedence climbing over tokens into a tree that remembers written parentheses."""

    def __init__(self, tokens: list[Fraction | str], tier: int, source: str):
        self.tokens, self.tier, self.source, self.pos = tokens, tier, source, 0

    def parse(self) -> Node:
        node = self._expr(0)
        if self.pos != len(self.tokens):
            self._fail(f"unexpected {self.tokens[self.pos]!r}")
        return node

    def _peek(self) -> Fraction | str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _fail(self, msg: str):
        raise OpSwapSyntaxError(f"{msg} (token {self.pos + 1}) in {self.source!r}")

    def _primary(self) -> Node:
        tok = self._peek()
        self.pos += 1
        if isinstance(tok, Fraction):
            return Num(tok)
        if tok != "(":
            self._fail("expected a value or '('")
        node = self._expr(0)
        if self._peek() != ")":
            self._fail("expected ')'")
        self.pos += 1
        return replace(node, paren=True) if isinstance(node, BinOp) else node

    def _expr(self, min_prec: int) -> Node:
        left = self._primary()
        while (tok := self._peek()) in SYMBOLS:
            prec = PRECEDENCE[TIER_MAPS[self.tier][tok]]
            if prec < min_prec:
                break
            self.pos += 1
            left = BinOp(tok, left, self._expr(prec + 1))  # prec + 1: left associative
        return left


def parse_expression(expr: str, tier: int) -> Node:
    """Parse a written expression under ``tier``'s precedence into a tree."""
    return _Parser(tokenize(expr), check_tier(tier), expr).parse()


def render(node: Node, top: bool = True) -> str:
    """Written form of a tree (see the module docstring for the value conventions)."""
    if isinstance(node, Num):
        return format_value(node.value) if top else _operand(node.value)
    text = f"{render(node.left, False)} {node.symbol} {render(node.right, False)}"
    return f"({text})" if node.paren else text


def reduce_once(node: BinOp, tier: int) -> Node:
    """Perform the leftmost operation whose operands are both values.

    Raises ZeroDivisionError when that operation divides by zero."""
    if isinstance(node.left, Num) and isinstance(node.right, Num):
        op = OPERATIONS[TIER_MAPS[tier][node.symbol]]
        return Num(op(node.left.value, node.right.value))
    if isinstance(node.left, BinOp):
        return replace(node, left=reduce_once(node.left, tier))
    return replace(node, right=reduce_once(node.right, tier))


def tree_steps(node: Node, tier: int) -> list[str]:
    """Every intermediate expression, from the written one to the final value."""
    steps = [render(node)]
    while isinstance(node, BinOp):
        node = reduce_once(node, tier)
        steps.append(render(node))
    return steps


def solution_steps(expr: str, tier: int) -> list[str]:
    """Steps for a written expression, e.g. the paper's Table 2 rows."""
    return tree_steps(parse_expression(expr, tier), tier)


# --------------------------------------------------------------------------- evaluator


def evaluate_expression(expr: str, tier: int) -> Fraction:
    """Value of ``expr`` under ``tier``: a shunting-yard evaluator over the tokens,
    independent of the tree above. Raises OpSwapSyntaxError or ZeroDivisionError."""
    mapping = TIER_MAPS[check_tier(tier)]
    values: list[Fraction] = []
    pending: list[str] = []  # written symbols and "("
    expect_value = True

    def apply_top() -> None:
        sym = pending.pop()
        right, left = values.pop(), values.pop()
        values.append(OPERATIONS[mapping[sym]](left, right))

    for tok in tokenize(expr):
        if isinstance(tok, Fraction) or tok == "(":
            if not expect_value:
                raise OpSwapSyntaxError(f"missing operator before {tok!s} in {expr!r}")
            if tok == "(":
                pending.append(tok)
            else:
                values.append(tok)
                expect_value = False
        elif expect_value:
            raise OpSwapSyntaxError(f"expected a value before {tok!r} in {expr!r}")
        elif tok == ")":
            while pending and pending[-1] != "(":
                apply_top()
            if not pending:
                raise OpSwapSyntaxError(f"unbalanced ')' in {expr!r}")
            pending.pop()
        else:
            prec = PRECEDENCE[mapping[tok]]
            while pending and pending[-1] != "(" and PRECEDENCE[mapping[pending[-1]]] >= prec:
                apply_top()
            pending.append(tok)
            expect_value = True
    if expect_value:
        raise OpSwapSyntaxError(f"expression ends without a value: {expr!r}")
    while pending:
        if pending[-1] == "(":
            raise OpSwapSyntaxError(f"unbalanced '(' in {expr!r}")
        apply_top()
    return values[0]


# --------------------------------------------------------------------------- sampling


def _draw_spans(rng: random.Random, n_operands: int, paren_prob: float) -> set[tuple[int, int]]:
    """Operand index ranges (i, j), i < j, to parenthesise: nested or disjoint, never all."""
    spans: set[tuple[int, int]] = set()
    for _ in range(n_operands - 1):
        if rng.random() >= paren_prob:
            continue
        i = rng.randrange(n_operands - 1)
        j = rng.randrange(i + 1, n_operands)
        if (i, j) == (0, n_operands - 1) or (i, j) in spans:
            continue
        if all(j < a or i > b or (a <= i and j <= b) or (i <= a and b <= j) for a, b in spans):
            spans.add((i, j))
    return spans


def _bracketings(n_operands: int) -> int:
    """How many parenthesis sets ``_draw_spans`` can draw over ``n_operands`` operands:
    laminar families of runs of 2+ operands, the whole expression excluded.

    ``inner[m]`` counts the families on m operands without the whole run; ``rows[m]``
    the ways to split m operands into top-level blocks (a bare operand, or a bracketed
    run of l >= 2 holding any ``inner[l]`` family)."""
    inner, rows = [0, 1], [1, 1]  # rows[0]: the empty split; one operand: no brackets
    for m in range(2, n_operands + 1):
        # two or more top-level blocks: a first block of length l < m, then any split
        inner.append(sum((1 if size == 1 else inner[size]) * rows[m - size]
                         for size in range(1, m)))
        rows.append(inner[m] * 2)  # plus the one block spanning all m, around inner[m]
    return inner[n_operands]


def count_expressions(min_ops: int, max_ops: int, low: int, high: int,
                      paren_prob: float = 0.5, cap: int | None = None) -> int:
    """The number of distinct written expressions the sampler can draw (division by
    zero not excluded, so an upper bound on distinct rows). Counting stops once the total
    reaches ``cap``, so a huge ``max_ops`` costs nothing; the result is then >= ``cap``."""
    numbers, total = high - low + 1, 0
    for n_ops in range(min_ops, max_ops + 1):
        if cap is not None and 2 * n_ops >= cap.bit_length():
            return total + cap  # 4 ** n_ops symbol choices alone exceed cap
        surface = numbers ** (n_ops + 1) * len(SYMBOLS) ** n_ops
        if cap is not None and total + surface >= cap:
            return total + surface
        total += surface * (_bracketings(n_ops + 1) if paren_prob > 0 else 1)
        if cap is not None and total >= cap:
            return total
    return total


def draw_expression(rng: random.Random, n_ops: int, low: int, high: int,
                    paren_prob: float) -> str:
    """One random written expression with ``n_ops`` operators (tier independent)."""
    spans = _draw_spans(rng, n_ops + 1, paren_prob)
    parts = []
    for k in range(n_ops + 1):
        opens = "(" * sum(1 for i, _ in spans if i == k)
        closes = ")" * sum(1 for _, j in spans if j == k)
        parts.append(f"{opens}{rng.randint(low, high)}{closes}")
        if k < n_ops:
            parts.append(rng.choice(SYMBOLS))
    return " ".join(parts)


def make_row(expr: str, tier: int, row_id: str, state_rule: bool = False) -> dict:
    """A chat row for ``expr``. Raises ZeroDivisionError when a step divides by zero."""
    steps = solution_steps(expr, tier)
    prompt = PROMPT.format(expression=expr)
    if state_rule:
        prompt = f"{describe_rule(tier)}\n\n{prompt}"
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": " = ".join(steps)}],
            "id": row_id, "answer": steps[-1], "tier": tier, "expression": expr}


def _count_ops(expr: str) -> int:
    return sum(expr.count(s) for s in SYMBOLS)


def _check_args(tier, n, min_ops, max_ops, low, high, paren_prob, test_fraction) -> None:
    check_tier(tier)
    problems = []
    if n < 1:
        problems.append(f"n must be >= 1, got {n}")
    if not 1 <= min_ops <= max_ops:
        problems.append(f"need 1 <= min_ops <= max_ops, got {min_ops}, {max_ops}")
    if not 0 <= low <= high:
        problems.append(f"need 0 <= low <= high, got {low}, {high}")
    if not 0.0 <= paren_prob <= 1.0:
        problems.append(f"paren_prob must be in [0, 1], got {paren_prob}")
    if not 0.0 <= test_fraction < 1.0:
        problems.append(f"test_fraction must be in [0, 1), got {test_fraction}")
    if problems:
        raise ValueError("generate_opswap: " + "; ".join(problems))


def generate_opswap(tier: int, n: int = 10_000, seed: int = 0, *, min_ops: int = 1,
                    max_ops: int = 3, low: int = 1, high: int = 9, paren_prob: float = 0.5,
                    test_fraction: float = 0.1, state_rule: bool = False,
                    max_draws: int | None = None, max_stall: int = MAX_STALL,
                    progress: bool = False) -> OpSwapSplits:
    """``n`` distinct OpSwap rows for ``tier``, shuffled and split into train/test.

    The test split has ``round(n * test_fraction)`` rows (halves round up), train the rest.
    Deterministic for (tier, n, seed, settings). Raises OpSwapSpaceError, before drawing,
    when fewer than ``n`` distinct expressions exist (``count_expressions``), and while
    drawing when fewer than ``n`` division-safe ones turn up within ``max_draws`` draws
    (default ``100 * n + 10_000``) or ``max_stall`` draws in a row bring nothing new."""
    _check_args(tier, n, min_ops, max_ops, low, high, paren_prob, test_fraction)
    space = count_expressions(min_ops, max_ops, low, high, paren_prob, cap=n)
    if n > space:
        raise OpSwapSpaceError(
            f"only {space} distinct expressions exist (ops {min_ops}..{max_ops}, numbers "
            f"{low}..{high}); the space is too small for n={n}: lower n or widen max_ops / "
            "the number range")
    rng = random.Random(seed)
    max_draws = max_draws if max_draws is not None else 100 * n + 10_000
    seen: set[str] = set()
    rows: list[dict] = []
    stats = {"draws": 0, "duplicates": 0, "zero_division": 0}
    stall = 0  # draws since the last new row
    bar = tqdm(total=n, desc=f"opswap tier {tier}", unit="row", disable=not progress)
    while len(rows) < n:
        if stats["draws"] >= max_draws or stall >= max_stall:
            bar.close()
            why = (f"after {max_draws} draws" if stats["draws"] >= max_draws
                   else f"and none new in the last {max_stall} draws")
            raise OpSwapSpaceError(
                f"only {len(rows)} distinct division-safe expressions {why} "
                f"(ops {min_ops}..{max_ops}, numbers {low}..{high}); the space is too small "
                f"for n={n}: lower n or widen max_ops / the number range")
        stats["draws"] += 1
        stall += 1
        expr = draw_expression(rng, rng.randint(min_ops, max_ops), low, high, paren_prob)
        if expr in seen:
            stats["duplicates"] += 1
            continue
        seen.add(expr)
        try:
            rows.append(make_row(expr, tier, f"opswap-t{tier}-s{seed}-{len(rows):06d}",
                                 state_rule))
        except ZeroDivisionError:
            stats["zero_division"] += 1
            continue
        stall = 0
        bar.update(1)
    bar.close()
    stats["n_ops"] = {k: sum(1 for r in rows if _count_ops(r["expression"]) == k)
                      for k in range(min_ops, max_ops + 1)}
    rng.shuffle(rows)
    n_test = int(n * test_fraction + 0.5)
    return OpSwapSplits(train=rows[n_test:], test=rows[:n_test], stats=stats)
