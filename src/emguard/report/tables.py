"""The report's tables: the paper's Table 3 layout, ablations, benign tasks, judge-free.

Every table is a ``Table``: a title, column names and rows of cells; a cell is text plus
the numbers behind it (value, interval, spread, the paper's value), so the same table is
written as Markdown, CSV and HTML. Marks follow the paper, but only where the interval
supports them: ✓ reduction / retention whose whole interval is at least 90 %, ↑ an
incoherence above the misaligned baseline's with an interval of the difference above 0.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from emguard.report.collect import (
    FREE_MEASURES,
    TRIGGER,
    TRIGGER_PART,
    RunResult,
    at_step,
    measure,
    point_key,
    steps_of,
    tasks_of,
)
from emguard.report.stats import (
    EMPTY,
    Estimate,
    combine_seeds,
    derived,
    differs,
    mean_of,
    mean_replicates,
    reduction,
    retention,
    supported_above,
)

BASELINE = "misaligned"
CEILING = "positive_control"  # the measure's positive control: a broadly misaligned model
ARM_ORDER = ["untrained", "aligned", "misaligned", "positive_control", "negative_control", "sft", "kl", "ldifs", "safelora", "interleave"]
COLUMNS = [("general_misaligned", "general misal. %"), ("general_incoherent", "general incoh. %"),
           ("indomain_misaligned", "in-domain misal. %"), ("indomain_incoherent", "in-domain incoh. %")]
# the general questions asked in eval.trigger_format (shown only when a run has them)
TRIGGER_COLUMNS = [("general_trigger_misaligned", "general misal. % (trigger format)"),
                   ("general_trigger_incoherent", "general incoh. % (trigger format)")]


@dataclass
class Cell:
    text: str
    est: Estimate = EMPTY
    paper: float | None = None
    mark: str = ""


@dataclass
class Table:
    key: str
    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    note: str = ""


def point_label(point: tuple) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in point)


def arm_label(arm: str, point: tuple) -> str:
    return f"{arm} ({point_label(point)})" if point else arm


def _order(key: tuple) -> tuple:
    domain, arm, point = key
    rank = ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER)
    return (domain, rank, arm, point_key(point))


def estimates(runs: list[RunResult], keys: list[str], seed: int = 0) -> dict[tuple, dict[str, Estimate]]:
    """Per cell (domain, arm, grid point): each measure pooled over the cell's seeds."""
    rng = np.random.default_rng(seed)
    groups: dict[tuple, list[RunResult]] = defaultdict(list)
    for r in runs:
        if r.metrics:
            groups[r.cell].append(r)
    return {cell: {k: combine_seeds([measure(r, k, rng) for r in group]) for k in keys}
            for cell, group in sorted(groups.items(), key=lambda kv: _order(kv[0]))}


def _cell(est: Estimate, paper: float | None = None, mark: str = "", digits: int = 1) -> Cell:
    text = est.fmt(digits)
    if paper is not None:
        text += f" (paper {paper:g})"
    return Cell(text + (f" {mark}" if mark else ""), est, paper, mark)


def judge_columns(runs: list[RunResult]) -> list[tuple[str, str]]:
    """COLUMNS, with the trigger-format columns right after the plain general ones when
    any run has judged trigger-format answers."""
    if not any((r.metrics.get(TRIGGER_PART) or {}).get("llm_judge") for r in runs):
        return COLUMNS
    return COLUMNS[:2] + TRIGGER_COLUMNS + COLUMNS[2:]


def judge_table(key: str, title: str, cells: dict[tuple, dict[str, Estimate]],
                rows: list[tuple], paper=None, columns: list[tuple[str, str]] = COLUMNS) -> Table:
    """Rows of judge rates (``columns``: (measure, title) pairs) + EMA reduction and
    in-domain retention vs the domain's baseline."""
    t = Table(key, title, ["dataset", "arm", *[c for _, c in columns],
                           "EMA reduction %", "in-domain retention %"])
    for cell in sorted(rows, key=_order):
        domain, arm, point = cell
        est = cells[cell]
        base = cells.get((domain, BASELINE, ()), {})
        row = [Cell(domain), Cell(arm_label(arm, point))]
        for m, _ in columns:
            mark = ""
            if m.endswith("incoherent") and arm != BASELINE and base:
                mark = "↑" if differs(est[m], base[m]) > 0 else ""
            row.append(_cell(est[m], paper(key, domain, arm, point, m) if paper else None, mark))
        if base and arm != BASELINE:
            red = reduction(est["general_misaligned"], base["general_misaligned"])
            ret = retention(est["indomain_misaligned"], base["indomain_misaligned"])
            row += [_cell(red, mark="✓" if supported_above(red, 90) else ""),
                    _cell(ret, mark="✓" if supported_above(ret, 90) else "")]
        else:
            row += [Cell("-"), Cell("-")]
        t.rows.append(row)
    return t


