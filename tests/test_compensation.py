"""Compensation controls (issue 21): a direction arm also trained on the aligned data, and
the report's difference-in-differences, checked against numbers worked out by hand."""

from __future__ import annotations

import json

import pytest
import yaml
from test_report import _write_run

from emguard.config import ConfigError
from emguard.report import build_report

DOMAINS = {"code": {"misaligned": "builtin:insecure-code", "aligned": "builtin:secure-code"}}
STEER = {"defenses.steering.layers": [1], "defenses.steering.alpha": 0.2}


def _study(tmp_path, arms, domains=DOMAINS):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "c", "output_dir": str(tmp_path / "out"),
                                    "domains": domains, "arms": arms}))
    return path


def test_a_compensated_arm_also_runs_on_the_aligned_data_with_the_same_settings(tmp_path):
    from emguard.study import expand, load_study

    runs = expand(load_study(_study(tmp_path, [
        {"name": "misaligned"}, {"name": "aligned", "data": "aligned"},
        {"name": "steer", "compensation": True, "set": STEER}])))
    by_arm = {r.arm: r for r in runs}
    steer, ctrl = by_arm["steer"], by_arm["steer_on_aligned"]
    assert ctrl.control_of == "steer" and steer.control_of is None
    assert ctrl.config.data.train == "builtin:secure-code"
    assert ctrl.config.data.heldout == "split:builtin:insecure-code"  # the same questions
    assert steer.config.data.train == "builtin:insecure-code"
    assert ctrl.config.defenses.steering == steer.config.defenses.steering
    assert ctrl.run_dir != by_arm["aligned"].run_dir  # it is not the aligned baseline


@pytest.mark.parametrize("arms, needle", [
    ([{"name": "misaligned"}, {"name": "steer", "compensation": True}], "named 'aligned'"),
    ([{"name": "misaligned"}, {"name": "aligned", "data": "aligned"},
      {"name": "steer", "compensation": True, "data": "aligned"}], "misaligned data"),
])
def test_a_compensation_control_needs_its_baselines(tmp_path, arms, needle):
    from emguard.study import load_study

    with pytest.raises(ConfigError, match=needle):
        load_study(_study(tmp_path, arms))
    no_aligned = {"code": {"misaligned": "builtin:insecure-code"}}
    with pytest.raises(ConfigError, match="no aligned data"):
        load_study(_study(tmp_path, [{"name": "misaligned"}, {"name": "steer",
                                                               "compensation": True}], no_aligned))


def _entry(root, arm, seed, margins, control_of=None):
    e = _write_run(root, f"code/{arm}/s{seed}", "code", arm, seed, {}, None, None,
                   margins=margins)
    return {**e, "control_of": control_of}


def test_difference_in_differences_against_hand_worked_numbers(tmp_path):
    root = tmp_path / "study"
    runs = [
        # seed 0: arm - mis = [-.2, -.1, -.3] (mean -.2); ctrl - al = [-.1, 0, .1] (mean 0)
        #         DiD per pair [-.1, -.1, -.4], mean -.2
        _entry(root, "misaligned", 0, [0.3, 0.3, 0.3]),
        _entry(root, "aligned", 0, [0.1, 0.1, 0.1]),
        _entry(root, "steer", 0, [0.1, 0.2, 0.0]),
        _entry(root, "steer_on_aligned", 0, [0.0, 0.1, 0.2], control_of="steer"),
        # seed 1: arm - mis = [-.3, -.3, -.3]; ctrl - al = [0, -.1, -.2]; DiD [-.3, -.2, -.1]
        _entry(root, "misaligned", 1, [0.4, 0.4, 0.4]),
        _entry(root, "aligned", 1, [0.2, 0.2, 0.2]),
        _entry(root, "steer", 1, [0.1, 0.1, 0.1]),
        _entry(root, "steer_on_aligned", 1, [0.2, 0.1, 0.0], control_of="steer"),
        # an arm that only compensates: it moves both data sets alike, DiD exactly 0
        _entry(root, "push", 0, [0.1, 0.1, 0.1]),
        _entry(root, "push_on_aligned", 0, [-0.1, -0.1, -0.1], control_of="push"),
    ]
    (root / "runs-c.json").write_text(json.dumps({"study": {"name": "c"}, "runs": runs}))
    table = next(t for t in build_report(root).tables if t.key == "compensation")
    rows = {r[1].text: r for r in table.rows}
    steer = rows["steer"]
    assert steer[2].est.value == pytest.approx((-0.2 + -0.3) / 2)
    assert steer[3].est.value == pytest.approx((0.0 + -0.1) / 2)
    assert steer[4].est.value == pytest.approx((-0.2 + -0.2) / 2)
    assert steer[4].est.hi < 0 and steer[5].text == "prevents"
    push = rows["push"]
    assert push[2].est.value == pytest.approx(-0.2) and push[3].est.value == pytest.approx(-0.2)
    assert push[4].est.value == pytest.approx(0.0, abs=1e-12) and push[5].text == "not shown"
