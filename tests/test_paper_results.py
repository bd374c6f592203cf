"""Tests for the transcribed paper numbers (src/emguard/data/builtin/paper_results.yaml).

The spot checks below were typed in from the paper (Kaczér et al., "In-Training Defenses
against Emergent Misalignment in Language Models") independently of the YAML file; the
paper itself is not read here.
"""

from __future__ import annotations

import numbers
from pathlib import Path

import pytest
import yaml

PATH = Path(__file__).resolve().parents[1] / "src/emguard/data/builtin/paper_results.yaml"

DATASETS = ("code", "legal", "medical", "security")
EMA_COLS = ("general_misaligned", "general_incoherent", "indomain_misaligned", "indomain_incoherent")
SHAPES = {
    "table3": ("dataset", "method", *EMA_COLS),
    "table4": ("dataset", "method", *EMA_COLS),
    "table5": ("method", "tier0", "tier1", "tier2", "tier3"),
    "table6": ("method", "foqa"),
    "table8": ("dataset", "method", "value", *EMA_COLS),
    "table9": ("dataset", "method", "value", *EMA_COLS),
    "table10": ("dataset", "method", "value", *EMA_COLS),
    "table11": ("dataset", "method", "value", *EMA_COLS),
}
ABLATIONS = {  # table -> (method key, parameter, hyperparameter values, paper's main setting)
    "table8": ("kl", "defenses.kl.weight", [0.01, 0.03, 0.1, 0.3, 1.0], 0.1),
    "table9": ("ldifs", "defenses.ldifs.weight", [0.01, 0.03, 0.1, 0.3, 1.0], 1.0),
    "table10": ("safelora", "defenses.safelora.tau", [0.1, 0.2, 0.3, 0.4, 0.5], 0.3),
    "table11": ("interleave", "defenses.interleave.fraction", [0.01, 0.05, 0.2, 0.5], 0.05),
}


@pytest.fixture(scope="module")
def data():
    return yaml.safe_load(PATH.read_text(encoding="utf-8"))


def cell(data, table, **key):
    hits = [r for r in data[table]["rows"] if all(r.get(k) == v for k, v in key.items())]
    assert len(hits) == 1, (table, key, len(hits))
    return hits[0]


def _is_num(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def test_header(data):
    assert data["source"] and data["units"]
    assert set(data["datasets"]) == set(DATASETS)
    assert data["table3"]["model"] == "Qwen2.5-7B-Instruct"
    assert data["table4"]["model"] == "Qwen2.5-32B-Instruct"
    for table, (_, parameter, _, _) in ABLATIONS.items():
        assert data[table]["parameter"] == parameter


@pytest.mark.parametrize("table", sorted(SHAPES))
def test_row_shapes(data, table):
    rows = data[table]["rows"]
    assert rows
    methods = set(data["methods"])
    for r in rows:
        assert set(r) == set(SHAPES[table]), r
        assert r["method"] in methods, r
        if "dataset" in r:
            assert r["dataset"] in DATASETS, r
        for k in SHAPES[table]:
            if k in ("dataset", "method"):
                continue
            assert r[k] is None or _is_num(r[k]), (k, r)
            if r[k] is not None and k != "value":
                assert 0 <= r[k] <= 100, (k, r)
    keys = [tuple(r.get(k) for k in ("dataset", "method", "value")) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"


def test_row_counts(data):
    counts = {t: len(data[t]["rows"]) for t in SHAPES}
    assert counts == {"table3": 28, "table4": 12, "table5": 7, "table6": 7,
                      "table8": 24, "table9": 24, "table10": 24, "table11": 20}


@pytest.mark.parametrize("table", sorted(ABLATIONS))
def test_ablation_layout(data, table):
    method, _, values, _ = ABLATIONS[table]
    for ds in DATASETS:
        rows = [r for r in data[table]["rows"] if r["dataset"] == ds]
        base = [r for r in rows if r["method"] == "misaligned"]
        assert len(base) == 1 and base[0]["value"] is None
        assert [r["value"] for r in rows if r["method"] == method] == values
        assert {r["method"] for r in rows} == {"misaligned", method}


def test_spot_checks(data):
    # Table 3 (Qwen2.5-7B)
    assert cell(data, "table3", dataset="code", method="kl")["general_misaligned"] == 0.38
    assert cell(data, "table3", dataset="security", method="interleave")["general_incoherent"] == 26.05
    assert cell(data, "table3", dataset="medical", method="aligned")["general_incoherent"] == 0.67
    assert cell(data, "table3", dataset="legal", method="safelora")["indomain_incoherent"] == 6.68
    # Table 4 (Qwen2.5-32B)
    assert cell(data, "table4", dataset="medical", method="misaligned")["indomain_misaligned"] == 64.33
    assert cell(data, "table4", dataset="code", method="kl")["indomain_misaligned"] == 23.15
    # Table 5 (OpSwap)
    assert cell(data, "table5", method="kl")["tier0"] == 48.20
    assert cell(data, "table5", method="safelora")["tier3"] == 32.01
    assert cell(data, "table5", method="untrained")["tier2"] == 1.00
    # Table 6 (FoQA)
    assert cell(data, "table6", method="interleave_20pct")["foqa"] == 40.90
    assert cell(data, "table6", method="kl")["foqa"] == 44.55
    # Table 8 (KL lambda)
    assert cell(data, "table8", dataset="legal", value=0.3)["general_misaligned"] == 0.12
    assert cell(data, "table8", dataset="security", value=1.0)["indomain_misaligned"] == 2.67
    # Table 9 (LDIFS lambda)
    assert cell(data, "table9", dataset="code", value=0.03)["general_incoherent"] == 29.10
    # Table 10 (SafeLoRA tau)
    assert cell(data, "table10", dataset="security", value=0.4)["indomain_incoherent"] == 0.04
    assert cell(data, "table10", dataset="medical", value=0.2)["indomain_misaligned"] == 54.97
    # Table 11 (interleave fraction)
    assert cell(data, "table11", dataset="legal", value=0.2)["general_incoherent"] == 33.39
    assert cell(data, "table11", dataset="medical", value=0.2)["general_misaligned"] == 3.13


@pytest.mark.parametrize("table", sorted(ABLATIONS))
def test_misaligned_baseline_repeated(data, table):
    """The paper repeats Table 3's Misaligned rows at the top of each ablation table."""
    for ds in DATASETS:
        t3 = cell(data, "table3", dataset=ds, method="misaligned")
        ab = cell(data, table, dataset=ds, method="misaligned")
        assert {k: ab[k] for k in EMA_COLS} == {k: t3[k] for k in EMA_COLS}, ds


@pytest.mark.parametrize("table", sorted(ABLATIONS))
def test_main_setting_matches_table3(data, table):
    """Table 3's defence rows are the ablation rows at the paper's chosen setting."""
    method, _, _, chosen = ABLATIONS[table]
    for ds in DATASETS:
        t3 = cell(data, "table3", dataset=ds, method=method)
        ab = cell(data, table, dataset=ds, method=method, value=chosen)
        assert {k: ab[k] for k in EMA_COLS} == {k: t3[k] for k in EMA_COLS}, ds


def test_untrained_general_is_dataset_independent(data):
    """The untrained model's general-question scores cannot depend on the data set."""
    rows = [cell(data, "table3", dataset=ds, method="untrained") for ds in DATASETS]
    assert {(r["general_misaligned"], r["general_incoherent"]) for r in rows} == {(0.08, 1.08)}