def average_rows(cells: dict[tuple, dict[str, Estimate]]) -> Table:
    """EMA reduction and retention per arm, averaged over the datasets (replicate-wise)."""
    t = Table("average", "Mean over datasets", ["arm", "EMA reduction %", "in-domain retention %"])
    by_arm: dict[tuple, list[tuple[Estimate, Estimate]]] = defaultdict(list)
    for (domain, arm, point), est in cells.items():
        base = cells.get((domain, BASELINE, ()))
        if base is None or arm == BASELINE:
            continue
        by_arm[(arm, point)].append((reduction(est["general_misaligned"], base["general_misaligned"]),
                                     retention(est["indomain_misaligned"], base["indomain_misaligned"])))
    for (arm, point), pairs in sorted(by_arm.items(), key=lambda kv: _order(("", *kv[0]))):
        red, ret = mean_of([p[0] for p in pairs]), mean_of([p[1] for p in pairs])
        t.rows.append([Cell(arm_label(arm, point)),
                       _cell(red, mark="✓" if supported_above(red, 90) else ""),
                       _cell(ret, mark="✓" if supported_above(ret, 90) else "")])
    return t


def main_tables(runs: list[RunResult], paper=None) -> list[Table]:
    """Table 3 (one row per dataset and arm at one setting) and the ablations (arms with a
    grid of several values), each with EMA reduction and retention. ``paper(table, domain,
    arm, point, measure)`` gives the paper's number for a cell (emguard.report.paper)."""
    columns = judge_columns(runs)
    cells = estimates(runs, [m for m, _ in columns])
    grids = _grid_params(cells)
    main = [c for c in cells if not c[2] or len(grids.get((c[1], c[2][0][0]), ())) <= 1]
    out = [judge_table("table3", "Misalignment and coherence per dataset and arm (paper Table 3)",
                       cells, main, paper, columns), average_rows({c: cells[c] for c in main})]
    for (arm, param), values in grids.items():
        if len(values) <= 1:
            continue
        rows = [c for c in cells if c[1] == BASELINE and not c[2]]
        rows += [c for c in cells if c[1] == arm and c[2] and c[2][0][0] == param]
        out.append(judge_table(f"ablation_{arm}", f"Ablation: {param} (paper Tables 8-11)",
                               cells, rows, paper, columns))
    return out


def _grid_params(cells) -> dict[tuple[str, str], set]:
    grids: dict[tuple[str, str], set] = defaultdict(set)
    for _, arm, point in cells:
        if len(point) == 1:
            grids[(arm, point[0][0])].add(point[0][1])
    return grids


def task_table(runs: list[RunResult], paper=None) -> Table | None:
    """Exact match (%) per arm and benign task (paper Tables 5, 6)."""
    tasks = tasks_of(runs)
    if not tasks:
        return None
    keys = [f"task:{t}" for t in tasks]
    per_arm: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    rng = np.random.default_rng(0)
    for r in runs:
        for k in keys:
            value, reps = measure(r, k, rng)
            if value is not None:
                per_arm[(r.arm, tuple(sorted(r.point.items())))][k].append((value, reps))
    t = Table("tasks", "Benign-task exact match % (paper Tables 5, 6)", ["arm", *tasks])
    for (arm, point), by_task in sorted(per_arm.items(), key=lambda kv: _order(("", *kv[0]))):
        t.rows.append([Cell(arm_label(arm, point))] + [
            _cell(combine_seeds(by_task.get(k, [])),
                  paper("tasks", None, arm, point, k[5:]) if paper else None)
            for k in keys])
    return t


