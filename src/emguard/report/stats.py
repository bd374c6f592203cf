"""Uncertainty for the report: bootstrap over questions, spread over seeds.

A rate of one run is pooled over its questions: 100 * sum(k_q) / sum(n_q), k_q the
answers of question q that count (misaligned, incoherent, correct), n_q its scored
answers. Its interval resamples the questions with replacement (percentile bootstrap).
A cell of several seeds is the mean of the seeds' rates; its interval resamples each
seed's questions independently and averages the replicates the same way, so it reflects
question sampling; the spread over seeds (standard deviation) is reported beside it.
Derived numbers (relative reduction, retention, differences) are computed replicate by
replicate from the cells' bootstrap replicates, never from the interval ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A value with its bootstrap interval, spread over seeds and the replicates behind it."""

    value: float | None
    lo: float | None
    hi: float | None
    sd_seeds: float | None = None  # standard deviation of the per-seed values (>= 2 seeds)
    n_seeds: int = 0
    replicates: np.ndarray | None = None  # (N_BOOT,) bootstrap replicates of `value`

    def fmt(self, digits: int = 1) -> str:
        if self.value is None:
            return "-"
        ci = f" [{self.lo:.{digits}f}, {self.hi:.{digits}f}]" if self.lo is not None else ""
        sd = f" ±{self.sd_seeds:.{digits}f}sd" if self.sd_seeds is not None else ""
        return f"{self.value:.{digits}f}{ci}{sd}"


EMPTY = Estimate(None, None, None)


def rate_replicates(counts: list[tuple[int, int]], rng: np.random.Generator,
                    n_boot: int = N_BOOT) -> tuple[float | None, np.ndarray | None]:
    """(pooled rate in %, its bootstrap replicates) from per-question (k, n) counts."""
    k = np.array([c[0] for c in counts], dtype=float)
    n = np.array([c[1] for c in counts], dtype=float)
    if n.sum() == 0:
        return None, None
    idx = rng.integers(0, len(counts), size=(n_boot, len(counts)))
    num, den = k[idx].sum(axis=1), n[idx].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = 100.0 * num / den
    return 100.0 * k.sum() / n.sum(), reps


def mean_replicates(values: list[float], rng: np.random.Generator,
                    n_boot: int = N_BOOT) -> tuple[float | None, np.ndarray | None]:
    """(mean, its bootstrap replicates) of per-item values (margins, per-question scores)."""
    v = np.array([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return None, None
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    return float(v.mean()), v[idx].mean(axis=1)


def combine_seeds(per_seed: list[tuple[float | None, np.ndarray | None]]) -> Estimate:
    """One cell from its seeds' (value, replicates): mean, interval of the mean, sd."""
    got = [(v, r) for v, r in per_seed if v is not None]
    if not got:
        return EMPTY
    values = np.array([v for v, _ in got])
    reps = np.nanmean(np.stack([r for _, r in got]), axis=0)
    return _estimate(float(values.mean()), reps,
                     float(values.std(ddof=1)) if len(values) > 1 else None, len(values))


def _estimate(value: float | None, reps: np.ndarray | None, sd: float | None = None,
              n_seeds: int = 0) -> Estimate:
    if value is None or reps is None or np.all(np.isnan(reps)):
        return Estimate(value, None, None, sd, n_seeds, reps)
    alpha = (1 - LEVEL) / 2
    lo, hi = np.nanquantile(reps, [alpha, 1 - alpha])
    return Estimate(value, float(lo), float(hi), sd, n_seeds, reps)


def mean_of(ests: list[Estimate]) -> Estimate:
    """The mean of several cells (e.g. over datasets), its interval from the replicates."""
    ests = [e for e in ests if e.value is not None and e.replicates is not None]
    if not ests:
        return EMPTY
    reps = np.nanmean(np.stack([e.replicates for e in ests]), axis=0)
    return _estimate(float(np.mean([e.value for e in ests])), reps)


def derived(a: Estimate, b: Estimate, op) -> Estimate:
    """``op(a, b)`` with its interval from the replicates (None when either is missing)."""
    if a.value is None or b.value is None or a.replicates is None or b.replicates is None:
        return EMPTY
    with np.errstate(invalid="ignore", divide="ignore"):
        value = op(np.float64(a.value), np.float64(b.value))
        reps = op(a.replicates, b.replicates)
    if not np.isfinite(value):
        return EMPTY
    reps = np.where(np.isfinite(reps), reps, np.nan)
    return _estimate(float(value), reps)


def reduction(arm: Estimate, baseline: Estimate) -> Estimate:
    """Relative EMA reduction in %: 100 * (1 - arm / baseline)."""
    return derived(arm, baseline, lambda x, y: 100.0 * (1.0 - x / y))


def retention(arm: Estimate, baseline: Estimate) -> Estimate:
    """In-domain retention in %: 100 * arm / baseline."""
    return derived(arm, baseline, lambda x, y: 100.0 * x / y)


def supported_above(est: Estimate, threshold: float) -> bool:
    """True when the whole interval lies at or above ``threshold`` (a mark the data support)."""
    return est.lo is not None and est.lo >= threshold


def differs(a: Estimate, b: Estimate) -> int:
    """+1 / -1 when the interval of a - b excludes 0 (a above / below b), else 0."""
    d = derived(a, b, lambda x, y: x - y)
    if d.lo is None:
        return 0
    return 1 if d.lo > 0 else -1 if d.hi < 0 else 0
