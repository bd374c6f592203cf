"""The Ray executor of a sweep: each run is one Ray task, one GPU each where there are GPUs.

A run's task receives the results of the runs it needs as arguments, so Ray starts it
only after they finish; a run whose source failed is reported blocked. Every node
needs emguard installed and the study folder on a shared filesystem (run folders, the
sweep log and the model cache are written there). ``address``: ``auto`` or
``ray://HOST:10001`` for a running cluster, None for a local instance.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from emguard.study import PlannedRun
from emguard.sweep import SweepLog, SweepResult, execute_run


def _task(run: PlannedRun, log_path: str, reevaluate: bool, *needs: str) -> str:
    return execute_run(run, log_path, judge_now=False, progress=False, reevaluate=reevaluate)


def run_with_ray(runs: list[PlannedRun], log_path: str, address: str | None,
                 notify: Callable[[str, str], None], num_cpus: int | None = None,
                 reevaluate: bool = False) -> SweepResult:
    """Submit every run (sources first), then collect results in order."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--executor ray needs Ray: pip install 'emguard[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=num_cpus if address is None else None,
                 include_dashboard=False, log_to_driver=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        remote = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=0)(_task)
        refs = {}
        for run in runs:
            refs[run.name] = remote.remote(run, log_path, reevaluate, *[refs[n] for n in run.needs])
        result = SweepResult([], [], {}, {})
        for run in runs:
            bad = [n for n in run.needs if n in result.failed or n in result.blocked]
            if bad:
                result.blocked[run.name] = bad[0]
                SweepLog(Path(log_path)).write("blocked", run.name, needs=bad[0])
                notify(run.name, "blocked")
                continue
            try:
                state = ray.get(refs[run.name])
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None) or e
                result.failed[run.name] = f"{type(cause).__name__}: {cause}"
                notify(run.name, "failed")
                continue
            (result.done if state == "done" else result.skipped).append(run.name)
            notify(run.name, state)
        return result
    finally:
        if started_here:
            ray.shutdown()