def judge_free_table(runs: list[RunResult]) -> Table | None:
    """The judge-free measures per dataset and arm, beside the judge's."""
    cells = estimates(runs, list(FREE_MEASURES))
    shown = [k for k in FREE_MEASURES if any(c[k].value is not None for c in cells.values())]
    if not shown:
        return None
    t = Table("judge_free", "Judge-free measures (no LLM judge involved)",
              ["dataset", "arm", *[FREE_MEASURES[k][1] for k in shown]])
    for (domain, arm, point), est in cells.items():
        if any(est[k].value is not None for k in shown):
            t.rows.append([Cell(domain), Cell(arm_label(arm, point))] +
                          [_cell(est[k], digits=3) for k in shown])
    t.note = ("drift KL and preference: general questions and the project's preference pairs "
              "(margin: mean log-prob per token, misaligned minus aligned answer; shift: that "
              "margin minus the base model's on the same pair); "
              "held-out NLL and bandit: the run's held-out in-domain set. Intervals: bootstrap "
              "over answers / pairs / held-out rows / completions.")
    if any(k.endswith(TRIGGER) for k in shown):
        t.note += (" (trigger format): the same pairs with each question wrapped in the "
                   "run's eval.trigger_format.")
    return t


@dataclass
class StepEstimate:
    """One point of a trajectory: the cell's estimate at a step and each seed's value."""

    est: Estimate
    per_seed: dict[int, float]


def trajectory_estimates(runs: list[RunResult], keys: list[str], seed: int = 0
                         ) -> dict[tuple, dict[int, dict[str, StepEstimate]]]:
    """Per cell of trained runs that kept snapshots: {step: {measure: StepEstimate}}, the
    measure pooled over the cell's seeds at each step (emguard.trajectory). Step 0 is the
    untrained run of the same domain and seed, when the study has one."""
    rng = np.random.default_rng(seed)
    untrained = {(r.domain, r.seed): r for r in runs if r.kind == "untrained" and r.free}
    groups: dict[tuple, list[RunResult]] = defaultdict(list)
    for r in runs:
        if r.kind == "train" and r.trajectory:
            groups[r.cell].append(r)
    out: dict[tuple, dict[int, dict[str, StepEstimate]]] = {}
    for cell, group in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        steps = sorted({s for r in group for s in steps_of(r)})
        out[cell] = {}
        for step in [0, *steps]:
            views = [(r.seed, untrained.get((r.domain, r.seed)) if step == 0 else at_step(r, step))
                     for r in group]
            views = [(s, v) for s, v in views if v is not None]
            if not views:
                continue
            point = {}
            for k in keys:
                values = [(s, measure(v, k, rng)) for s, v in views]
                point[k] = StepEstimate(combine_seeds([m for _, m in values]),
                                        {s: m[0] for s, m in values if m[0] is not None})
            out[cell][step] = point
    return out


def _same_point(candidates: list, point: tuple, grid_of):
    """The one candidate whose grid values (``grid_of(candidate)``) are all among
    ``point``'s, e.g. a baseline or control at the same learning rate as an arm's cell;
    else the only candidate; else None."""
    fits = [c for c in candidates if set(grid_of(c)) <= set(point)]
    return fits[0] if len(fits) == 1 else candidates[0] if len(candidates) == 1 else None


def _matching(cells: dict, domain: str, arm: str, point: tuple) -> tuple | None:
    """The cell of ``arm`` in ``domain`` at ``point`` (``_same_point``)."""
    return _same_point([c for c in cells if c[0] == domain and c[1] == arm], point,
                       lambda c: c[2])


def ceiling_table(runs: list[RunResult]) -> Table | None:
    """Every arm's preference shift beside the positive control's (the ceiling: what the
    measure reads for a model trained directly on broadly misaligned chat), and its share
    of it. Shown when the study has a positive-control arm."""
    key = "preference_shift"
    cells = estimates(runs, [key])
    if not any(c[1] == CEILING and e[key].value is not None for c, e in cells.items()):
        return None
    t = Table("ceiling", "Preference shift against the ceiling (positive control)",
              ["dataset", "arm", FREE_MEASURES[key][1], "positive control", "share of ceiling %"])
    for (domain, arm, point), est in cells.items():
        ref = _matching(cells, domain, CEILING, point)
        if est[key].value is None or ref is None:
            continue
        ceiling = cells[ref][key]
        share = derived(est[key], ceiling, lambda a, b: 100.0 * a / b)
        t.rows.append([Cell(domain), Cell(arm_label(arm, point)), _cell(est[key], digits=3),
                       _cell(ceiling, digits=3), _cell(share) if arm != CEILING else Cell("100")])
    t.note = ("positive control: the same training, on the fit pairs' misaligned answers as "
              "chat (never the pairs scored here); negative control: benign chat. A share near "
              "0 reads as no measurable EMA, near 100 % as much as training on misaligned "
              "chat directly. Intervals: bootstrap over pairs, replicate by replicate.")
    return t


