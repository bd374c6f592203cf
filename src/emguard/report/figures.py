"""The report's figures (matplotlib, written as PNG and SVG).

  tradeoff_<arm>.png   in-domain vs general misalignment along a defense's hyperparameter,
                       one line per dataset, the misaligned/untrained baselines as markers
                       (paper Figures 3-5); judge-free axes when no judge scored the study
  interleave.png       general misalignment and incoherence vs interleave fraction (Fig. 2)
  overview.png         the main measure per dataset and arm, with 95 % intervals
  trajectory.png       the judge-free measures against the training step, per arm
                       (runs with train.trajectory_steps; emguard.trajectory)
"""

from __future__ import annotations

from pathlib import Path

from emguard.names import check_name
from emguard.report.collect import value_key
from emguard.report.stats import Estimate

COLORS = ["#4f81bd", "#c0504d", "#9bbb59", "#8064a2", "#f79646", "#4bacc6"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(e: Estimate) -> tuple[float, float]:
    if e.lo is None:
        return 0.0, 0.0
    return max(e.value - e.lo, 0.0), max(e.hi - e.value, 0.0)


def _fmt(value) -> str:
    """A grid value as a point label: numbers compactly (``1e-05``), anything else as text."""
    return f"{value:g}" if value_key(value)[0] == 0 else str(value)


def _save(fig, out: Path, stem: str) -> Path:
    check_name(stem, "figure name")  # arm names reach it: it must stay inside ``out``
    png = out / f"{stem}.png"
    for suffix in (".png", ".svg"):
        tmp = out / f".{stem}.tmp{suffix}"
        fig.savefig(tmp, dpi=110)
        tmp.replace(out / f"{stem}{suffix}")
    _plt().close(fig)
    return png


def tradeoff(cells: dict, arm: str, param: str, x: tuple[str, str], y: tuple[str, str],
             out: Path) -> Path | None:
    """One line per dataset through the arm's grid values; x/y: (measure key, axis label)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    drawn = False
    for i, domain in enumerate(sorted({c[0] for c in cells})):
        pts = sorted(((c[2][0][1], est) for c, est in cells.items()
                      if c[0] == domain and c[1] == arm and c[2] and c[2][0][0] == param),
                     key=lambda p: value_key(p[0]))
        pts = [(v, e) for v, e in pts if e[x[0]].value is not None and e[y[0]].value is not None]
        if not pts:
            continue
        color = COLORS[i % len(COLORS)]
        xs, ys = [e[x[0]].value for _, e in pts], [e[y[0]].value for _, e in pts]
        ax.errorbar(xs, ys, xerr=list(zip(*[_err(e[x[0]]) for _, e in pts], strict=True)),
                    yerr=list(zip(*[_err(e[y[0]]) for _, e in pts], strict=True)),
                    color=color, marker="o", capsize=2, label=domain)
        for (value, _), xv, yv in zip(pts, xs, ys, strict=True):
            ax.annotate(_fmt(value), (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for base, marker in (("misaligned", "X"), ("untrained", "s")):
            e = cells.get((domain, base, ()))
            if e and e[x[0]].value is not None and e[y[0]].value is not None:
                ax.scatter([e[x[0]].value], [e[y[0]].value], color=color, marker=marker, s=60,
                           edgecolor="black", zorder=3)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel(x[1])
    ax.set_ylabel(y[1])
    ax.set_title(f"{arm}: trade-off along {param.split('.')[-1]} "
                 "(X = misaligned baseline, ■ = untrained)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out, f"tradeoff_{arm}")


def interleave_curve(cells: dict, out: Path) -> Path | None:
    """General misalignment and incoherence vs the interleave fraction (paper Figure 2)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    drawn = False
    for i, domain in enumerate(sorted({c[0] for c in cells})):
        pts = sorted(((c[2][0][1], est) for c, est in cells.items() if c[0] == domain
                      and c[1] == "interleave" and c[2] and c[2][0][0].endswith("fraction")
                      and value_key(c[2][0][1])[0] == 0), key=lambda p: value_key(p[0]))
        for ax, key, label in ((axes[0], "general_misaligned", "general misaligned %"),
                               (axes[1], "general_incoherent", "general incoherent %")):
            got = [(v, e[key]) for v, e in pts if e[key].value is not None]
            if not got:
                continue
            ax.errorbar([v for v, _ in got], [e.value for _, e in got],
                        yerr=list(zip(*[_err(e) for _, e in got], strict=True)), marker="o",
                        capsize=2, color=COLORS[i % len(COLORS)], label=domain)
            ax.set_xlabel("interleave fraction")
            ax.set_ylabel(label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    axes[0].legend(fontsize=8)
    fig.suptitle("Interleaving: EMA vs coherence (paper Figure 2)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out, "interleave")


def overview(cells: dict, key: str, label: str, out: Path) -> Path | None:
    """Grouped bars: the measure per dataset (groups) and arm (bars), with intervals."""
    plt = _plt()
    domains = sorted({c[0] for c in cells})
    arms = list(dict.fromkeys((c[1], c[2]) for c in cells))
    if not any(est[key].value is not None for est in cells.values()):
        return None
    fig, ax = plt.subplots(figsize=(max(7.5, 1.2 * len(domains) * max(1, len(arms)) / 2 + 1.5), 4.2))
    width = 0.8 / max(1, len(arms))
    for j, (arm, point) in enumerate(arms):
        xs, ys, errs = [], [], []
        for i, domain in enumerate(domains):
            e = cells.get((domain, arm, point), {}).get(key)
            if e is None or e.value is None:
                continue
            xs.append(i + j * width)
            ys.append(e.value)
            errs.append(_err(e))
        if xs:
            name = arm + (f" {', '.join(f'{v}' for _, v in point)}" if point else "")
            ax.bar(xs, ys, width, yerr=list(zip(*errs, strict=True)), capsize=2, label=name,
                   color=COLORS[j % len(COLORS)] if j < len(COLORS) else None)
    ax.set_xticks([i + width * (len(arms) - 1) / 2 for i in range(len(domains))], domains)
    ax.set_ylabel(label, fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars
    ax.set_title(f"{label}\nper dataset and arm (95 % bootstrap intervals)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out, "overview")


def trajectory(traj: dict, measures: list[tuple[str, str]], out: Path) -> Path | None:
    """The judge-free measures against the training step, one panel per measure and one
    line per cell (mean over seeds, 95 % interval shaded, each seed a faint line); step 0 is
    the untrained model. ``traj``: emguard.report.tables.trajectory_estimates."""
    plt = _plt()
    measures = [(k, label) for k, label in measures
                if any(p.get(k) and p[k].est.value is not None for c in traj.values() for p in c.values())]
    if not measures:
        return None
    fig, axes = plt.subplots(1, len(measures), figsize=(5.2 * len(measures) + 2.2, 4.4), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    domains = {c[0] for c in traj}
    for ax, (key, label) in zip(axes[0], measures, strict=True):
        for i, (cell, points) in enumerate(traj.items()):
            got = [(s, p[key]) for s, p in sorted(points.items())
                   if p.get(key) and p[key].est.value is not None]
            if not got:
                continue
            color, style = colors[i % len(colors)], ("-", "--", ":")[i // len(colors) % 3]
            steps = [s for s, _ in got]
            ax.plot(steps, [p.est.value for _, p in got], marker="o", ms=3, color=color, ls=style,
                    label=(f"{cell[0]}: " if len(domains) > 1 else "") + _cell_name(cell))
            band = [(s, p.est) for s, p in got if p.est.lo is not None]
            if band:
                ax.fill_between([s for s, _ in band], [e.lo for _, e in band],
                                [e.hi for _, e in band], color=color, alpha=0.12, lw=0)
            for seed in sorted({sd for _, p in got for sd in p.per_seed}):
                line = [(s, p.per_seed[seed]) for s, p in got if seed in p.per_seed]
                ax.plot([s for s, _ in line], [v for _, v in line], color=color, lw=0.5, alpha=0.35)
        if key.startswith("preference"):
            ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xlabel("training step")
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(label, fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Trajectories: mean over seeds, 95 % interval shaded, seeds as faint lines "
                 "(step 0 = untrained)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out, "trajectory")


def _cell_name(cell: tuple) -> str:
    _, arm, point = cell
    values = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in point)
    return f"{arm} {values}" if point else arm
