"""The all-defenses study's verdicts (benchmarks/defense_study.py), on hand-built items:
the difference-in-differences of a compensation control, "prevents", and the trade-off
verdict against KL, which needs a shown reduction against the undefended run first."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import defense_study as ds  # noqa: E402

SEEDS = [0, 1, 2]


def _items(shift: list[float], nll_per_token: float) -> dict[str, np.ndarray]:
    """Items of one run: per-pair shifts, and 4 held-out rows of 10 tokens each."""
    return {"shift": np.array(shift), "nll": np.array([[10 * nll_per_token, 10.0]] * 4)}


def _runs(offsets: dict[str, tuple[float, float]]) -> dict:
    """(arm, seed) -> items: every arm's shift is a fixed per-pair pattern plus its offset
    (seed-dependent noise shared by all arms, so paired differences are exact)."""
    by = {}
    for seed in SEEDS:
        base = np.random.default_rng(seed).normal(0, 0.05, size=24)
        for arm, (shift, nll) in offsets.items():
            by[(arm, seed)] = _items(list(base + shift), nll)
    return by


def test_difference_in_differences_separates_prevention_from_compensation():
    # steering lowers the shift by 0.10 on the misaligned data and by 0.10 on the aligned
    # data too: all compensation, DiD = (-0.10) - (-0.10) = 0
    comp = _runs({"misaligned": (0.30, 1.0), "aligned": (0.10, 1.5),
                  "steer": (0.20, 1.1), "steer_on_aligned": (0.00, 1.6)})
    d = ds.did(comp, "steer", "steer_on_aligned", SEEDS, np.random.default_rng(0))
    assert d["shift"]["pooled"]["value"] == pytest.approx(0.0, abs=1e-12)
    assert not d["shift"]["pooled"]["shown"] and ds.prevents(d).startswith("not shown")
    # on the aligned data it changes nothing: DiD = -0.10 - 0 = -0.10, a prevention
    prev = _runs({"misaligned": (0.30, 1.0), "aligned": (0.10, 1.5),
                  "steer": (0.20, 1.1), "steer_on_aligned": (0.10, 1.5)})
    d = ds.did(prev, "steer", "steer_on_aligned", SEEDS, np.random.default_rng(0))
    assert d["shift"]["pooled"]["value"] == pytest.approx(-0.10, abs=1e-12)
    # NLL: (1.1 - 1.0) - (1.5 - 1.5) nats per token
    assert d["nll"]["pooled"]["value"] == pytest.approx(0.10, abs=1e-12)
    assert ds.prevents(d) == "prevents"
    assert ds.prevents(None) == "no compensation control"


def test_an_arm_must_reduce_the_shift_before_it_can_beat_kl():
    by = _runs({"misaligned": (0.30, 1.0), "kl": (0.25, 1.4),
                "cheap": (0.30, 1.0),        # no reduction at all, far cheaper than KL
                "better": (0.20, 1.0),       # less shift than KL and no NLL cost
                "costly": (0.10, 2.0)})      # less shift than KL, more NLL
    rng = np.random.default_rng(0)

    def verdict(arm):
        return ds.verdict_vs_kl(ds.contrast(by, arm, "kl", SEEDS, rng),
                                ds.contrast(by, arm, "misaligned", SEEDS, rng))

    assert verdict("cheap") == "no shown reduction"
    assert verdict("better") == "beats KL"
    assert verdict("costly") == "trades: less shift, more NLL"


def test_a_direction_arm_is_read_against_its_own_controls():
    """Controls are matched by config (same defenses, control none), and the arm must show
    a lower shift than every control."""
    from types import SimpleNamespace

    def run(arm, point, control, alpha, control_of=None):
        steering = {"layers": [15], "alpha": alpha, "control": control}
        return SimpleNamespace(arm=arm, cell=("code", arm, point), seed=0, domain="code",
                               control_of=control_of,
                               config={"defenses": {"steering": steering, "kl": None}})

    runs = [run("steering", (("alpha", 0.05),), "none", 0.05),
            run("steering", (("alpha", 0.15),), "none", 0.15),
            run("steering_on_aligned", (("alpha", 0.15),), "none", 0.15, control_of="steering"),
            run("steering_controls", (("control", "random"),), "random", 0.15),
            run("steering_controls", (("control", "orthogonal"),), "orthogonal", 0.15)]
    label = ds.arm_label
    assert ds.controlled_arms(runs) == {
        label("steering_controls", (("control", "random"),)): label("steering", (("alpha", 0.15),)),
        label("steering_controls", (("control", "orthogonal"),)): label("steering", (("alpha", 0.15),))}
    below = {"shift": {"pooled": {"shown": True, "value": -0.05}}}
    level = {"shift": {"pooled": {"shown": False, "value": -0.01}}}
    assert ds.versus_controls({"random": below, "orthogonal": below}) == "below every control"
    assert ds.versus_controls({"random": below, "orthogonal": level}) == "below 1 of 2 controls"
    assert ds.versus_controls({}) == "-"
