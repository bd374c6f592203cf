"""The paper's published numbers (``data/builtin/paper_results.yaml``) as cell lookups.

``paper_lookup()`` returns ``f(table, domain, arm, point, measure) -> float | None``: the
paper's value for a report cell, matched by dataset key (code, legal, medical,
security), arm name (untrained, aligned, misaligned, sft, kl, ldifs, safelora,
interleave) and grid point. A row at a hyperparameter value is matched in the ablation
tables (8-11); a row without one in Table 3 (the paper's settings). Benign tasks:
Table 5 (``opswap:T`` -> tier T) and Table 6 (``foqa``); interleaving at 20 % is the
paper's "Interleaving (20%)" row.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml

PAPER_FILE = Path(__file__).resolve().parents[1] / "data" / "builtin" / "paper_results.yaml"
ABLATIONS = ("table8", "table9", "table10", "table11")
MODEL = "Qwen2.5-7B-Instruct"


@cache
def paper_results() -> dict:
    return yaml.safe_load(PAPER_FILE.read_text(encoding="utf-8"))


def paper_lookup():
    data = paper_results()
    main = {(r["dataset"], r["method"]): r for r in data["table3"]["rows"]}
    ablation = {(r["dataset"], data[t]["parameter"], float(r["value"])): r
                for t in ABLATIONS for r in data[t]["rows"] if r.get("value") is not None}
    tasks = {r["method"]: r for r in data["table5"]["rows"]}
    foqa = {r["method"]: r for r in data["table6"]["rows"]}

    def lookup(table: str, domain: str | None, arm: str, point: tuple, m: str) -> float | None:
        if table == "tasks":
            method = _task_method(arm, point)
            if m == "foqa":
                return (foqa.get(method) or {}).get("foqa")
            if m.startswith("opswap:"):
                return (tasks.get(method) or {}).get(f"tier{m.split(':')[1]}")
            return None
        if len(point) == 1:
            row = ablation.get((domain, point[0][0], float(point[0][1])))
        else:
            row = main.get((domain, arm)) if not point else None
        return (row or {}).get(m)

    return lookup


def _task_method(arm: str, point: tuple) -> str:
    if arm == "interleave" and point and abs(float(point[0][1]) - 0.2) < 1e-9:
        return "interleave_20pct"
    return arm