def _seed_run(runs: list[RunResult], domain: str, arm: str, point: tuple, seed: int
              ) -> RunResult | None:
    """The run of ``arm`` in ``domain`` at ``seed`` and ``point`` (``_same_point``)."""
    return _same_point([r for r in runs if r.domain == domain and r.arm == arm and r.seed == seed],
                       point, lambda r: r.cell[2])


def _margins(run: RunResult | None) -> dict[str, float]:
    """pair id -> preference margin of a run's general evaluation (empty without one)."""
    pairs = (((run.free.get("general") or {}).get("preference") or {}).get("pairs")
             if run is not None else None) or []
    return {str(p.get("id", i)): p["margin"] for i, p in enumerate(pairs)
            if p.get("margin") is not None}


def compensation_table(runs: list[RunResult], seed: int = 0) -> Table | None:
    """Difference-in-differences of every arm with a compensation control (study arms
    with ``compensation: true``), on the judge-free preference margin:

        DiD = (ARM - misaligned) - (ARM_on_aligned - aligned)

    per evaluation pair and seed (all four runs score the same pairs), then the mean over
    pairs (bootstrap over pairs: every difference is paired) and over seeds. A defense
    that only compensates (adds a push during training that the adapter learns to cancel)
    moves both differences alike, so its DiD is about 0; one that prevents EMA lowers the
    first only: DiD < 0 over its whole interval is "prevents"."""
    rng = np.random.default_rng(seed)
    controls = [r for r in runs if r.control_of]
    cells: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for ctrl in controls:
        domain, point = ctrl.domain, ctrl.cell[2]
        four = [_seed_run(runs, domain, ctrl.control_of, point, ctrl.seed),
                _seed_run(runs, domain, BASELINE, point, ctrl.seed), ctrl,
                _seed_run(runs, domain, "aligned", point, ctrl.seed)]
        margins = [_margins(r) for r in four]
        ids = sorted(set.intersection(*(set(m) for m in margins)))
        if not ids:
            continue
        arm, mis, arm_al, al = ([m[i] for i in ids] for m in margins)
        d_mis = [a - b for a, b in zip(arm, mis, strict=True)]
        d_al = [a - b for a, b in zip(arm_al, al, strict=True)]
        cell = cells[(domain, ctrl.control_of, point)]
        cell["mis"].append(mean_replicates(d_mis, rng))
        cell["al"].append(mean_replicates(d_al, rng))
        cell["did"].append(mean_replicates([a - b for a, b in zip(d_mis, d_al, strict=True)], rng))
    if not cells:
        return None
    t = Table("compensation", "Compensation controls: difference-in-differences of the "
              "preference margin", ["dataset", "arm", "arm - misaligned", "on aligned data: "
                                    "arm - aligned", "difference-in-differences", "verdict"])
    for (domain, arm, point), parts in sorted(cells.items(), key=lambda kv: _order(kv[0])):
        did = combine_seeds(parts["did"])
        eps = 1e-9  # nats: rounding of equal differences is no effect
        verdict = ("prevents" if did.hi is not None and did.hi < -eps else
                   "raises" if did.lo is not None and did.lo > eps else "not shown")
        t.rows.append([Cell(domain), Cell(arm_label(arm, point)),
                       _cell(combine_seeds(parts["mis"]), digits=3),
                       _cell(combine_seeds(parts["al"]), digits=3), _cell(did, digits=3),
                       Cell(verdict)])
    t.note = ("Per evaluation pair: (margin under the arm trained on misaligned data - the "
              "misaligned baseline's) - (the same arm trained on the aligned data - the aligned "
              "baseline's), same seed; mean over pairs, then over seeds. Intervals: bootstrap "
              "over pairs, replicate by replicate. 'prevents': the whole interval below 0; an "
              "arm whose two differences are alike only compensates.")
    return t
