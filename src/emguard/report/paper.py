"""The paper's published numbers (``data/builtin/paper_results.yaml``) as cell lookups.

A report cell gets the paper's number only where the paper ran the same thing:

- the same model: Qwen2.5-7B-Instruct (Tables 3, 5, 6 and the ablations 8-11) or
  Qwen2.5-32B-Instruct (Table 4); any other model gets no paper numbers;
- the same method at the same setting, read from what the runs *trained with* (their
  config and grid point), not from the arm's name: a KL arm at lambda 0.3 is the
  ablation row at 0.3 (7B), and has no Table 4 number (Table 4 ran lambda 0.1). A run
  with several defenses, or one the paper did not run, gets none.

Table 3 and 4 settings (the paper, section 5): KL lambda 0.1, LDIFS lambda 1.0,
SafeLoRA tau 0.3, interleaving 5 %; Table 4 is assumed to use the same. Benign tasks
(Tables 5, 6): KL 0.1, LDIFS 0.1, SafeLoRA 0.3, interleaving 5 % and 20 %; the 7B model.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import yaml

PAPER_FILE = Path(__file__).resolve().parents[1] / "data" / "builtin" / "paper_results.yaml"
MODELS = {"Qwen2.5-7B-Instruct": "table3", "Qwen2.5-32B-Instruct": "table4"}
ABLATIONS = ("table8", "table9", "table10", "table11")
# method -> the config key of the setting the paper varied
PARAMETER = {"kl": "defenses.kl.weight", "ldifs": "defenses.ldifs.weight",
             "safelora": "defenses.safelora.tau", "interleave": "defenses.interleave.fraction"}
MAIN_SETTING = {"kl": 0.1, "ldifs": 1.0, "safelora": 0.3, "interleave": 0.05}
TASK_METHODS = {("kl", 0.1): "kl", ("ldifs", 0.1): "ldifs", ("safelora", 0.3): "safelora",
                ("interleave", 0.05): "interleave", ("interleave", 0.2): "interleave_20pct"}
Method = tuple[str, float | None]  # (method, its setting); None: a method without one
Lookup = Callable[[str, str | None, str, tuple, str], float | None]


@cache
def paper_results() -> dict:
    return yaml.safe_load(PAPER_FILE.read_text(encoding="utf-8"))


def paper_table_of(model: str | None) -> str | None:
    """``table3`` (7B), ``table4`` (32B) or None: the paper's main table for a model."""
    return MODELS.get(str(model or "").split("/")[-1])


def method_of(config: dict | None, point: dict, arm: str, trained: bool) -> Method | None:
    """What a run is in the paper's terms, from what it trained with: ``("untrained",
    None)``, ``("aligned" | "misaligned", None)`` (no defense; aligned only for an arm of
    that name, the data's twin), ``(METHOD, setting)`` for one paper defense, else None."""
    if not trained:
        return ("untrained", None)
    defenses = {k: v for k, v in ((config or {}).get("defenses") or {}).items() if v}
    active = set(defenses) | {k.split(".")[1] for k in point if k.startswith("defenses.")}
    if not active:
        return ("aligned" if arm == "aligned" else "misaligned", None)
    if len(active) != 1 or next(iter(active)) not in PARAMETER:
        return None
    method = next(iter(active))
    key = PARAMETER[method]
    value = point.get(key, (defenses.get(method) or {}).get(key.split(".")[-1]))
    try:
        return (method, float(value))
    except (TypeError, ValueError):
        return None


def paper_lookup(model: str | None, methods: dict[tuple, Method | None]) -> Lookup | None:
    """``f(table, domain, arm, point, measure) -> float | None`` for the cells of a study
    of ``model``; ``methods``: cell (domain, arm, point) -> method_of its runs. None when
    the paper has no numbers for the model."""
    main_table = paper_table_of(model)
    if main_table is None:
        return None
    data = paper_results()
    main = {(r["dataset"], r["method"]): r for r in data[main_table]["rows"]}
    ablation = {(r["dataset"], r["method"], float(r["value"])): r
                for t in ABLATIONS for r in data[t]["rows"] if r.get("value") is not None}
    tasks = {r["method"]: r for r in data["table5"]["rows"]}
    foqa = {r["method"]: r for r in data["table6"]["rows"]}

    def lookup(table: str, domain: str | None, arm: str, point: tuple, m: str) -> float | None:
        method = _method(methods, domain, arm, point)
        if method is None:
            return None
        if table == "tasks":
            if main_table != "table3":
                return None
            name = _task_method(method)
            if m == "foqa":
                return (foqa.get(name) or {}).get("foqa")
            if m.startswith("opswap:"):
                return (tasks.get(name) or {}).get(f"tier{m.split(':')[1]}")
            return None
        name, value = method
        if value is None or value == MAIN_SETTING.get(name):
            return (main.get((domain, name)) or {}).get(m)
        if main_table == "table3":  # the ablations were run on the 7B model
            return (ablation.get((domain, name, value)) or {}).get(m)
        return None

    return lookup


def _method(methods: dict, domain: str | None, arm: str, point: tuple) -> Method | None:
    """The cell's method; for the tasks table (no domain), the one all its domains agree on."""
    if domain is not None:
        return methods.get((domain, arm, point))
    found = {v for (d, a, p), v in methods.items() if a == arm and p == point}
    return found.pop() if len(found) == 1 else None


def _task_method(method: Method) -> str | None:
    name, value = method
    if name == "untrained":
        return "untrained"
    if name in ("misaligned", "aligned"):
        return "sft"
    return TASK_METHODS.get((name, value))
