"""Layers point one way (issue 22 item 4): emguard's modules import downward only.

The graph is read from each module's source: its module-level imports of emguard modules
(top level, inside top-level ``try``/``if`` and class bodies; ``if TYPE_CHECKING:`` blocks
left out). Imports inside functions are not edges; they are counted apart, outside
``emguard.cli`` (whose commands import what they run when they run), and may only reach
modules that import torch, so the modules that are cheap to import stay so.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import emguard

# Bottom first; a module may import modules of its own layer or of a lower one. Entries are
# module names or prefixes (``emguard.judge`` holds emguard.judge.*); the longest one that
# matches a module places it. The package root (``emguard``) imports nothing.
LAYERS: list[list[str]] = [
    # 0: leaves and utilities
    ["emguard.settings", "emguard.io", "emguard.names", "emguard.redact", "emguard.compat",
     "emguard.finite", "emguard.metrics", "emguard.eval_log", "emguard.tracking"],
    # 1: data: parsing, built-in sets, generators, masking, preference pairs
    ["emguard.data"],
    # 2: what is asked and scored, how an evaluation asks it; what a run trains on and
    # holds out
    ["emguard.questions", "emguard.benign", "emguard.eval_settings", "emguard.data.split"],
    # 3: output folders, models, model cards
    ["emguard.ownership", "emguard.models", "emguard.model_card"],
    # 4: judging, generation, judge-free measures; an evaluation's three stages
    ["emguard.judge", "emguard.generate", "emguard.judge_free", "emguard.eval_generation",
     "emguard.eval_judging", "emguard.eval_judge_free"],
    # 5: the defenses (base and one module each)
    ["emguard.defenses"],
    # 6: the registry, which builds the run config's ``defenses:`` block
    ["emguard.defenses.registry"],
    # 7: the run config and a run's identity
    ["emguard.config", "emguard.identity"],
    # 8: one run: loss, run folder, training, evaluation, trajectories
    ["emguard.loss", "emguard.run_dir", "emguard.train", "emguard.evaluate",
     "emguard.evaluate_run", "emguard.trajectory"],
    # 9: studies: the grid, the sweep (and its Ray executor), the report
    ["emguard.study", "emguard.sweep", "emguard.sweep_ray", "emguard.report"],
    # 10: entry points beside the CLI
    ["emguard.demo", "emguard.hub", "emguard.inspect_tasks"],
    # 11: the CLI
    ["emguard.cli"],
]

# Function-local emguard imports outside emguard.cli may reach only these (each imports
# torch when imported), and there may be no more of them than this.
HEAVY = {"emguard.models", "emguard.generate", "emguard.judge_free", "emguard.finite",
         "emguard.judge.local_judge", "emguard.config", "emguard.evaluate_run"}
MAX_LOCAL_IMPORTS = 14  # issue 22 brought it from 115 to 14; keep it from growing

# Modules that import without torch (the report, judging from files, the question sets).
LIGHT = ["emguard", "emguard.report", "emguard.judge", "emguard.evaluate", "emguard.trajectory",
         "emguard.questions", "emguard.benign", "emguard.data.split", "emguard.tracking",
         "emguard.eval_generation", "emguard.eval_judging", "emguard.eval_judge_free",
         "emguard.eval_settings"]


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: name -> (source file, is a package)."""
    out = {"emguard": (Path(emguard.__file__), True)}
    for info in pkgutil.walk_packages(emguard.__path__, "emguard."):
        spec = importlib.util.find_spec(info.name)
        out[info.name] = (Path(spec.origin), info.ispkg)
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    """The module an imported dotted name belongs to (``emguard.judge.make_judge`` ->
    ``emguard.judge``)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool) -> list[str]:
    """The emguard modules an import statement imports (none for other packages)."""
    if isinstance(node, ast.Import):
        return [_resolve(a.name) for a in node.names if a.name.split(".")[0] == "emguard"]
    base = node.module or ""
    if node.level:  # relative: from the package holding ``module``
        package = module.split(".") if is_pkg else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    if base.split(".")[0] != "emguard":
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else _resolve(base)
            for a in node.names]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _scan(module: str) -> tuple[set[str], list[tuple[int, str, list[str]]]]:
    """(module-level emguard imports, [(line, statement, targets)] of function-local ones)."""
    path, is_pkg = MODULES[module]
    edges: set[str] = set()
    local: list[tuple[int, str, list[str]]] = []

    def walk(body: list[ast.stmt], in_function: bool) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = _targets(node, module, is_pkg)
                if targets and in_function:
                    local.append((node.lineno, ast.unparse(node), targets))
                elif targets:
                    edges.update(t for t in targets if t != module)
                continue
            if isinstance(node, ast.If) and not in_function and _is_type_checking(node):
                walk(node.orelse, in_function)
                continue
            inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for field in ("body", "orelse", "finalbody", "handlers"):
                sub = getattr(node, field, None)
                if isinstance(sub, list):
                    walk(sub, inner)

    walk(ast.parse(path.read_text(encoding="utf-8")).body, False)
    return edges, local


SCANS = {m: _scan(m) for m in MODULES}
GRAPH = {m: edges for m, (edges, _) in SCANS.items()}


def layer_of(module: str) -> int | None:
    """The layer of ``module``: that of the longest table entry naming it or a package above it."""
    best: tuple[int, int] | None = None  # (entry length, layer)
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if (module == entry or module.startswith(entry + ".")) and (
                    best is None or len(entry) > best[0]):
                best = (len(entry), i)
    return None if best is None else best[1]


def test_every_module_imports():
    """Each module imports on its own (an import cycle at import time would fail here);
    one whose optional dependency is missing is skipped."""
    failed = []
    for name in MODULES:
        if name.endswith(".__main__"):
            continue  # runs the CLI
        try:
            importlib.import_module(name)
        except ImportError as e:
            if (e.name or "emguard").split(".")[0] == "emguard":
                failed.append(f"{name}: {e}")
    assert not failed, "\n".join(failed)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_reports_the_path():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    found = _cycle(GRAPH)
    assert found is None, "module-level import cycle: " + " -> ".join(found)


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if m != "emguard" and layer_of(m) is None)
    assert not missing, f"add these modules to LAYERS in {Path(__file__).name}: {missing}"
    assert GRAPH["emguard"] == set(), "the package root imports no submodule"


def test_layers_point_down():
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, targets in sorted(GRAPH.items()) if m != "emguard"
              for t in sorted(targets) if t != "emguard" and layer_of(t) > layer_of(m)]
    assert not upward, "imports pointing up:\n  " + "\n  ".join(upward)


def test_function_local_imports_are_few_and_reach_heavy_modules_only():
    local = [(m, line, text, targets) for m, (_, found) in sorted(SCANS.items())
             if not m.startswith("emguard.cli") for line, text, targets in found]
    light = [f"{m}:{line}: {text}" for m, line, text, targets in local
             if not set(targets) <= HEAVY]
    assert not light, ("import these at the top of the module (they create no cycle and "
                       "import no torch):\n  " + "\n  ".join(light))
    assert len(local) <= MAX_LOCAL_IMPORTS, "\n".join(f"{m}:{line}: {text}"
                                                      for m, line, text, _ in local)


def test_light_modules_import_without_torch():
    code = ("import sys\n"
            f"for name in {LIGHT!r}:\n"
            "    __import__(name)\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {LIGHT} imports {out.stdout.strip()}"


@pytest.mark.parametrize("module", ["emguard.judge.base", "emguard.ownership", "emguard.sweep_ray",
                                    "emguard.data.split", "emguard.config"])
def test_the_circles_issue_22_named_stay_open(module):
    """judge.base knows no implementation, ownership no models, sweep_ray no sweep, the
    split no run config."""
    forbidden = {"emguard.judge.base": {"emguard.judge.mock", "emguard.judge.cache",
                                        "emguard.judge.openai_judge", "emguard.judge.local_judge",
                                        "emguard.judge.factory"},
                 "emguard.ownership": {"emguard.models"},
                 "emguard.sweep_ray": {"emguard.sweep"},
                 "emguard.data.split": {"emguard.config"},
                 "emguard.config": {"emguard.study", "emguard.train", "emguard.evaluate"}}[module]
    _, local = SCANS[module]
    reached = GRAPH[module] | {t for _, _, targets in local for t in targets}
    assert not reached & forbidden
